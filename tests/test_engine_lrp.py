"""The propagation engine with the reference LRP-α1β0: conservation, zennit agreement, batching."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from nets import build, images
from zennit.attribution import Gradient
from zennit.composites import SpecialFirstLayerMapComposite, layer_map_base
from zennit.rules import AlphaBeta, Epsilon, Flat, ZBox, ZPlus
from zennit.torchvision import ResNetBottleneckCanonizer
from zennit.types import Convolution

from cxr_explain.attribution.graph import clear_trace_caches
from cxr_explain.attribution import explain
from cxr_explain.errors import CxrExplainError, UnsupportedOpError

F64 = torch.float64
ARCHS = ["vgg16", "vgg16_bn", "resnet18", "resnet50", "densenet121"]


@pytest.mark.parametrize("arch", ARCHS)
def test_lrp_conserves_the_logit_in_float64(models64, arch):
    model = models64(arch)
    x = images(2, 64, dtype=F64)
    e = explain(model, x, "lrp", target=[1, 4])
    sums = e.maps.flatten(1).sum(1)
    rel = (sums - e.explained).abs() / e.explained.abs()
    assert rel.max() < 1e-5, (arch, sums, e.explained)
    assert torch.isfinite(e.maps).all()
    assert e.maps.shape == (2, 64, 64)
    # the logit really is the model's output
    torch.testing.assert_close(e.explained, model(x)[torch.arange(2), torch.tensor([1, 4])])


def _zennit_lrp(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """zennit's composite matched to the authors' LRP (docs/rules.md §6), batch of one."""
    clear_trace_caches()  # our cached W⁺ copies are not needed while zennit makes its own
    rule = AlphaBeta(1.0, 0.0, stabilizer=1e-13, zero_params=["bias"])
    composite = SpecialFirstLayerMapComposite(
        layer_map=layer_map_base(1e-13) + [(Convolution, rule), (nn.Linear, rule)],
        first_map=[(Convolution, ZBox(x.min(), x.max(), stabilizer=1e-13))],
        canonizers=[ResNetBottleneckCanonizer()],
    )
    with Gradient(model, composite) as attributor:
        _, rel = attributor(x, lambda out: out * F.one_hot(torch.tensor([target]), out.shape[1]).to(out))
    return rel.sum(1)[0]


def test_lrp_negative_logit_target_conserves(models64):
    model = models64("resnet50")
    x = images(1, 32, seed=5, dtype=F64)
    logits = model(x)[0]
    t = int(logits.argmin())
    assert logits[t] < 0
    e = explain(model, x, "lrp", target=t)
    assert abs(float(e.maps.sum()) - float(logits[t])) < 1e-5 * abs(float(logits[t].detach()))
    ref = _zennit_lrp(model, x, t)
    assert ((e.maps[0] - ref).abs().max() / ref.abs().max()) < 1e-6


@pytest.mark.parametrize("method", ["lrp", "rap", "gradient-x-input", "gradcam", "cam"])
def test_batch_equals_single_calls_and_target_lists_equal_separate_calls(method):
    model = build("resnet18", size=32).to(F64)
    x = images(3, 32, seed=7, dtype=F64)
    batch = explain(model, x, method, target=[0, 2, 5])
    for i, t in enumerate([0, 2, 5]):
        single = explain(model, x[i:i + 1], method, target=t)
        torch.testing.assert_close(batch.maps[i], single.maps[0], rtol=1e-9, atol=1e-12)
    lists = explain(model, x, method, target=[[0, 1], [2, 3], [5, 4]])
    assert lists.maps.shape == (3, 2, 32, 32)
    for j, per_image in enumerate([[0, 2, 5], [1, 3, 4]]):
        separate = explain(model, x, method, target=per_image)
        torch.testing.assert_close(lists.maps[:, j], separate.maps, rtol=1e-9, atol=1e-12)


def test_ragged_target_lists_are_padded():
    model = build("resnet18", size=64)
    x = images(2, 64)
    e = explain(model, x, "lrp", target=[[1, 2, 3], [4]])
    assert e.targets.tolist() == [[1, 2, 3], [4, -1, -1]]
    assert torch.all(e.maps[1, 1:] == 0)
    assert torch.isnan(e.explained[1, 1:]).all()
    single = explain(model, x[1:], "lrp", target=4)
    torch.testing.assert_close(e.maps[1, 0], single.maps[0], rtol=1e-4, atol=1e-6)


def test_deterministic_on_cpu():
    model = build("densenet121", size=32)
    x = images(2, 32)
    a = explain(model, x, "lrp", target="predicted").maps
    b = explain(model, x, "lrp", target="predicted").maps
    assert torch.equal(a, b)


def test_float32_default_and_float64_on_request():
    model = build("resnet18", size=64)
    x = images(1, 64)
    e32 = explain(model, x, "lrp", target=1)
    e64 = explain(model, x, "lrp", target=1, dtype=F64)
    assert e32.maps.dtype == torch.float32 and e64.maps.dtype == F64
    assert next(model.parameters()).dtype == torch.float32  # the user's model is not converted
    corr = torch.corrcoef(torch.stack([e32.maps.flatten().double(), e64.maps.flatten()]))[0, 1]
    assert corr > 0.999


def test_leaks_name_the_layer_and_amount_that_a_rule_lost():
    """A class whose classifier row is ≤ 0 has z⁺ = 0 at every head unit: z⁺ loses the whole logit
    there and nothing anywhere else; another class loses nothing."""
    model = build("resnet18", size=64).to(F64)
    with torch.no_grad():
        model.fc.weight[2].clamp_(max=0)
    x = images(1, 64, dtype=F64)
    with pytest.warns(RuntimeWarning, match=r"arises at fc \(linear, 1 of the explained output lost\): .*bias"):
        lost = explain(model, x, "lrp", target=2)
    assert float(lost.maps.abs().max()) == 0.0
    torch.testing.assert_close(lost.leaks["fc"][0], lost.explained[0])
    assert all(float(v.abs().max()) == 0.0 for n, v in lost.leaks.items() if n != "fc")
    kept = explain(model, x, "lrp", target=1)
    assert abs(float(kept.layer_sums["fc"][0]) - float(kept.explained[0])) < 1e-12
    assert max(float(v.abs().max()) for v in kept.leaks.values()) < 1e-9 * abs(float(kept.explained[0]))


def test_zero_denominators_option_spreads_what_z_plus_loses():
    """docs/rules.md §9.6: 'flat' sends the relevance of zero-denominator units on (here the whole
    logit of a class whose classifier row is ≤ 0) and conserves; 'auto' is the authors' z⁺ on ResNet."""
    model = build("resnet18", size=64).to(F64)
    with torch.no_grad():
        model.fc.weight[2].clamp_(max=0)
    x = images(1, 64, dtype=F64)
    flat = explain(model, x, "lrp", target=2, zero_denominators="flat")
    assert abs(float(flat.maps.sum()) - float(flat.explained[0])) < 1e-9 * abs(float(flat.explained[0]))
    assert float(flat.leaks["fc"].abs().max()) < 1e-12
    with pytest.warns(RuntimeWarning, match="arises at fc"):
        auto = explain(model, x, "lrp", target=2)
    assert float(auto.maps.abs().max()) == 0.0
    kept = explain(model, x, "lrp", target=1, zero_denominators="flat")  # no zero denominators: unchanged
    torch.testing.assert_close(kept.maps, explain(model, x, "lrp", target=1).maps, rtol=0, atol=0)
    with pytest.raises(CxrExplainError, match="zero_denominators='spread'"):
        explain(model, x, "lrp", target=1, zero_denominators="spread")


