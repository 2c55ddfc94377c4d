"""Gradient and CAM-family methods on models torch.fx cannot trace (autograd and forward hooks),
against the traced graph of the same network; Grad-CAM's layout detection and its refusals."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision
from nets import build, images

from cxr_explain.attribution import explain
from cxr_explain.attribution.graph import try_trace
from cxr_explain.attribution.layouts import Layout, layout_of, readings
from cxr_explain.errors import CxrExplainError

F64 = torch.float64


class Checked(nn.Module):
    """``sigmoid(net(x))`` behind a shape check: data-dependent control flow, so torch.fx fails."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        if x.shape[-1] != x.shape[-2]:
            raise ValueError("square images only")
        return torch.sigmoid(self.net(x))


class Plain(nn.Module):
    """The same network without the check: traceable (module paths equal :class:`Checked`'s)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.sigmoid(self.net(x))


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.fixture(scope="module")
def resnet():
    return build("resnet18", size=64).to(F64)


METHODS = [("gradient", {}), ("gradient-x-input", {}), ("integrated-gradients", {"steps": 4}), ("gradcam", {}),
           ("gradcam++", {}), ("cam", {})]


@pytest.mark.parametrize("method, options", METHODS)
def test_untraceable_model_gives_exactly_the_traced_result(resnet, method, options):
    checked, plain = Checked(resnet), Plain(resnet)
    assert try_trace(checked) is None and try_trace(plain) is not None
    x = images(2, 64, seed=11, dtype=F64)
    targets = [[1, 3], [0, 2]]
    hooked = explain(checked, x, method, target=targets, return_input_relevance=True, **options)
    traced = explain(plain, x, method, target=targets, return_input_relevance=True, **options)
    assert torch.equal(hooked.maps, traced.maps)
    assert torch.equal(hooked.logits, traced.logits)
    with torch.no_grad():  # the explained outputs are the logits, not the sigmoid the model returns
        logits = resnet(x)
    assert torch.equal(hooked.explained, torch.stack([logits[0, [1, 3]], logits[1, [0, 2]]]))
    if method.startswith("grad") and "cam" not in method or method.startswith("integ"):
        assert torch.equal(hooked.input_relevance, traced.input_relevance)
    else:
        assert torch.equal(hooked.raw_maps, traced.raw_maps) and hooked.raw_maps.shape == (2, 2, 2, 2)
        assert hooked.feature_layout == traced.feature_layout == "channels-first"
        assert hooked.feature_layer == ("input of net.avgpool" if method == "cam" else "net.layer4")
    assert no_hooks_left(checked)


def test_untraceable_densenet_gradcam_at_a_named_layer_equals_the_traced_one():
    """The captured map is protected from DenseNet's in-place ReLU that follows it."""
    net = build("densenet121", size=64).to(F64)
    x = images(1, 64, seed=12, dtype=F64)
    hooked = explain(Checked(net), x, "gradcam++", target=2, layer="net.features")
    traced = explain(Plain(net), x, "gradcam++", target=2, layer="net.features")
    assert torch.equal(hooked.raw_maps, traced.raw_maps) and float(hooked.raw_maps.abs().sum()) > 0
    assert hooked.feature_layer == traced.feature_layer == "net.features"
    with pytest.raises(CxrExplainError, match="global average pooling.*use gradcam"):
        explain(Checked(net), x, "cam", target=2)  # torchvision's DenseNet pools with a function


def test_hook_errors_name_the_layer_and_leave_no_hook(resnet):
    checked = Checked(resnet)
    x = images(1, 64, seed=13, dtype=F64)
    with pytest.raises(CxrExplainError, match="did you mean 'net.layer4'"):
        explain(checked, x, "gradcam", target=0, layer="net.layer5")
    with pytest.raises(CxrExplainError, match="runs more than once.*parent"):
        explain(checked, x, "gradcam", target=0, layer="net.layer4.1.relu")  # BasicBlock reuses its ReLU
    with pytest.raises(CxrExplainError, match="not a spatial map"):
        explain(checked, x, "gradcam", target=0, layer="net.avgpool")  # 1×1
    with pytest.raises(ValueError, match="square"):  # the model's own error, hooks still removed
        explain(checked, images(1, 64, dtype=F64)[..., :32], "gradcam", target=0)
    assert no_hooks_left(checked)


