"""The engine's memory plan changes no number: outputs no rule reads are recorded as their shape only
(:func:`~cxr_explain.attribution.propagation.unread_outputs`), and the maps stay bit-identical to the
ones computed from the full recorded forward."""
from __future__ import annotations

import pytest
import torch
from nets import build, images

import cxr_explain.attribution.propagation as engine
from cxr_explain.attribution import explain
from cxr_explain.attribution.graph import record_forward, trace
from cxr_explain.attribution.methods import get_method

METHODS = ["rap", "lrp", "rap-noshift", "lrp-a2b1", "lrp-epsilon", "lrp-zplus-flat"]


@pytest.fixture(scope="module")
def models():
    return {arch: build(arch, size=64) for arch in ("convnext_tiny", "efficientnet_b0", "resnet-tiny")}


def _full_record(monkeypatch):
    """Make the engine record every output (the behaviour without the plan)."""
    monkeypatch.setattr(engine, "unread_outputs", lambda traced, method: lambda node, values: False)


@pytest.mark.parametrize("arch", ["convnext_tiny", "efficientnet_b0", "resnet-tiny"])
def test_maps_are_bit_identical_to_the_full_record(models, arch, monkeypatch):
    model, x = models[arch], images(2, 64, seed=3)
    targets = [[0, 3], [1, 1]]  # two targets per image: relevance with K = 2
    planned = {m: explain(model, x, m, target=targets, return_input_relevance=True, check_conservation=False)
               for m in METHODS}
    _full_record(monkeypatch)
    for m in METHODS:
        full = explain(model, x, m, target=targets, return_input_relevance=True, check_conservation=False)
        assert torch.equal(planned[m].input_relevance, full.input_relevance), (arch, m)
        assert planned[m].leaks.keys() == full.leaks.keys()
        assert all(torch.equal(planned[m].leaks[k], full.leaks[k]) for k in full.leaks), (arch, m)


def _plan_record(model, x, method):
    traced = trace(model)
    rules = get_method(method).rule_map(traced)
    return traced, record_forward(traced, x, unread=engine.unread_outputs(traced, rules))


@pytest.mark.parametrize("method", ["rap", "lrp"])
def test_convnext_keeps_what_its_rules_read_and_only_the_shape_of_the_rest(models, method):
    model, x = models["convnext_tiny"], images(2, 64, seed=3)
    traced, record = _plan_record(model, x, method)
    full = record_forward(traced, x).values
    assert record.values.keys() == full.keys()
    for name, v in record.values.items():
        if isinstance(v, torch.Tensor) and v.is_meta:
            assert v.shape == full[name].shape and v.dtype == full[name].dtype, name
        elif isinstance(v, torch.Tensor):
            assert torch.equal(v, full[name]), name
    gelu = [n for n in traced.nodes if n.kind == "activation" and n.inputs and n.inputs[0].kind == "linear"]
    assert len(gelu) == 18  # one per block
    for act in gelu:
        assert record.values[act.inputs[0].name].is_meta  # the 4×-wide output only GELU's pass-through sees
        assert not record.values[act.name].is_meta  # GELU's output: the next linear layer's input
        assert not record.values[act.inputs[0].inputs[0].name].is_meta  # the layer's own (LayerNorm) input
    assert not record.values[traced.logits.name].is_meta and not record.values[traced.input.name].is_meta
    n_meta = sum(isinstance(v, torch.Tensor) and v.is_meta for v in record.values.values())
    assert n_meta >= 2 * 18  # also the layer-scale products and the second linear layers' outputs


