"""The rules for modern CNN ops (docs/rules.md §9), each against an independent dense-matrix
reference: the layer written as an explicit matrix (built by PyTorch's own forward on basis vectors,
or its autograd Jacobian), the rule's formula written directly with numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from dense import sdiv
import torch.nn as nn
import torch.nn.functional as F

from cxr_explain.attribution import rules as R
from cxr_explain.attribution.graph import ForwardRecord, LayerNode, record_forward, trace
from cxr_explain.attribution.rules.base import carries_data

F64 = torch.float64


# ------------------------------------------------------------------------------------------
# Independent references
# ------------------------------------------------------------------------------------------




def conv_dense(conv: nn.Module, in_shape, weight=None) -> np.ndarray:
    """The bias-free map of a Conv1d/Conv2d as a matrix, from PyTorch's own forward (string padding,
    groups and dilation as PyTorch applies them) on basis vectors."""
    n = int(np.prod(in_shape))
    basis = torch.eye(n, dtype=F64).reshape(n, *in_shape)
    with torch.no_grad():
        out = conv._conv_forward(basis, conv.weight if weight is None else weight, None)
    return out.reshape(n, -1).T.numpy()


def jacobian_dense(fn, x: torch.Tensor) -> np.ndarray:
    """(out, in) Jacobian of ``fn`` at ``x`` (one sample), from autograd."""
    J = torch.autograd.functional.jacobian(fn, x)
    return J.reshape(fn(x).numel(), x.numel()).numpy()


def ref_z(contrib: np.ndarray, Rout: np.ndarray) -> np.ndarray:
    """``R_i = Σ_j contrib_ji R_j / Σ_i contrib_ji`` (safe)."""
    return (contrib * sdiv(Rout, contrib.sum(1))[:, None]).sum(0)


def ref_zplus(M, x, Rout, fallback_A=None):
    """z⁺; with ``fallback_A`` (the connectivity: which inputs each output reads), an output j with a
    zero denominator gives R_j in equal parts to the non-zero inputs it reads, or if it reads none,
    to all the inputs it reads (docs/rules.md §9.6), one output at a time."""
    xp, xn = np.maximum(x, 0), np.minimum(x, 0)
    contrib = xp[None] * np.maximum(M, 0) + xn[None] * np.minimum(M, 0)
    out = ref_z(contrib, Rout)
    if fallback_A is not None:
        for j in np.flatnonzero(contrib.sum(1) == 0):
            reads = fallback_A[j] != 0
            active = reads & (x != 0)
            share = active if active.any() else reads
            out[share] += Rout[j] / share.sum()
    return out


def ref_epsilon(M, b, x, Rout, eps):
    z = M @ x + b
    return x * (M.T @ (Rout / (z + eps * np.where(z >= 0, 1.0, -1.0))))


def ref_zbox(M, x, Rout):
    l, h = x.min(), x.max()
    return ref_z(x[None] * M - l * np.maximum(M, 0) - h * np.minimum(M, 0), Rout)


def _rap_branch(M, xb, P, N, Rb, conv):
    """docs/rules.md §2.3 before the shift, for one branch (input magnitudes ``xb``), unit by unit."""
    Mp, Mn = np.maximum(M, 0), np.abs(np.minimum(M, 0))
    C = np.zeros_like(xb)
    for j in range(M.shape[0]):
        Rj, PNj = Rb[j], P[j] + N[j]
        m = float(PNj != 0)
        last = float(sdiv(Rj * sdiv(N[j], PNj), N[j]))
        if conv:
            g = Mp[j] * float(sdiv(max(Rj, 0), P[j])) * m + Mn[j] * float(sdiv(min(Rj, 0), N[j])) * m
        else:
            g = Mp[j] * float(sdiv(Rj, P[j])) * m
        C += xb * (g + Mn[j] * last)
    return C


def ref_rap(M, x, Rout, conv):
    """RAP's hidden rule with the signed-input branch as docs/rules.md §9.5 states it: R_j split
    between the a⁺ and |a⁻| branches by their total magnitudes, both branches summed, one shift."""
    xp, xn = np.maximum(x, 0), np.maximum(-x, 0)
    Mp, Mn = np.maximum(M, 0), np.abs(np.minimum(M, 0))
    P, N, Pn, Nn = Mp @ xp, Mn @ xp, Mp @ xn, Mn @ xn
    T = P + N + Pn + Nn
    C = _rap_branch(M, xp, P, N, Rout * sdiv(P + N, T), conv) + _rap_branch(M, xn, Pn, Nn, Rout * sdiv(Pn + Nn, T), conv)
    gamma = np.count_nonzero(C)
    delta = float(sdiv(C.sum() - Rout.sum(), gamma))
    return np.where(C != 0, C - delta, 0.0)


def ref_proportional(M, x, Rout):
    return x * (M.T @ sdiv(Rout, M @ x))


# ------------------------------------------------------------------------------------------
# Applying a rule to one layer / one traced node
# ------------------------------------------------------------------------------------------


def run_layer(rule, module, kind, x, Rout):
    """A rule at a lone Conv/Linear module (target and batch axes of size 1)."""
    node = LayerNode(0, "layer", kind, "hidden", type(module).__name__, fx_node=None, module=module,
                     module_path="layer")
    with torch.no_grad():
        out = module(x)
        step = R.Step(node, [x], out, ForwardRecord({}, {}), 1, {})
        return rule.backward(step, Rout.unsqueeze(0))[0][0, 0]


def step_at(model: nn.Module, x: torch.Tensor, name: str, k: int = 1) -> R.Step:
    """The Step the engine would build at node ``name`` (or the first node of that kind) of ``model``."""
    traced = trace(model)
    with torch.no_grad():
        record = record_forward(traced, x)
    node = traced.by_name.get(name) or next(n for n in traced.nodes if n.kind == name)
    ins = [n for n in node.inputs if carries_data(record.values[n.name])]
    return R.Step(node, [record.values[n.name] for n in ins], record.values[node.name], record, k, {},
                  input_nodes=ins)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ------------------------------------------------------------------------------------------
# Convolutions: depthwise, grouped, dilated, strided, "same" padding, Conv1d
# ------------------------------------------------------------------------------------------

CONVS = {
    "depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (4, 6, 6)),
    "depthwise-stride2": (lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), (4, 7, 7)),
    "depthwise-multiplier2": (lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3), (3, 5, 5)),
    "same-even-depthwise": (lambda: nn.Conv2d(3, 3, 4, padding="same", groups=3), (3, 6, 6)),
    "grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 5, 5)),
    "grouped-stride2-5x5": (lambda: nn.Conv2d(6, 4, 5, stride=2, padding=2, groups=2), (6, 7, 7)),
    "dilated": (lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2), (3, 7, 7)),
    "same-even-kernel": (lambda: nn.Conv2d(3, 4, 4, padding="same"), (3, 6, 6)),
    "same-dilated-depthwise": (lambda: nn.Conv2d(3, 3, 3, padding="same", dilation=3, groups=3), (3, 7, 7)),
    "valid": (lambda: nn.Conv2d(3, 2, 3, padding="valid"), (3, 5, 5)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (3, 9)),
    "conv1d-depthwise-stride2": (lambda: nn.Conv1d(4, 4, 5, stride=2, padding=2, groups=4), (4, 11)),
    "conv1d-same-even": (lambda: nn.Conv1d(2, 3, 4, padding="same"), (2, 9)),
}


def _conv_case(name, rng, signed=True):
    torch.manual_seed(hash(name) % 1000)
    make, in_shape = CONVS[name]
    conv = make().to(F64)
    nn.init.uniform_(conv.bias, -0.5, 0.5)
    x = torch.tensor(rng.normal(size=(1, *in_shape)))
    if not signed:
        x = torch.relu(x)
    with torch.no_grad():
        out_shape = conv(x).shape[1:]
    Rout = torch.tensor(rng.normal(size=(1, *out_shape)))
    return conv, x, Rout, conv_dense(conv, in_shape)


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_linear_map_and_its_transpose_equal_the_dense_matrix(rng, name):
    conv, x, Rout, M = _conv_case(name, rng)
    node = LayerNode(0, "layer", "conv", "hidden", "Conv", fx_node=None, module=conv, module_path="layer")
    lm = R.LinearMap(conv, node)
    W2 = conv.weight.detach() ** 2
    s = torch.tensor(rng.normal(size=(3, *Rout.shape[1:])))  # N = 3 rows (targets × images)
    with torch.no_grad():
        np.testing.assert_allclose(lm.forward(x, conv.weight).flatten().numpy(), M @ x.flatten().numpy(), rtol=1e-12, atol=1e-12)
        back = lm.transpose_many(s, [conv.weight.detach(), W2], x.shape[1:])
    M2 = conv_dense(conv, x.shape[1:], W2)
    for i in range(3):
        np.testing.assert_allclose(back[0][i].flatten().numpy(), M.T @ s[i].flatten().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(back[1][i].flatten().numpy(), M2.T @ s[i].flatten().numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_lrp_rules_match_the_dense_references(rng, name):
    conv, x, Rout, M = _conv_case(name, rng)
    xf, Rf = x.flatten().numpy(), Rout.flatten().numpy()
    A = (conv_dense(conv, x.shape[1:], torch.ones_like(conv.weight)) != 0).astype(float)  # connectivity
    b = np.broadcast_to(conv.bias.detach().numpy().reshape(-1, *[1] * (x.dim() - 2)), Rout.shape[1:]).flatten()
    cases = {
        "z+": (R.zplus(), ref_zplus(M, xf, Rf)),
        "z+ flat fallback": (R.zplus("flat"), ref_zplus(M, xf, Rf, fallback_A=A)),
        "epsilon": (R.epsilon(0.1), ref_epsilon(M, b, xf, Rf, 0.1)),
        "zB": (R.zbox("safe"), ref_zbox(M, xf, Rf)),
        "flat": (R.flat(), ref_z(A, Rf)),
        "w2": (R.wsquare(), ref_z(M ** 2, Rf)),
    }
    for label, (rule, ref) in cases.items():
        ours = run_layer(rule, conv, "conv", x, Rout).flatten().numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-11, err_msg=f"{name}: {label}")


@pytest.mark.parametrize("groups", [3, 1])
def test_zplus_flat_fallback_matches_the_reference_and_conserves_where_plain_zplus_loses(rng, groups):
    conv = nn.Conv2d(3, 3, 3, padding=1, groups=groups, bias=False).to(F64)
    x = torch.relu(torch.tensor(rng.normal(size=(1, 3, 7, 7))))
    x[0, :, 2:7, 2:7] = 0  # windows with no non-zero input at all
    with torch.no_grad():
        conv.weight[0].clamp_(max=0)  # output channel 0 has no positive contribution anywhere
    Rout = torch.tensor(np.abs(rng.normal(size=(1, 3, 7, 7))))
    plain = run_layer(R.zplus(), conv, "conv", x, Rout)
    fb = run_layer(R.zplus("flat"), conv, "conv", x, Rout)
    assert float(plain.sum()) < float(Rout.sum()) - 1.0  # channel 0's relevance is lost
    assert abs(float(fb.sum() - Rout.sum())) < 1e-10
    A = (conv_dense(conv, x.shape[1:], torch.ones_like(conv.weight)) != 0).astype(float)
    ref = ref_zplus(conv_dense(conv, x.shape[1:]), x.flatten().numpy(), Rout.flatten().numpy(), fallback_A=A)
    np.testing.assert_allclose(fb.flatten().numpy(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("signed", [False, True])
def test_conv_rap_hidden_rule_matches_the_reference(rng, name, signed):
    conv, x, Rout, M = _conv_case(name, rng, signed=signed)
    ours = run_layer(R.RapHidden(), conv, "conv", x, Rout)
    ref = ref_rap(M, x.flatten().numpy(), Rout.flatten().numpy(), conv=True)
    np.testing.assert_allclose(ours.flatten().numpy(), ref, rtol=1e-9, atol=1e-11)
    assert abs(float(ours.sum() - Rout.sum())) < 1e-10  # one shift: Σ C = Σ R, not 2·Σ R
    assert torch.all(ours[x[0] == 0] == 0)


@pytest.mark.parametrize("signed", [False, True])
def test_linear_rap_hidden_rule_on_channels_last_input_matches_the_reference(rng, signed):
    torch.manual_seed(5)
    lin = nn.Linear(6, 5).to(F64)
    x = torch.tensor(rng.normal(size=(1, 3, 2, 6)))  # (B, H, W, C): ConvNeXt's pointwise layers
    if not signed:
        x = torch.relu(x)
    Rout = torch.tensor(rng.normal(size=(1, 3, 2, 5)))
    ours = run_layer(R.RapHidden(), lin, "linear", x, Rout)
    M = np.kron(np.eye(6), lin.weight.detach().numpy())  # the same Linear at each of the 6 positions
    ref = ref_rap(M, x.flatten().numpy(), Rout.flatten().numpy(), conv=False)
    np.testing.assert_allclose(ours.flatten().numpy(), ref, rtol=1e-9, atol=1e-11)


def test_signed_rap_reduces_to_the_authors_rule_on_nonnegative_input(rng):
    """On a ≥ 0 input the |a⁻| branch is empty: the signed formula is the authors' (docs/rules.md §2.3)."""
    from test_rap import ref_hidden

    conv, x, Rout, M = _conv_case("grouped", rng, signed=False)
    a = ref_rap(M, x.flatten().numpy(), Rout.flatten().numpy(), conv=True)
    b = ref_hidden(M, x.flatten().numpy(), Rout.flatten().numpy(), conv=True)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------
