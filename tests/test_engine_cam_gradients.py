"""CAM, Grad-CAM(++) and gradient methods against torchcam, pytorch-grad-cam and plain autograd."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nets import build, images
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torchcam.methods import CAM

from cxr_explain.attribution import explain
from cxr_explain.errors import CxrExplainError


@pytest.fixture(scope="module")
def resnet():
    return build("resnet50", size=64)


def test_cam_equals_torchcam(resnet):
    x = images(2, 64, seed=2)
    ours = explain(resnet, x, "cam", target=[1, 3])
    with CAM(resnet, target_layer="layer4", fc_layer="fc", input_shape=(3, 64, 64)) as extractor:
        scores = resnet(x)
        ref = extractor(class_idx=[1, 3], scores=scores, normalized=False)[0]
    assert ours.raw_maps.shape == ref.shape == (2, 2, 2)
    torch.testing.assert_close(ours.raw_maps, ref, rtol=1e-5, atol=1e-5)
    assert ours.maps.shape == (2, 64, 64)  # upsampled to the input


def test_densenet_cam_reads_the_map_after_the_final_functional_relu():
    model = build("densenet121", size=64)
    x = images(1, 64, seed=4)
    feats = F.relu(model.features(x))
    expected = torch.einsum("c,chw->hw", model.classifier.weight[2], feats[0])
    e = explain(model, x, "cam", target=2)
    torch.testing.assert_close(e.raw_maps[0], expected, rtol=1e-5, atol=1e-5)


def test_cam_on_vgg_says_to_use_gradcam():
    with pytest.raises(CxrExplainError, match="use gradcam"):
        explain(build("vgg16", size=32), images(1, 32), "cam", target=0)


@pytest.mark.parametrize("cls, method", [(GradCAM, "gradcam"), (GradCAMPlusPlus, "gradcam++")])
def test_gradcam_equals_pytorch_grad_cam(resnet, cls, method):
    x = images(2, 64, seed=5)
    targets = [0, 4]
    ours = explain(resnet, x, method, target=targets, layer="layer4")
    with cls(model=resnet, target_layers=[resnet.layer4]) as cam:
        cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        ref = np.maximum(cam.get_cam_image(x, resnet.layer4, None, acts, grads), 0)
    np.testing.assert_allclose(ours.raw_maps.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_gradcam_default_layer_is_the_last_spatial_map_and_densenet_does_not_crash():
    model = build("densenet121", size=64)
    x = images(2, 64, seed=6)
    default = explain(model, x, "gradcam", target=[1, 2])
    named = explain(model, x, "gradcam", target=[1, 2], layer="relu")  # DenseNet's functional F.relu node
    torch.testing.assert_close(default.raw_maps, named.raw_maps)
    with pytest.raises(CxrExplainError, match="did you mean 'features.norm5'"):
        explain(model, x, "gradcam", target=1, layer="features.norm_5")


def test_gradient_and_gradient_x_input_equal_autograd():
    model = build("resnet18", size=32)
    x = images(2, 32, seed=8).requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad(out[0, 1] + out[1, 3], x)
    e = explain(model, x.detach(), "gradient", target=[1, 3], return_input_relevance=True)
    torch.testing.assert_close(e.input_relevance, g)
    torch.testing.assert_close(e.maps, g.sum(1))
    gxi = explain(model, x.detach(), "gradient-x-input", target=[1, 3])
    torch.testing.assert_close(gxi.maps, (g * x.detach()).sum(1))


def test_integrated_gradients_equals_the_riemann_sum_of_autograd_gradients():
    model = build("resnet18", size=32)
    x = images(1, 32, seed=9)
    steps = 8
    e = explain(model, x, "integrated-gradients", target=2, steps=steps)
    alphas = (torch.arange(steps) + 0.5) / steps
    pts = (alphas.view(-1, 1, 1, 1) * x).requires_grad_(True)
    (g,) = torch.autograd.grad(model(pts)[:, 2].sum(), pts)
    torch.testing.assert_close(e.maps[0], (x[0] * g.mean(0)).sum(0), rtol=1e-4, atol=1e-6)


def test_integrated_gradients_completeness_on_a_smooth_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 3)
    ).double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    e = explain(model, x, "integrated-gradients", target=1, steps=64)
    with torch.no_grad():
        delta = float(model(x)[0, 1] - model(torch.zeros_like(x))[0, 1])
    # Σ IG = f(x) − f(baseline) up to the midpoint rule's O(1/steps²) error
    assert abs(float(e.maps.sum()) - delta) < 1e-3 * max(1.0, abs(delta))


def test_explaining_on_cuda_turns_tf32_off_and_restores_it():
    """TF32 (10 mantissa bits) distorts relevance ratios; explain() disables it for its own work only."""
    from cxr_explain.attribution.explain import full_fp32

    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with pytest.raises(RuntimeError, match="inside"):
            with full_fp32(torch.device("cuda", 0)):
                assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
                raise RuntimeError("inside")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with full_fp32(torch.device("cpu")):
            assert torch.backends.cudnn.allow_tf32  # CPU work leaves the flags alone
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
