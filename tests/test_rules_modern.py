"""The rules for modern CNN ops (docs/rules.md §9), each against an independent dense-matrix
reference: the layer written as an explicit matrix (built by PyTorch's own forward on basis vectors,
or its autograd Jacobian), the rule's formula written directly with numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cxr_explain.attribution import rules as R
from cxr_explain.attribution.graph import record_forward, trace
from cxr_explain.attribution.rules.base import carries_data

F64 = torch.float64


# ------------------------------------------------------------------------------------------
# Independent references
# ------------------------------------------------------------------------------------------


def sdiv(n, d):
    n, d = np.broadcast_arrays(np.asarray(n, float), np.asarray(d, float))
    out = np.zeros_like(n)
    nz = d != 0
    out[nz] = n[nz] / d[nz]
    return out


def jacobian_dense(fn, x: torch.Tensor) -> np.ndarray:
    """(out, in) Jacobian of ``fn`` at ``x`` (one sample), from autograd."""
    J = torch.autograd.functional.jacobian(fn, x)
    return J.reshape(fn(x).numel(), x.numel()).numpy()


def ref_proportional(M, x, Rout):
    return x * (M.T @ sdiv(Rout, M @ x))


# ------------------------------------------------------------------------------------------
# Applying a rule to one layer / one traced node
# ------------------------------------------------------------------------------------------


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