# LayerNorm / GroupNorm: σ-constant linear maps
# ------------------------------------------------------------------------------------------


class _TokenLN(nn.Module):  # (B, N, C) token layout
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(5)

    def forward(self, x):
        return self.norm(x)


class _ChannelsLastLN(nn.Module):  # ConvNeXt's LayerNorm2d: permute, F.layer_norm, permute
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(4) + 0.5)
        self.bias = nn.Parameter(torch.rand(4) - 0.5)

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), (4,), self.weight, self.bias, 1e-6).permute(0, 3, 1, 2)


class _MultiDimLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm((3, 4))

    def forward(self, x):
        return self.norm(x)


class _GN(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 6)

    def forward(self, x):
        return self.norm(x)


class _FunctionalGN(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        return F.group_norm(x, 4, self.weight, None, 1e-5)


NORMS = {  # model, input shape, node name
    "layernorm-tokens": (_TokenLN, (1, 3, 5), "norm"),
    "layernorm2d-channels-last": (_ChannelsLastLN, (1, 4, 2, 3), "layer_norm"),
    "layernorm-2-axes": (_MultiDimLN, (1, 2, 3, 4), "norm"),
    "groupnorm": (_GN, (1, 6, 2, 2), "norm"),
    "groupnorm-functional-no-bias": (_FunctionalGN, (1, 4, 3, 3), "group_norm"),
}


def _norm_dense(step: R.Step) -> tuple[np.ndarray, np.ndarray]:
    """(M, β) of the normalisation with σ held at its recorded value: the autograd Jacobian of
    ``x ↦ γ (x − μ(x)) / σ₀ + β`` for one sample, σ₀ computed separately from the recorded input."""
    node, x = step.node, step.x
    m = node.module
    if node.kind == "layernorm":
        ns = m.normalized_shape if m is not None else (x.shape[-1],)
        w = m.weight if m is not None else step.inputs[1]
        b = m.bias if m is not None else step.inputs[2]
        eps = m.eps if m is not None else 1e-6
        dims = tuple(range(x.dim() - len(ns), x.dim()))
        sigma0 = torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + eps).detach()

        def f(t):
            return w.detach() * (t - t.mean(dims, keepdim=True)) / sigma0 + b.detach()
    else:
        g = m.num_groups if m is not None else 4
        w = m.weight if m is not None else step.inputs[1]
        b = m.bias if m is not None else None
        eps = m.eps if m is not None else 1e-5
        xs = x.reshape(1, g, -1)
        sigma0 = torch.sqrt(xs.var(-1, unbiased=False, keepdim=True) + eps).detach()
        shape = (1, -1) + (1,) * (x.dim() - 2)

        def f(t):
            ts = t.reshape(1, g, -1)
            y = ((ts - ts.mean(-1, keepdim=True)) / sigma0).reshape(t.shape) * w.detach().view(shape)
            return y if b is None else y + b.detach().view(shape)
    M = jacobian_dense(f, x.detach())
    beta = f(torch.zeros_like(x)).detach().flatten().numpy()  # f is affine: f(0) = β
    return M, beta