class TwoOutputs(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        if x.shape[-1] != x.shape[-2]:
            raise ValueError("square images only")
        y = self.net(x)
        return y, y


def test_a_model_returning_a_tuple_gets_a_clear_error(resnet):
    with pytest.raises(CxrExplainError, match="returns a tuple, not a tensor of logits"):
        explain(TwoOutputs(resnet), images(1, 64, dtype=F64), "gradient", target=0)


def test_softmax_functional_output_is_skipped_too():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 3)).to(F64)

    class SoftmaxOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            if x.shape[-1] != x.shape[-2]:
                raise ValueError("square")
            return self.net(x).softmax(1)

    x = images(2, 16, seed=14, dtype=F64)
    e = explain(SoftmaxOut(), x, "gradient", target=1)
    with torch.no_grad():
        assert torch.equal(e.logits, net(x))


def test_a_final_sigmoid_module_is_skipped_when_the_default_layer_is_searched(resnet):
    class SigmoidModule(Checked):
        def __init__(self, net):
            super().__init__(net)
            self.out = nn.Sigmoid()

        def forward(self, x):
            if x.shape[-1] != x.shape[-2]:
                raise ValueError("square images only")
            return self.out(self.net(x))

    x = images(2, 64, seed=16, dtype=F64)
    hooked = explain(SigmoidModule(resnet), x, "gradcam", target=[1, 2])
    traced = explain(Plain(resnet), x, "gradcam", target=[1, 2])
    assert torch.equal(hooked.raw_maps, traced.raw_maps) and torch.equal(hooked.logits, traced.logits)


# ------------------------------------------------------------------ layouts


class SquareMap(nn.Module):
    """A (B, 16, 16, 16) map at 64 px: reads as channels-first and as channels-last alike."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, stride=4)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        a = torch.relu(self.conv(x))
        return self.head(a.mean((2, 3)))


@pytest.mark.parametrize("wrap", [lambda m: m, Checked], ids=["traced", "hooks"])
def test_an_ambiguous_map_is_refused_not_guessed(wrap):
    torch.manual_seed(0)
    model = wrap(SquareMap())
    with pytest.raises(CxrExplainError, match=r"reads as several layouts \(channels-first.*channels-last.*pass layer="):
        explain(model, images(1, 64), "gradcam", target=0)


def test_convnext_gradcam_is_a_spatial_map_of_the_last_stage_not_a_layernorm_vector():
    """Regression: the permuted LayerNorm after torchvision ConvNeXt's pool gave a (B, 1, 768) 'map'."""
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(num_classes=4).eval()
    x = images(2, 64, seed=15)
    e = explain(model, x, "gradcam", target=1)
    assert e.raw_maps.shape == (2, 2, 2) and e.feature_layout == "channels-first" and e.feature_layer == "features"
    named = explain(model, x, "gradcam", target=1, layer="features.7.2.block.2")  # a block's LayerNorm
    assert named.raw_maps.shape == (2, 2, 2) and named.feature_layout == "channels-last"
    # the container resolves to its output (the residual add), not to the last module inside it
    assert torch.equal(explain(model, x, "gradcam", target=1, layer="features.7").raw_maps, e.raw_maps)


def test_layout_readings():
    image = (224, 224)
    assert readings((1, 2048, 7, 7), image) == [Layout("channels-first", (7, 7), 2048)]
    assert readings((1, 7, 7, 768), image) == [Layout("channels-last", (7, 7), 768)]
    assert readings((1, 197, 768), image) == [Layout("tokens", (14, 14), 768, 1)]  # class token found
    assert readings((1, 196, 768), image, prefix_tokens=0) == [Layout("tokens", (14, 14), 768, 0)]
    assert readings((1, 64, 56, 56), image) == [Layout("channels-first", (56, 56), 64)]
    assert readings((1, 1, 1, 768), image) == [] and readings((1, 768, 1, 1), image) == []
    assert readings((1, 12, 197, 64), image) == []  # attention heads are not a map
    t = torch.arange(2 * 5 * 3, dtype=torch.float64).reshape(2, 5, 3)  # 1 prefix token, 2×2 grid, 3 channels
    nchw = Layout("tokens", (2, 2), 3, 1).to_nchw(t)
    assert nchw.shape == (2, 3, 2, 2) and torch.equal(nchw[1, 2, 1, 0], t[1, 1 + 2, 2])
    with pytest.raises(CxrExplainError, match="several layouts.*model.num_prefix_tokens"):
        layout_of("blocks.0", (1, 17, 384), (64, 64))  # 1 + 4×4 or 8 + 3×3 tokens
    assert layout_of("blocks.0", (1, 17, 384), (64, 64), prefix_tokens=1).grid == (4, 4)
