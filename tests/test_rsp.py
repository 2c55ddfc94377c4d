"""RSP (docs/rules.md §4): the conv rule against a dense-matrix reference, conservation on VGG-16,
and a clear error where RSP is not defined."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from nets import build, images
from test_rap import dense, run_rule, sdiv

from cxr_explain.attribution import explain
from cxr_explain.attribution.rsp import RspConv
from cxr_explain.errors import CxrExplainError

F64 = torch.float64


def ref_rsp_conv(layer: nn.Conv2d, x: torch.Tensor, Rout: torch.Tensor) -> np.ndarray:
    """C1 − C2 (×2 and shifted for k > 1) with the comparative kernels from autograd."""
    xf = x.clamp(min=0)
    parts = []
    for r in (Rout.clamp(min=0), (-Rout).clamp(min=0)):
        w = layer.weight.detach().clone().requires_grad_(True)
        out = nn.functional.conv2d(xf, w, None, layer.stride, layer.padding)
        (G,) = torch.autograd.grad((out * r).sum(), w)
        probe = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          bias=False).to(F64)
        probe.weight.data = G
        M = dense(probe, x.shape[1:])
        rv, xv = r.flatten().numpy(), xf.flatten().numpy()
        z = (M @ xv) * (rv != 0)
        parts.append(xv * (M.T @ sdiv(rv, z)))
    C = parts[0] - parts[1]
    if layer.kernel_size != (1, 1):
        C = 2 * C
        nz = C != 0
        C = C - Rout.sum().item() / nz.sum() * nz
    return C


@pytest.mark.parametrize("kernel", [3, 1])
def test_rsp_conv_rule_matches_reference(kernel):
    rng = np.random.default_rng(kernel)
    torch.manual_seed(kernel)
    layer = nn.Conv2d(3, 4, kernel, padding=kernel // 2).to(F64)
    x = torch.relu(torch.tensor(rng.normal(size=(1, 3, 5, 5))))
    Rout = torch.tensor(rng.normal(size=(1, 4, 5, 5)))
    ours = run_rule(RspConv(), layer, "conv", x, Rout)
    np.testing.assert_allclose(ours.flatten().numpy(), ref_rsp_conv(layer, x, Rout), rtol=1e-9, atol=1e-12)


def test_rsp_on_vgg16_conserves_the_start_relevance():
    model = build("vgg16", size=64).to(F64)
    x = images(2, 64, seed=21, dtype=F64)
    e = explain(model, x, "rsp", target=[3, 1])
    start = e.layer_sums["features_28"]  # Σ R at the last conv's output = Σ of the start tensor
    assert torch.isfinite(e.maps).all()
    torch.testing.assert_close(e.maps.flatten(1).sum(1), start, rtol=1e-8, atol=1e-10)
    # the start, computed independently: T = A ⊙ mean_hw ∂y_t/∂A at the last ReLU (features[29]),
    # divided by (max T + 1e-9), so its largest entry is 1
    A = model.features[:30](x).detach().requires_grad_(True)
    y = model.classifier(torch.flatten(model.avgpool(model.features[30](A)), 1))
    for b, t in enumerate((3, 1)):
        (g,) = torch.autograd.grad(y[b, t], A, retain_graph=True)
        T = A[b] * g[b].mean((1, 2), keepdim=True)
        T = T / (T.max() + 1e-9)
        assert abs(float(T.max()) - 1.0) < 1e-5  # 1e-9 / max T short of 1
        torch.testing.assert_close(start[b], T.sum().detach(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_rsp_is_refused_where_it_is_not_defined(arch):
    with pytest.raises(CxrExplainError, match="RSP is defined for plain convolutional chains"):
        explain(build(arch, size=32), images(1, 32), "rsp", target=0)
