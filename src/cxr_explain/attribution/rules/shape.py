"""Rules for ops that only move, select or replicate entries (docs/rules.md §9.1): the relevance
goes back along the same entries, ``R_in = Jᵀ R`` with ``J`` the op's 0/1 Jacobian.

For a pure rearrangement (permute, transpose, chunk, split, selecting getitem) every output entry is
one input entry and this is exact. For a replication (expand, broadcast) an input entry receives
the sum over its copies, which the z-rule gives too (``x_i Σ_j R_j / z_j`` with ``z_j = x_i``).
For zero padding the relevance of the padded border has no input to go to: it is reported as a leak
(it is zero whenever the next rule multiplies by its input, as all of ours do).
"""
from __future__ import annotations

import torch

from ...errors import CxrExplainError
from ..graph import LayerNode, rerun
from .base import Rule, Tensor


def _method_args(node: LayerNode) -> tuple[tuple, dict]:
    """The operands after ``self`` / the tensor (works for ``x.m(…)`` and ``torch.m(x, …)``)."""
    fx_node = node.fx_node
    return tuple(fx_node.args[1:]), dict(fx_node.kwargs)


def permutation(node: LayerNode, ndim: int) -> list[int]:
    """The ``dims`` of a permute node (function, method or torchvision's ``Permute`` module)."""
    if node.module is not None:
        dims = list(node.module.dims)
    else:
        args, kwargs = _method_args(node)
        if "dims" in kwargs:
            dims = list(kwargs["dims"])
        elif len(args) == 1 and isinstance(args[0], (tuple, list)):
            dims = list(args[0])
        else:
            dims = list(args)
    if len(dims) != ndim or not all(isinstance(d, int) for d in dims):
        raise CxrExplainError(f"cannot read the permutation of node {node!r}")
    return [d % ndim for d in dims]


class Permute(Rule):
    """``y = x.permute(p)``: ``R_in = R.permute(p⁻¹)`` (exact)."""

    name = "permute"
    exact = True
    reads_values = False  # the input's shape only

    def backward(self, step, R):
        n = step.x.dim()
        dims = permutation(step.node, n)
        inv = [0] * n
        for i, d in enumerate(dims):
            inv[d] = i
        return [R.permute(0, *[i + 1 for i in inv])]


class Transpose(Rule):
    """``y = x.transpose(a, b)``: ``R_in = R.transpose(a, b)`` (exact)."""

    name = "transpose"
    exact = True
    reads_values = False  # the input's shape only

    def backward(self, step, R):
        args, kwargs = _method_args(step.node)
        a = kwargs.get("dim0", args[0] if args else None)
        b = kwargs.get("dim1", args[1] if len(args) > 1 else None)
        if not isinstance(a, int) or not isinstance(b, int):
            raise CxrExplainError(f"cannot read the dimensions of transpose node {step.node!r}")
        n = step.x.dim()
        return [R.transpose(a % n + 1, b % n + 1)]


class Expand(Rule):
    """``expand`` / ``broadcast_to``: each input entry gets the sum of its copies' relevance (exact)."""

    name = "expand"
    exact = True
    reads_values = False  # the input's shape only

    def backward(self, step, R):
        return [unbroadcast(R, step.x.shape)] + [None] * (len(step.inputs) - 1)


class Rearrange(Rule):
    """Any op that moves, selects or copies entries of its first operand (``getitem`` with slices,
    integers, ``None``, ``...`` or index tensors; ``chunk`` / ``split`` / ``unbind``; ``F.pad``; a
    ``getitem`` of a tuple): ``R_in = Jᵀ R``, computed as the vector–Jacobian product of the node's own
    op at the recorded input (one per target). ``exact``: the op moves or copies every input entry
    somewhere, so nothing is lost (not for zero padding)."""

    name = "rearrange"

    def __init__(self, exact: bool = True):
        self.exact = exact

    def backward(self, step, R):
        x = step.x
        rest = [None] * (len(step.inputs) - 1)
        if isinstance(x, (tuple, list)):  # getitem of a tuple (a chunk's piece): route R to that item
            i = step.node.fx_node.args[1]
            if not isinstance(i, int):
                raise CxrExplainError(f"node {step.node!r}: only integer indices of a tuple are supported")
            out: list = [None] * len(x)
            out[i] = R
            return [tuple(out)] + rest
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad():
            y = rerun(step.node, step.record, {step.input_nodes[0].name: xg})
        ys = list(y) if isinstance(y, (tuple, list)) else [y]
        rs = list(R) if isinstance(R, (tuple, list)) else [R]
        pairs = [(a, r) for a, r in zip(ys, rs) if r is not None]
        k = rs[0].shape[0] if rs[0] is not None else next(r for r in rs if r is not None).shape[0]
        grads = []
        for j in range(k):
            (g,) = torch.autograd.grad([a for a, _ in pairs], xg, [r[j] for _, r in pairs],
                                       retain_graph=j < k - 1, allow_unused=True)
            grads.append(torch.zeros_like(x) if g is None else g)
        return [torch.stack(grads)] + rest


def unbroadcast(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum a (K, *broadcast_shape) relevance down to (K, *shape)."""
    target = (t.shape[0], *shape)
    if t.shape == target:
        return t
    while t.dim() > len(target):
        t = t.sum(1)
    dims = [i for i in range(1, t.dim()) if target[i] == 1 and t.shape[i] != 1]
    return t.sum(dims, keepdim=True) if dims else t
