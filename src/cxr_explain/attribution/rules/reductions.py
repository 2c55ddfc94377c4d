"""Sums and means over axes (docs/rules.md §9.2): the z-rule of a parameter-free linear map,
proportional to each entry's share, as for average pools (§2.6)."""
from __future__ import annotations

import math

from ...errors import CxrExplainError
from .base import Rule, sdiv


class Reduce(Rule):
    """``z = Σ_{i∈S} x_i`` (``sum``) or ``z = (1/n) Σ_{i∈S} x_i`` (``mean``) over the reduced axes S:
    ``R_i = x_i · R_z / Σ_{i∈S} x_i`` (the same for both: the 1/n cancels), safe division. Reducing
    over the batch axis is an error."""

    name = "reduce"

    def backward(self, step, R):
        x = step.x
        dims, keepdim = reduced_dims(step.node, x.dim())
        if 0 in dims:
            raise CxrExplainError(f"node {step.node!r} reduces over the batch axis; explain one image at a time")
        s = sdiv(R, step.output)  # (K, B, …) at the reduced shape
        if not keepdim:
            for d in sorted(dims):
                s = s.unsqueeze(d + 1)
        scale = 1.0 / math.prod(x.shape[d] for d in dims) if step.node.kind == "mean" else 1.0
        return [x * s * scale]


def reduced_dims(node, ndim: int) -> tuple[list[int], bool]:
    """(reduced axes, keepdim) of a ``mean`` / ``sum`` node (``x.mean((2, 3))``, ``torch.sum(x, 1, True)``)."""
    fx_node = node.fx_node
    args, kwargs = tuple(fx_node.args[1:]), dict(fx_node.kwargs)
    dim = kwargs.get("dim", kwargs.get("axis", args[0] if args else None))
    keepdim = kwargs.get("keepdim", args[1] if len(args) > 1 else False)
    if dim is None:
        return list(range(ndim)), bool(keepdim)
    dims = [dim] if isinstance(dim, int) else list(dim)
    if not all(isinstance(d, int) for d in dims) or not isinstance(keepdim, bool):
        raise CxrExplainError(f"cannot read the reduced axes of node {node!r}")
    return sorted({d % ndim for d in dims}), keepdim