def _norm_step(name, rng, k=1):
    torch.manual_seed(hash(name) % 1000)
    cls, shape, node = NORMS[name]
    model = cls().to(F64)
    for p in model.parameters():
        with torch.no_grad():
            p.copy_(torch.rand(p.shape, dtype=F64) * 2 - 0.5)  # some γ < 0 too
    x = torch.tensor(rng.normal(size=shape))
    return step_at(model, x, node, k)


@pytest.mark.parametrize("name", list(NORMS))
def test_norm_map_is_the_layer_with_sigma_held_constant(rng, name):
    step = _norm_step(name, rng)
    M, beta = _norm_dense(step)
    x = step.x.flatten().numpy()
    np.testing.assert_allclose(M @ x + beta, step.output.flatten().numpy(), rtol=1e-10, atol=1e-12)  # exact
    nm = R.NormMap(step)
    s = torch.tensor(rng.normal(size=(2, *step.x.shape[1:])))  # two targets' worth of rows
    mods = {"id": M, "pos": np.maximum(M, 0), "neg": np.minimum(M, 0), "negabs": np.abs(np.minimum(M, 0)),
            "abs": np.abs(M), "square": M ** 2, "ones": (M != 0).astype(float)}
    backs = nm.apply_t(step, s, list(mods), step.x.shape[1:])
    for (mod, Mg), back in zip(mods.items(), backs):
        np.testing.assert_allclose(nm.apply(step, step.x, mod).flatten().numpy(), Mg @ x, rtol=1e-10, atol=1e-12,
                                   err_msg=mod)
        for i in range(2):
            np.testing.assert_allclose(back[i].flatten().numpy(), Mg.T @ s[i].flatten().numpy(), rtol=1e-10,
                                       atol=1e-12, err_msg=mod)
    np.testing.assert_allclose(nm.preactivation(step).flatten().numpy(), M @ x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(NORMS))
