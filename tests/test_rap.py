"""RAP (docs/rules.md §2): each rule against an independent matrix-form reference written from the
spec's formulas, and the invariants on full torchvision models in float64."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from dense import sdiv
import torch.nn as nn
import torch.nn.functional as F
from nets import build, images

from cxr_explain.attribution.graph import clear_trace_caches
from cxr_explain.attribution import explain
from cxr_explain.attribution import rules as R
from cxr_explain.attribution.graph import ForwardRecord, LayerNode

F64 = torch.float64


# ------------------------------------------------------------------------------------------
# Independent references (numpy, dense matrices, loops where the spec says "for each")
# ------------------------------------------------------------------------------------------




def dense(module: nn.Module, in_shape) -> np.ndarray:
    """The bias-free linear map of a layer as a matrix M (out_features × in_features), built by
    applying the layer to basis vectors."""
    n = int(np.prod(in_shape))
    basis = torch.eye(n, dtype=F64).reshape(n, *in_shape)
    with torch.no_grad():
        if isinstance(module, nn.Conv2d):
            out = F.conv2d(basis, module.weight, None, module.stride, module.padding)
        elif isinstance(module, nn.Linear):
            out = F.linear(basis, module.weight)
        else:
            out = module(basis)
    return out.reshape(n, -1).T.numpy()


def ref_first_step(a, W, b, t):
    """docs/rules.md §2.2, written out per input unit."""
    w, bt = W[t], b[t]
    c = a * w
    pos, neg = c[c > 0].sum(), c[c < 0].sum()
    b_pos = bt * sdiv(pos, pos + neg)
    b_neg = bt * sdiv(neg, pos + neg)
    ap = np.maximum(a, 0)
    pp, pn = ap * np.maximum(w, 0), ap * np.minimum(w, 0)
    r = c + sdiv(pp * b_pos, pp.sum()) + sdiv(pn * b_neg, pn.sum())
    return np.abs(r) * r.sum() / np.abs(r).sum()


def ref_hidden(M, x, Rout, conv: bool):
    """docs/rules.md §2.3, one output unit j at a time."""
    x = np.maximum(x, 0)
    Mp, Mn = np.maximum(M, 0), np.minimum(M, 0)
    P, N = Mp @ x, -(Mn @ x)
    C = np.zeros_like(x)
    for j in range(M.shape[0]):
        Rj, PNj = Rout[j], P[j] + N[j]
        m = float(PNj != 0)
        last = float(sdiv(Rj * sdiv(N[j], PNj), N[j]))
        if conv:
            g = Mp[j] * float(sdiv(max(Rj, 0), P[j])) * m + np.abs(Mn[j]) * float(sdiv(min(Rj, 0), N[j])) * m
        else:
            g = Mp[j] * float(sdiv(Rj, P[j])) * m
        g = g + np.abs(Mn[j]) * last
        C += x * g
    gamma = np.count_nonzero(C)
    delta = float(sdiv(C.sum() - Rout.sum(), gamma))
    return np.where(C != 0, C - delta, 0.0)


def ref_zbox(M, x, Rout):
    l, h = x.min(), x.max()
    Mp, Mn = np.maximum(M, 0), np.minimum(M, 0)
    contrib = x[None, :] * M - l * Mp - h * Mn  # (j, i)
    Z = contrib.sum(1)
    return (contrib * sdiv(Rout, Z)[:, None]).sum(0)


def ref_proportional(M, x, Rout):
    z = M @ x
    return x * (M.T @ sdiv(Rout, z))


# ------------------------------------------------------------------------------------------
# Applying one rule to one layer
# ------------------------------------------------------------------------------------------


def run_rule(rule: R.Rule, module: nn.Module, kind: str, x: torch.Tensor, Rout: torch.Tensor, **record):
    node = LayerNode(0, "layer", kind, "hidden", type(module).__name__, fx_node=None, module=module,
                     module_path="layer")
    with torch.no_grad():
        if kind == "maxpool":
            out, idx = F.max_pool2d(x, module.kernel_size, module.stride, module.padding, return_indices=True)
            record = {"pool_indices": {"layer": idx}}
        else:
            out = module(x)
        step = R.Step(node, [x], out, ForwardRecord({}, record.get("pool_indices", {})), 1, {})
        return rule.backward(step, Rout.unsqueeze(0))[0][0, 0]  # drop the target and batch axes


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_first_step_matches_reference_and_has_the_logit_sign(rng):
    torch.manual_seed(0)
    lin = nn.Linear(7, 4).to(F64)
    a = torch.tensor(np.abs(rng.normal(size=(1, 7))) * (rng.random((1, 7)) > 0.3))
    a[0, 2] = -0.4  # a negative input: takes its contribution but no bias share
    logits = lin(a).detach()
    for t in range(4):
        onehot = F.one_hot(torch.tensor([t]), 4).to(F64)
        ours = run_rule(R.RapFirstStep(), lin, "linear", a, onehot).numpy()
        ref = ref_first_step(a[0].numpy(), lin.weight.detach().numpy(), lin.bias.detach().numpy(), t)
        np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-14)
        assert abs(ours.sum() - float(logits[0, t])) < 1e-12
        nz = ours[ours != 0]
        assert np.all(np.sign(nz) == np.sign(float(logits[0, t])))


@pytest.mark.parametrize("conv", [False, True])
def test_hidden_rule_matches_reference(rng, conv):
    torch.manual_seed(1)
    if conv:
        layer = nn.Conv2d(3, 4, 3, stride=1, padding=1).to(F64)
        x = torch.relu(torch.tensor(rng.normal(size=(1, 3, 5, 5))))
        out_shape = (4, 5, 5)
    else:
        layer = nn.Linear(6, 5).to(F64)
        x = torch.relu(torch.tensor(rng.normal(size=(1, 6))))
        out_shape = (5,)
    Rout = torch.tensor(rng.normal(size=(1, *out_shape)))  # signed relevance: both branches matter
    ours = run_rule(R.RapHidden(), layer, "conv" if conv else "linear", x, Rout)
    M = dense(layer, x.shape[1:])
    ref = ref_hidden(M, x.flatten().numpy(), Rout.flatten().numpy(), conv=conv)
    np.testing.assert_allclose(ours.flatten().numpy(), ref, rtol=1e-10, atol=1e-12)
    # conservation after the shift, and entries with zero input stay zero
    assert abs(float(ours.sum() - Rout.sum())) < 1e-10
    assert torch.all(ours[x[0] == 0] == 0)


def test_hidden_conv_with_stride_and_bias_uses_the_stored_preactivation(rng):
    torch.manual_seed(2)
    layer = nn.Conv2d(4, 3, 3, stride=2, padding=1).to(F64)
    nn.init.uniform_(layer.bias, -1, 1)
    x = torch.relu(torch.tensor(rng.normal(size=(1, 4, 6, 6))))
    Rout = torch.tensor(rng.normal(size=(1, 3, 3, 3)))
    ours = run_rule(R.RapHidden(), layer, "conv", x, Rout)
    ref = ref_hidden(dense(layer, x.shape[1:]), x.flatten().numpy(), Rout.flatten().numpy(), conv=True)
    np.testing.assert_allclose(ours.flatten().numpy(), ref, rtol=1e-10, atol=1e-12)


def test_zbox_matches_reference(rng):
    torch.manual_seed(3)
    layer = nn.Conv2d(3, 2, 3, stride=2, padding=1).to(F64)
    x = torch.tensor(rng.normal(size=(1, 3, 6, 6)))
    Rout = torch.tensor(rng.normal(size=(1, 2, 3, 3)))
    ours = run_rule(R.zbox("safe"), layer, "conv", x, Rout)
    ref = ref_zbox(dense(layer, x.shape[1:]), x.flatten().numpy(), Rout.flatten().numpy())
    np.testing.assert_allclose(ours.flatten().numpy(), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ours.sum().item(), Rout.sum().item(), rtol=1e-10)


@pytest.mark.parametrize("pool", [nn.AvgPool2d(2, 2), nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(3)])
def test_average_pools_match_the_proportional_reference(rng, pool):
    x = torch.relu(torch.tensor(rng.normal(size=(1, 2, 4, 4))))
    with torch.no_grad():
        out_shape = pool(x).shape[1:]
    Rout = torch.tensor(rng.normal(size=(1, *out_shape)))
    kind = "avgpool" if isinstance(pool, nn.AvgPool2d) else "adaptive_avgpool"
    ours = run_rule(R.Proportional(), pool, kind, x, Rout)
    ref = ref_proportional(dense(pool, x.shape[1:]), x.flatten().numpy(), Rout.flatten().numpy())
    np.testing.assert_allclose(ours.flatten().numpy(), ref, rtol=1e-12, atol=1e-14)


def test_max_pool_gives_all_relevance_to_the_argmax(rng):
    pool = nn.MaxPool2d(3, 2, 1)  # overlapping windows, as ResNet's stem
    x = torch.relu(torch.tensor(rng.normal(size=(1, 1, 5, 5))))
    Rout = torch.tensor(rng.normal(size=(1, 1, 3, 3)))
    ours = run_rule(R.WinnerTakesAll(), pool, "maxpool", x, Rout)
    ref = np.zeros(25)
    xf = x.flatten().numpy()
    for oy in range(3):
        for ox in range(3):
            ys = range(max(0, 2 * oy - 1), min(5, 2 * oy + 2))
            xs = range(max(0, 2 * ox - 1), min(5, 2 * ox + 2))
            cells = [y * 5 + c for y in ys for c in xs]
            best = max(cells, key=lambda i: xf[i])
            if xf[best] != 0:
                ref[best] += Rout[0, 0, oy, ox].item()
    np.testing.assert_allclose(ours.flatten().numpy(), ref, rtol=1e-12, atol=1e-14)


def test_batchnorm_rule_is_pass_through_masked_by_nonzero_input(rng):
    bn = nn.BatchNorm2d(2).to(F64).eval()
    x = torch.tensor(rng.normal(size=(1, 2, 3, 3)))
    x[0, 0, 1, 1] = 0.0
    Rout = torch.tensor(rng.normal(size=(1, 2, 3, 3)))
    ours = run_rule(R.MaskedPass(), bn, "batchnorm", x, Rout)
    expected = Rout[0] * (x[0] != 0)
    assert torch.equal(ours, expected)


class _Branchy(nn.Module):
    """first conv → ReLU → h; h feeds two convs (fan-out), their outputs and h are concatenated,
    and a residual ``+`` joins two branches."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 3, padding=1)
        self.ca = nn.Conv2d(4, 3, 3, padding=1)
        self.cb = nn.Conv2d(4, 3, 1)
        self.fc = nn.Linear(10, 3)

    def forward(self, x):
        h = F.relu(self.c0(x))
        a = self.ca(h)
        b = self.cb(h)
        s = F.relu(a + b)
        z = torch.cat([s, h, F.relu(b)], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


def test_cat_fanout_and_add_against_a_hand_propagation(rng):
    torch.manual_seed(4)
    net = _Branchy().to(F64)
    x = torch.tensor(rng.normal(size=(1, 3, 4, 4)))
    e = explain(net, x, "rap", target=1, keep_relevance=["cat", "add", "relu", "relu_1", "relu_2"])
    rel = e.relevances
    with torch.no_grad():
        h = F.relu(net.c0(x))
        a, b = net.ca(h), net.cb(h)
    Rcat = rel["cat"][0]
    # cat: relevance sliced back
    torch.testing.assert_close(rel["relu_1"][0], Rcat[:3])  # relu(a + b) output
    torch.testing.assert_close(rel["relu_2"][0], Rcat[7:])  # relu(b)
    # add: proportional split of the relevance at the add's output
    Radd = rel["add"][0]
    s = a + b
    Ra = torch.tensor(sdiv(a.numpy() * Radd.numpy(), s.numpy()))
    Rb = torch.tensor(sdiv(b.numpy() * Radd.numpy(), s.numpy())) + rel["relu_2"][0]  # b also feeds relu(b)
    # hidden rule through ca and cb, and the sum at h of all its consumers (ca, cb, cat)
    Mh = h.flatten().numpy()
    via_a = ref_hidden(dense(net.ca, h.shape[1:]), Mh, Ra.flatten().numpy(), conv=True)
    via_b = ref_hidden(dense(net.cb, h.shape[1:]), Mh, Rb.flatten().numpy(), conv=True)
    expected_h = via_a + via_b + Rcat[3:7].flatten().numpy()
    np.testing.assert_allclose(rel["relu"][0].flatten().numpy(), expected_h, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Invariants on full models, float64
# ------------------------------------------------------------------------------------------

ARCHS = ["vgg16", "resnet50", "resnet-tiny", "densenet121"]
HEAD_INPUT = {"vgg16": "classifier.5", "resnet50": "flatten", "resnet-tiny": "flatten", "densenet121": "flatten"}


@pytest.mark.parametrize("arch", ARCHS)
def test_rap_conserves_and_first_step_has_the_logit_sign(models64, arch):
    model = models64(arch)
    x = images(1, 64, seed=11, dtype=F64)
    with torch.no_grad():
        logits = model(x)[0]
    targets = [int(logits.argmax()), int(logits.argmin())]  # a positive and a negative logit
    assert logits[targets[1]] < 0 < logits[targets[0]]
    e = explain(model, x, "rap", target=[targets], keep_relevance=[HEAD_INPUT[arch]])
    for j, t in enumerate(targets):
        assert torch.isfinite(e.maps[0, j]).all()
        total = float(e.maps[0, j].sum())
        assert abs(total - float(logits[t])) < 1e-8 * abs(float(logits[t])), (arch, t, total, float(logits[t]))
        first = next(iter(e.relevances.values()))[0, j]
        nz = first[first != 0]
        assert torch.all(torch.sign(nz) == torch.sign(logits[t]))
        assert abs(float(first.sum()) - float(logits[t])) < 1e-10 * abs(float(logits[t]))


def test_rap_shift_leaves_zero_activations_without_relevance(models64):
    model = models64("resnet-tiny")
    x = images(1, 64, seed=12, dtype=F64)
    node = "layer2_0_relu_1"  # fx name of the 2nd call of layer2.0.relu: the input of conv3
    e = explain(model, x, "rap", target=2, keep_relevance=[node])
    feats = {}
    h = dict(model.named_modules())["layer2.0.conv3"].register_forward_hook(
        lambda m, i, o: feats.update(a=i[0]) and None)
    with torch.no_grad():
        model(x)
    h.remove()
    r = e.relevances[node][0]
    assert torch.all(r[feats["a"][0] == 0] == 0)
    assert (r < 0).any() and (r > 0).any()  # the shift makes weak contributors negative


def test_rap_float32_correlates_with_float64_on_vgg():
    model = build("vgg16", size=64)
    x = images(1, 64, seed=13)
    m32 = explain(model, x, "rap", target=1).maps.flatten().double()
    clear_trace_caches()  # the float32 model's W⁺/|W⁻| copies (0.8 GB) before the float64 copy's
    m64 = explain(model, x, "rap", target=1, dtype=F64).maps.flatten()
    assert torch.corrcoef(torch.stack([m32, m64]))[0, 1] > 0.99


def test_rap_batch_and_targets_equal_single_calls(models64):
    model = models64("densenet121")
    x = images(2, 64, seed=14, dtype=F64)
    both = explain(model, x, "rap", target=[[0, 3], [5, 1]])
    for i, j, t in [(0, 1, 3), (1, 0, 5)]:  # a second target of one image, a first of the other
        single = explain(model, x[i:i + 1], "rap", target=t)
        torch.testing.assert_close(both.maps[i, j], single.maps[0], rtol=1e-9, atol=1e-12)


def _densenet_with_bias_only_activations() -> tuple[nn.Module, torch.Tensor]:
    """DenseNet-121 (64 px, float64) and an image with a flat left half, arranged as in a trained
    model: denselayer1's norm1 maps the flat region below 0 in every channel, so its 1×1 conv outputs
    exactly 0 there, and norm2's positive bias turns those zeros into active, relevant units."""
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.densenet121(num_classes=3).to(F64).eval()
    x = torch.randn(1, 3, 64, 64, dtype=F64)
    x[..., :32] = 0.3
    f = m.features
    with torch.no_grad():
        p0 = f.pool0(f.relu0(f.norm0(f.conv0(x))))
    flat = p0[0, :, 3:13, 2:6]  # interior of the flat half at pool0 (16×16)
    assert torch.allclose(flat, flat[:, :1, :1].expand_as(flat))
    layer = f.denseblock1.denselayer1
    with torch.no_grad():
        layer.norm1.running_mean.copy_(flat[:, 0, 0])
        layer.norm1.running_var.fill_(1 - layer.norm1.eps)
        layer.norm1.bias.fill_(-1e-3)
        layer.norm2.bias.fill_(0.5)
        zero = f.denseblock1.denselayer1.conv1(f.denseblock1.denselayer1.relu1(layer.norm1(p0)))
    assert (zero[0, :, 3:13, 2:6] == 0).all() and (zero != 0).any()
    return m, x


def test_rap_conserves_on_densenet_with_bias_only_activations(monkeypatch):
    """docs/rules.md §2.11 (BN identity in DenseNet): Σ map = logit even where a dense layer's conv outputs
    exactly 0; the authors' BN mask (§2.7) would drop that relevance, as it did on a trained model."""
    import warnings

    from cxr_explain.attribution.methods.rap import Rap

    m, x = _densenet_with_bias_only_activations()
    for t in range(3):
        e = explain(m, x, method="rap", target=t)
        assert abs(float(e.maps.sum()) - float(e.explained[0])) < 1e-8 * max(1.0, abs(float(e.explained[0])))
    monkeypatch.setattr(Rap, "graph_rules", lambda self, traced: {})  # the authors' BN mask everywhere
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masked = [explain(m, x, method="rap", target=t) for t in range(3)]
    lost = max(abs(float(e.maps.sum()) - float(e.explained[0])) / abs(float(e.explained[0])) for e in masked)
    assert lost > 1e-3 and any("norm" in str(w.message) for w in caught)


def test_rap_conserves_through_all_zero_max_pool_windows_on_densenet(models64):
    """DenseNet's stem: relu0 is 0 on some channels, so every pool0 window there is 0, and
    denselayer1.norm1's bias makes those inputs active. The authors' max-pool z-rule (0/0 = 0) drops
    the relevance that comes back to them; RAP sends it to the window's arg-max and conserves."""
    from cxr_explain.attribution.methods.rap import Rap
    from cxr_explain.attribution.rules import WinnerTakesAll

    model = copy.deepcopy(models64("densenet121"))
    with torch.no_grad():
        model.features.norm0.bias[:8] = -100.0
        bn = model.features.denseblock1.denselayer1.norm1
        bn.bias[:8], bn.running_mean[:8] = 1.0, 0.0
    x = images(2, 64, seed=11, dtype=F64)
    e = explain(model, x, "rap", target=[[0, 3], [5, 1]])
    assert float(e.conservation_error.max()) < 1e-8
    dropping = Rap.rules

    def authors_pool(self):
        rules = dropping(self)
        rules["maxpool"] = WinnerTakesAll()
        return rules

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setattr(Rap, "rules", authors_pool)
        lost = explain(model, x, "rap", target=[[0, 3], [5, 1]])
    assert float(lost.conservation_error.max()) > 1e-3