@pytest.mark.parametrize("act, rap_reads", [(torch.nn.ReLU, True), (torch.nn.Tanh, False)])
def test_rap_reads_a_layer_output_only_for_a_nonnegative_input(act, rap_reads):
    """RAP's non-negative branch needs z = W x (its N = P − z), its signed branch does not; z⁺
    recomputes z from the input. The hidden conv's output is read by no other rule (a pass-through)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), act(), torch.nn.Conv2d(4, 5, 3), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(5, 3)).eval()
    x = images(2, 16, seed=3)
    traced, rap = _plan_record(model, x, "rap")
    hidden = traced.find("2")
    assert hidden.kind == "conv" and hidden.role == "hidden"
    assert rap.values[hidden.name].is_meta is not rap_reads
    _, lrp = _plan_record(model, x, "lrp")
    assert lrp.values[hidden.name].is_meta
    for m in ("rap", "lrp"):
        assert torch.isfinite(explain(model, x, m, target=0, check_conservation=False).maps).all()


# ------------------------------------------------------------------------------------------
# RAP's signed branch, arranged for memory: the same numbers as the formula written out
# ------------------------------------------------------------------------------------------


def _inv(d):
    return torch.reciprocal(d).masked_fill_(d == 0, 0)


def _signed_formula(lm, step, R, conv):
    """RAP's signed-input branch before the shift (docs/rules.md §9.5), every map kept alive."""
    x, k = step.x, R.shape[0]
    xp, xn = x.clamp(min=0), (-x).clamp_(min=0)
    P, N = lm.apply(step, xp, "pos"), lm.apply(step, xp, "negabs")
    Pn, Nn = lm.apply(step, xn, "pos"), lm.apply(step, xn, "negabs")
    mag_p, mag_n = P + N, Pn + Nn
    u = R * _inv(mag_p + mag_n)

    def slots(Rb, p, n):
        if conv:
            return Rb.clamp(min=0).mul_(_inv(p)), Rb.clamp(max=0).mul_(_inv(n)).add_(u)
        return Rb * _inv(p), u

    s1, s2 = slots(u * mag_p, P, N)
    s3, s4 = slots(u * mag_n, Pn, Nn)
    n = s1.shape[0] * s1.shape[1]
    merge = lambda t: t.reshape(-1, *t.shape[2:])  # noqa: E731
    g = lm.apply_t(step, torch.cat([merge(s1), merge(s3)]), ["pos"], x.shape[1:])[0]
    g += lm.apply_t(step, torch.cat([merge(s2), merge(s4)]), ["negabs"], x.shape[1:])[0]
    C = xp.unsqueeze(0) * g[:n].reshape(k, -1, *g.shape[1:])
    return C.addcmul_(xn.unsqueeze(0), g[n:].reshape(k, -1, *g.shape[1:]))


SIGNED_LAYERS = {
    "linear-channels-last": (lambda: torch.nn.Linear(8, 24), (2, 5, 5, 8)),
    "conv-grouped": (lambda: torch.nn.Conv2d(8, 12, 3, padding=1, groups=2), (2, 8, 6, 6)),
    "layernorm": (lambda: torch.nn.LayerNorm(8), (2, 5, 5, 8)),
}


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("name", list(SIGNED_LAYERS))
def test_rap_signed_branch_is_bit_identical_to_the_formula(name, k):
    from cxr_explain.attribution.rules import RapHidden, Step, linear_map

    torch.manual_seed(5)
    make, shape = SIGNED_LAYERS[name]
    layer = make().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-1, 1)
    x = torch.randn(shape)
    x[..., :2] = 0  # whole input channels at 0: zero forward maps, the safe divisions' masks
    model = torch.nn.Sequential(layer)
    traced = trace(model)
    with torch.no_grad():
        record = record_forward(traced, x)
        node = next(n for n in traced.nodes if n.module is layer)
        out = record.values[node.name]
        R = torch.randn(k, *out.shape)
        R[..., -1] = 0

        def step():
            return Step(node, [x], out, record, k, {}, input_nodes=[traced.input])

        ours = RapHidden(shift=False).backward(step(), R.clone())[0]
        s = step()
        lm = linear_map(s)
        ref = _signed_formula(lm, s, R.clone(), lm.rap_conv_form)
    assert torch.equal(ours, ref)


def test_modified_weights_are_kept_between_calls_only_for_layers_applied_at_few_positions():
    """W⁺ / W⁻ of a convolution applied at 2·12·12 positions are rebuilt per call (no memory held
    between calls or at the peak); the dense head's (2 positions) stay cached. Same maps either way."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(5, 3)).eval()
    x = images(2, 16, seed=3)
    first = explain(model, x, "lrp", target=0, check_conservation=False).maps
    traced = trace(model)
    cached = {key[0] for key in traced.weight_cache if len(key) == 2}
    assert cached == {traced.find("6").name}  # the head only; the hidden conv "2" is not kept
    assert torch.equal(explain(model, x, "lrp", target=0, check_conservation=False).maps, first)