def test_norm_rules_match_the_dense_references(rng, name):
    step = _norm_step(name, rng)
    M, beta = _norm_dense(step)
    x = step.x.flatten().numpy()
    Rout = torch.tensor(rng.normal(size=(1, 1, *step.output.shape[1:])))
    Rf = Rout.flatten().numpy()
    cases = {
        "z+": (R.zplus(), ref_zplus(M, x, Rf)),
        "epsilon": (R.epsilon(0.1), ref_epsilon(M, beta, x, Rf, 0.1)),
        "rap": (R.RapHidden(), ref_rap(M, x, Rf, conv=True)),
    }
    for label, (rule, ref) in cases.items():
        out = rule.backward(step, Rout)
        np.testing.assert_allclose(out[0].flatten().numpy(), ref, rtol=1e-9, atol=1e-11, err_msg=label)
    rap = R.RapHidden().backward(step, Rout)[0]
    assert abs(float(rap.sum() - Rout.sum())) < 1e-10


# ------------------------------------------------------------------------------------------
# Shape ops, reductions, products, constant additions
# ------------------------------------------------------------------------------------------


class _Op(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


SHAPE_OPS = {  # fn, input shape, node, rule
    "permute-method": (lambda x: x.permute(0, 2, 3, 1), (1, 2, 3, 4), "permute", R.Permute()),
    "permute-function": (lambda x: torch.permute(x, (0, 3, 1, 2)), (1, 2, 3, 4), "permute", R.Permute()),
    "transpose": (lambda x: x.transpose(1, -1), (1, 2, 3, 4), "transpose", R.Transpose()),
    "transpose-function": (lambda x: torch.transpose(x, 2, 1), (1, 2, 3, 4), "transpose", R.Transpose()),
    "expand": (lambda x: x.expand(-1, 3, -1, 4), (1, 1, 2, 1), "expand", R.Expand()),
    "getitem-slice": (lambda x: x[:, 1:, ::2], (1, 3, 5), "getitem", R.Rearrange()),
    "getitem-int-none-ellipsis": (lambda x: x[:, 0, None, ..., 1], (1, 3, 4, 5), "getitem", R.Rearrange()),
    "getitem-index-tensor-duplicates": (lambda x: x[:, [2, 0, 2]], (1, 3, 4), "getitem", R.Rearrange()),
    "pad": (lambda x: F.pad(x, (1, 2, 0, 1)), (1, 2, 3, 3), "pad", R.Rearrange(exact=False)),
}


@pytest.mark.parametrize("name", list(SHAPE_OPS))
def test_shape_ops_send_relevance_back_along_the_jacobian(rng, name):
    fn, shape, node, rule = SHAPE_OPS[name]
    x = torch.tensor(rng.normal(size=shape))
    step = step_at(_Op(fn), x, node, k=2)
    assert step.node.kind == node
    Rout = torch.tensor(rng.normal(size=(2, *step.output.shape)))
    ours = rule.backward(step, Rout)[0]
    J = jacobian_dense(fn, x)
    for k in range(2):
        np.testing.assert_allclose(ours[k].flatten().numpy(), J.T @ Rout[k].flatten().numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("split", ["chunk", "split", "unbind"])
def test_split_and_tuple_getitem_route_relevance_to_the_piece(rng, split):
    fns = {"chunk": lambda x: x.chunk(3, dim=1)[1], "split": lambda x: torch.split(x, [1, 3, 2], dim=2)[2],
           "unbind": lambda x: x.unbind(1)[0]}
    fn = fns[split]
    x = torch.tensor(rng.normal(size=(1, 3, 6)))
    traced = trace(_Op(fn))
    getitem = next(n for n in traced.nodes if n.kind == "getitem")
    piece = next(n for n in traced.nodes if n.kind == "split")
    Rout = torch.tensor(rng.normal(size=(1, *fn(x).shape)))
    r_tuple = R.Rearrange().backward(step_at(_Op(fn), x, getitem.name), Rout)[0]
    assert isinstance(r_tuple, tuple) and sum(r is not None for r in r_tuple) == 1
    r_in = R.Rearrange().backward(step_at(_Op(fn), x, piece.name), r_tuple)[0]
    np.testing.assert_allclose(r_in[0].flatten().numpy(), jacobian_dense(fn, x).T @ Rout[0].flatten().numpy())


REDUCTIONS = {
    "mean-spatial": (lambda x: x.mean((2, 3)), "mean"),
    "mean-keepdim": (lambda x: x.mean([2, 3], keepdim=True), "mean"),
    "sum-channels": (lambda x: torch.sum(x, 1), "sum"),
    "mean-tokens-negative-axis": (lambda x: torch.mean(x, dim=-2), "mean"),
}


@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_reductions_match_the_proportional_reference(rng, name):
    fn, node = REDUCTIONS[name]
    x = torch.tensor(rng.normal(size=(1, 3, 2, 4)))
    step = step_at(_Op(fn), x, node)
    Rout = torch.tensor(rng.normal(size=(1, *step.output.shape)))
    ours = R.Reduce().backward(step, Rout)[0]
    ref = ref_proportional(jacobian_dense(fn, x), x.flatten().numpy(), Rout.flatten().numpy())
    np.testing.assert_allclose(ours.flatten().numpy(), ref, rtol=1e-12, atol=1e-14)


def test_reduction_over_the_batch_axis_is_an_error(rng):
    from cxr_explain.errors import CxrExplainError

    step = step_at(_Op(lambda x: x.sum(0)), torch.tensor(rng.normal(size=(2, 3))), "sum")
    with pytest.raises(CxrExplainError, match="batch axis"):
        R.Reduce().backward(step, torch.ones(1, 3, dtype=F64))


class _SE(nn.Module):
    """torchvision's squeeze-excitation order (scale * input) and layer scale (γ * x)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Conv2d(3, 3, 1)
        self.gamma = nn.Parameter(torch.rand(3, 1, 1))

    def forward(self, x):
        s = torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))
        y = s * x
        return self.gamma * y


def test_gated_product_is_the_z_rule_with_the_gate_held_constant(rng):
    x = torch.tensor(rng.normal(size=(1, 3, 2, 2)))
    model = _SE().to(F64)
    traced = trace(model)
    gated = [n for n in traced.nodes if n.kind == "gated_mul"]
    assert len(gated) == 2
    with torch.no_grad():
        s = torch.sigmoid(model.fc(x.mean((2, 3), keepdim=True)))
    for node, gate in zip(gated, [s, model.gamma.detach()]):
        step = step_at(model, x, node.name)
        Rout = torch.tensor(rng.normal(size=(1, 1, 3, 2, 2)))
        out = R.GatedProduct().backward(step, Rout)
        signal = step.inputs[[n.data and n.name not in node.passive for n in step.input_nodes].index(True)]
        G = np.diag(np.broadcast_to(gate.numpy(), (1, 3, 2, 2)).flatten())
        ref = ref_proportional(G, signal.flatten().numpy(), Rout.flatten().numpy())  # = R where g·x ≠ 0
        got = [r for r in out if r is not None]
        assert len(got) == 1
        np.testing.assert_allclose(got[0].flatten().numpy(), ref, rtol=1e-12)


def test_uniform_product_and_constant_add(rng):
    a = torch.tensor(rng.normal(size=(1, 3, 4)))
    step = step_at(_Op(lambda x: x[:, :, :2] * x[:, :, 2:]), a, "mul")
    assert step.node.kind == "mul"
    Rout = torch.tensor(rng.normal(size=(1, 1, 3, 2)))
    ra, rb = R.UniformProduct().backward(step, Rout)
    assert torch.equal(ra, Rout / 2) and torch.equal(rb, Rout / 2)

    class PosEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.rand(1, 3, 4))

        def forward(self, x):
            return x + self.pos

    model = PosEmbed().to(F64)
    step = step_at(model, a, "add")
    assert step.node.kind == "constant_add"
    Rout = torch.tensor(rng.normal(size=(1, 1, 3, 4)))
    passed = R.ConstantAdd().backward(step, Rout)
    assert torch.equal(passed[0], Rout) and all(r is None for r in passed[1:])
    absorbed = R.ConstantAdd(absorb=True).backward(step, Rout)[0]
    ref = a.flatten().numpy() * Rout.flatten().numpy() / (a + model.pos).detach().flatten().numpy()
    np.testing.assert_allclose(absorbed.flatten().numpy(), ref, rtol=1e-12)