class _InPlaceNet(nn.Module):
    """Functional ops, in-place ReLU and ``+=``, fan-out and cat, a sigmoid at the end."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 1)  # wide enough that no channel has only negative weights
        self.fc = nn.Linear(48, 3)

    def forward(self, x):
        h = F.relu(self.conv(x), inplace=True)
        y = self.a(h)
        y += self.b(h)
        y = F.relu(y, inplace=True)
        z = torch.cat([y, h, F.max_pool2d(h, 3, 1, 1)], 1)
        z = F.adaptive_avg_pool2d(z, 1)
        return torch.sigmoid(self.fc(torch.flatten(z, 1)))


def test_functional_inplace_model_conserves_and_explains_logits():
    torch.manual_seed(0)
    model = _InPlaceNet().to(F64)
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    e = explain(model, x, "lrp", target=[0, 1])
    # logits, not probabilities (the sigmoid is skipped)
    logits = torch.logit(model(x))
    torch.testing.assert_close(e.explained, logits[torch.arange(2), torch.tensor([0, 1])])
    # what the map lacks was lost where z⁺ has zero denominators: at the convolutions' output units
    # whose positive part Σ x⁺W⁺ is 0 (one channel of each made all-negative here), computed
    # independently of the engine's bookkeeping
    with torch.no_grad():
        model.a.weight[0].clamp_(max=0)
        model.b.weight[1].clamp_(max=0)
    with pytest.warns(RuntimeWarning, match=r"arises at [ab] \(conv, "):
        e = explain(model, x, "lrp", target=[0, 1], keep_relevance=["a", "b"])
    h = F.relu(model.conv(x))
    for name, conv in (("a", model.a), ("b", model.b)):
        zplus = F.conv2d(h, conv.weight.clamp(min=0), None, conv.stride, conv.padding)
        expected = (e.relevances[name] * (zplus == 0)).flatten(1).sum(1)
        torch.testing.assert_close(e.leaks[name], expected, rtol=1e-9, atol=1e-12)
    missing = e.explained - e.maps.flatten(1).sum(1)
    assert ((e.leaks["a"] + e.leaks["b"]).abs() > 1e-4 * e.explained.abs()).all()  # a real loss
    torch.testing.assert_close(missing, e.leaks["a"] + e.leaks["b"], rtol=1e-6, atol=1e-9)


class _Softsign(nn.Module):
    def forward(self, x):
        return x / (1 + x.abs())


class _UnsupportedNet(nn.Module):
    """Ops without a rule: a module (Softshrink), a function (torch.exp), and inside a module that
    torch.fx traces through a method (abs) and a quotient of two data tensors."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.Softshrink()
        self.soft = _Softsign()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.soft(torch.exp(self.act(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def test_unknown_ops_are_one_error_naming_every_node():
    with pytest.raises(UnsupportedOpError) as err:
        explain(_UnsupportedNet(), torch.randn(1, 3, 8, 8), "lrp", target=0)
    msg = str(err.value)
    assert "\n" not in msg
    assert "node 'act' (op Softshrink, module act, kind unknown)" in msg
    assert "node 'exp' (op exp, kind unknown)" in msg
    assert "(op abs, in soft, kind unknown)" in msg and "(op truediv, in soft, kind unknown)" in msg
    assert "no rule for 4 node(s)" in msg
    assert "still work on this model: gradient, gradient-x-input, integrated-gradients, cam, gradcam" in msg
    # gradient methods need no rules
    assert explain(_UnsupportedNet(), torch.randn(1, 3, 8, 8), "gradient", target=0).maps.shape == (1, 8, 8)


@pytest.mark.parametrize("target, message", [
    ([1, 2, 3], "3 targets for 2 images"),
    (9, "out of range"),
    ("Nodule", "no label names"),
])
def test_bad_targets_are_one_line_errors(target, message):
    model = build("resnet18", size=32)
    with pytest.raises(CxrExplainError, match=message):
        explain(model, images(2, 32), "lrp", target=target)


def test_unknown_method_suggests_close_names():
    with pytest.raises(CxrExplainError, match="did you mean rap"):
        explain(build("resnet18", size=32), images(1, 32), "rapp")


def test_label_names_are_targets():
    model = build("resnet18", num_classes=3, size=32)
    model.labels = ["Atelectasis", "Cardiomegaly", "Effusion"]
    e = explain(model, images(1, 32), "lrp", target="cardiomegaly")
    assert int(e.targets) == 1
    with pytest.raises(CxrExplainError, match="did you mean 'Effusion'"):
        explain(model, images(1, 32), "lrp", target="Efusion")


def _zennit(model: nn.Module, x: torch.Tensor, target: int, hidden_conv, hidden_linear, first, canonizers=()):
    """zennit's relevance for one image: ``hidden_*`` rules on Conv / Linear layers, ``first`` on the
    first convolution, its base map elsewhere (ReLU and BN pass, pools and ``+`` z-rule)."""
    clear_trace_caches()
    composite = SpecialFirstLayerMapComposite(
        layer_map=layer_map_base(1e-13) + [(Convolution, hidden_conv), (nn.Linear, hidden_linear)],
        first_map=[(Convolution, first)], canonizers=list(canonizers))
    with Gradient(model, composite) as attributor:
        _, rel = attributor(x, lambda out: out * F.one_hot(torch.tensor([target]), out.shape[1]).to(out))
    return rel.sum(1)[0]


def _composite_refs(x):
    """Our composite -> zennit's matching rules (biases zeroed where ours exclude them)."""
    nb = ["bias"]
    zbox = ZBox(x.min(), x.max(), stabilizer=1e-13, zero_params=nb)
    return {  # lrp: the authors' LRP-α1β0 (hidden biases out, zᴮ with its bias first), docs/rules.md §6
        "lrp": (AlphaBeta(1.0, 0.0, 1e-13, zero_params=nb), AlphaBeta(1.0, 0.0, 1e-13, zero_params=nb),
                ZBox(x.min(), x.max(), stabilizer=1e-13)),
        "lrp-epsilon": (Epsilon(0.25), Epsilon(0.25), zbox),
        "lrp-epsilon-plus": (ZPlus(1e-13, zero_params=nb), Epsilon(0.25), zbox),
        "lrp-zplus-flat": (ZPlus(1e-13, zero_params=nb), ZPlus(1e-13, zero_params=nb), Flat(1e-13)),
        "lrp-a2b1": (AlphaBeta(2.0, 1.0, 1e-13, zero_params=nb), AlphaBeta(2.0, 1.0, 1e-13, zero_params=nb), zbox),
    }


@pytest.mark.parametrize("arch", ["vgg16", "resnet50"])
def test_every_lrp_composite_equals_zennits_matching_composite(models64, arch):
    model = models64(arch)
    x = images(1, 32, seed=5, dtype=F64)
    canonizers = [ResNetBottleneckCanonizer()] if arch.startswith("resnet") else []
    for method, (conv, lin, first) in _composite_refs(x).items():
        ours = explain(model, x, method, target=2, check_conservation=False).maps[0]
        ref = _zennit(model, x, 2, conv, lin, first, canonizers)
        err = float((ours - ref).abs().max() / ref.abs().max())
        assert err < 1e-6, (arch, method, err)


class _DenseNetHead(nn.Module):
    """torchvision's DenseNet with its functional head (F.relu, adaptive_avg_pool2d, flatten) as
    modules: the canonizer zennit needs to apply its rules there (same logits)."""

    def __init__(self, densenet: nn.Module):
        super().__init__()
        self.features, self.classifier = densenet.features, densenet.classifier
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.classifier(self.head(self.features(x)))


def test_lrp_on_densenet121_equals_zennit_with_a_densenet_canonizer(models64):
    dense = models64("densenet121")
    model = _DenseNetHead(dense).eval()
    x = images(1, 32, seed=6, dtype=F64)
    torch.testing.assert_close(model(x), dense(x))
    ours = explain(dense, x, "lrp", target=4).maps[0]  # on torchvision's own model
    rule = AlphaBeta(1.0, 0.0, stabilizer=1e-13, zero_params=["bias"])
    ref = _zennit(model, x, 4, rule, rule, ZBox(x.min(), x.max(), stabilizer=1e-13))
    assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-6


def test_epsilon_absorbs_relevance_in_its_stabiliser_and_conserves_as_it_vanishes():
    """LRP-ε: z + ε·sign(z) keeps |Σ R_in| ≤ |Σ R_out| per layer, so a larger ε loses more; on a network
    without biases it tends to LRP-0 and conserves as ε → 0 (zᴮ conserves on the first layer)."""
    model = build("resnet18", size=32).to(F64)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.zero_()
            if isinstance(m, nn.BatchNorm2d):  # BN passes relevance; an affine-free BN keeps z exact
                m.bias.zero_()
                m.running_mean.zero_()
    x = images(1, 32, dtype=F64)
    errs = []
    for eps in (1e-9, 1e-3, 1.0, 100.0):
        e = explain(model, x, "lrp-epsilon", target=1, epsilon=eps)
        errs.append(abs(float(e.maps.sum() - e.explained)) / abs(float(e.explained)))
    assert errs[0] < 1e-6
    assert errs[0] < errs[1] < errs[2] < errs[3]
    flat = explain(model, x, "lrp-zplus-flat", target=1)
    assert abs(float(flat.maps.sum() - flat.explained)) < 1e-6 * abs(float(flat.explained))
