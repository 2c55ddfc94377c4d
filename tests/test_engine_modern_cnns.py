"""Modern CNNs in the one engine (docs/rules.md §9): every method runs on EfficientNet, MobileNet,
RegNet, ConvNeXt, ShuffleNet, MNASNet (torchvision) and timm's ConvNeXt (atto) / EfficientNet, with random
weights, realistic norm statistics and non-zero biases; RAP and LRP-α1β0 conserve the logit in float64."""
from __future__ import annotations

import warnings

import pytest
import torch
from nets import build, images

from cxr_explain.attribution import explain
from cxr_explain.attribution.graph import trace

F64 = torch.float64

ARCHS = ["efficientnet_b0", "mobilenet_v3_small", "mobilenet_v2", "regnet_y_400mf", "convnext_tiny",
         "shufflenet_v2_x0_5", "mnasnet0_5", "timm:convnext_atto", "timm:efficientnet_b0"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_runs_and_propagation_conserves_in_float64(models64, arch):
    model = models64(arch)
    x = images(1, 64, seed=21, dtype=F64)
    with torch.no_grad():
        logits = model(x)[0]
    targets = [int(logits.argmax()), int(logits.argmin())]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no conservation warning either
        rap = explain(model, x, "rap", target=[targets])
        lrp = explain(model, x, "lrp", target=[targets])
    for j, t in enumerate(targets):
        logit = float(logits[t])
        assert abs(float(rap.maps[0, j].sum()) - logit) < 1e-8 * max(1.0, abs(logit)), (arch, "rap", t)
        assert abs(float(lrp.maps[0, j].sum()) - logit) < 1e-6 * max(1.0, abs(logit)), (arch, "lrp", t)
    for e in (rap, lrp):
        assert e.maps.shape == (1, 2, 64, 64) and torch.isfinite(e.maps).all() and (e.maps != 0).any()
    grad = explain(model, x, "gradient", target=targets[0])
    cam = explain(model, x, "gradcam", target=targets[0])
    for e in (grad, cam):
        assert e.maps.shape == (1, 64, 64) and torch.isfinite(e.maps).all() and (e.maps != 0).any()
    assert cam.raw_maps.shape[-2:] == (2, 2) and cam.feature_layout == "channels-first"  # the last 2×2 map


FLOAT32_METHODS = ["lrp", "rap", "lrp-epsilon", "lrp-epsilon-plus", "lrp-zplus-flat", "lrp-a2b1", "rap-noshift",
                   "gradient-x-input", "gradcam++"]


@pytest.fixture(scope="module")
def float32_models():
    """One float32 EfficientNet-B0 and ConvNeXt-Tiny at 64 px, shared by the float32 tests."""
    return {arch: build(arch, size=64) for arch in ("efficientnet_b0", "convnext_tiny")}


@pytest.mark.parametrize("method", FLOAT32_METHODS + ["cam"])
def test_every_method_runs_in_float32(float32_models, method):
    """Each method on both networks (CAM on EfficientNet only: ConvNeXt's head normalises before its
    Linear layer)."""
    archs = ["efficientnet_b0"] if method == "cam" else list(float32_models)
    for arch in archs:
        e = explain(float32_models[arch], images(2, 64), method, target=[0, 3], check_conservation=False)
        assert e.maps.shape == (2, 64, 64) and e.maps.dtype == torch.float32, arch
        assert torch.isfinite(e.maps).all() and (e.maps != 0).any(), arch


def test_cam_on_convnext_is_a_clear_error():
    from cxr_explain.errors import CxrExplainError

    with pytest.raises(CxrExplainError, match="global average pooling right before the classifier"):
        explain(build("convnext_tiny", size=64), images(1, 64), "cam", target=0)


def test_rap_float32_conserves_on_efficientnet(float32_models):
    e = explain(float32_models["efficientnet_b0"], images(2, 64), "rap", target=[1, 2])
    assert (e.conservation_error < 1e-4).all()


def test_batch_and_target_lists_equal_single_calls_on_a_signed_network(models64):
    model = models64("mobilenet_v3_small")  # Hardswish: signed inputs, squeeze-excitation gates
    x = images(2, 64, seed=22, dtype=F64)
    for method in ("rap", "lrp"):
        both = explain(model, x, method, target=[[0, 3], [5, 1]])
        for i, j, t in [(0, 1, 3), (1, 0, 5)]:
            single = explain(model, x[i:i + 1], method, target=t)
            torch.testing.assert_close(both.maps[i, j], single.maps[0], rtol=1e-9, atol=1e-12)


def test_graph_classification_of_modern_blocks():
    import torchvision

    # RegNet: the squeeze-excitation sigmoids are gates, not the output activation
    regnet = trace(torchvision.models.regnet_y_400mf(num_classes=3).eval())
    assert regnet.logits.module_path == "fc"
    gated = [n for n in regnet.nodes if n.kind == "gated_mul"]
    assert len(gated) == 16
    for n in gated:
        (gate,) = [i for i in n.inputs if i.name in n.passive]
        assert gate.kind == "sigmoid" and gate.module_path.endswith("se.scale_activation")
    # ConvNeXt: layer scale (a parameter) is a gate; LayerNorm2d is a functional layer_norm; every
    # permute is structural
    convnext = trace(torchvision.models.convnext_tiny(num_classes=3).eval())
    kinds = {n.kind for n in convnext.relevant_nodes()}
    assert {"layernorm", "permute", "gated_mul", "activation"} <= kinds and "unknown" not in kinds
    assert all(next(i for i in n.inputs if i.name in n.passive).kind == "constant"
               for n in convnext.nodes if n.kind == "gated_mul")
    # ShuffleNet: its channel shuffle's shape arithmetic is meta, the chunk a split
    shuffle = trace(torchvision.models.shufflenet_v2_x0_5(num_classes=3).eval())
    assert {n.kind for n in shuffle.nodes if n.op in ("floordiv", "size")} == {"meta"}
    assert {n.kind for n in shuffle.nodes if n.op == "chunk"} == {"split"}


def test_trailing_sigmoid_is_skipped_but_not_a_gate():
    import torch.nn as nn
    import torchvision

    model = nn.Sequential(torchvision.models.regnet_y_400mf(num_classes=3), nn.Sigmoid()).eval()
    traced = trace(model)
    assert traced.logits.module_path == "0.fc"


def test_the_transformer_composite_refuses_a_cnn():
    """LRP-ε on every layer of a CNN lets Σ map grow to 1e40 × the logit: a clear error instead."""
    from cxr_explain.errors import CxrExplainError

    with pytest.raises(CxrExplainError, match=r"attnlrp: .*needs a model with attention.*use lrp"):
        explain(build("resnet-tiny", size=64), images(1, 64), "attnlrp", target=0)
