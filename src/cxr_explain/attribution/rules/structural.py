"""Rules for parameter-free ops: pass-through, reshape, concatenation, max-pool, and the
proportional z-rule of average pools and ``+`` (docs/rules.md §2.5–§2.10)."""
from __future__ import annotations

from typing import Any

import torch

from ...errors import CxrExplainError
from ..graph import LayerNode
from .base import Rule, Tensor, merge_kb, sdiv, split_kb
from .shape import unbroadcast


class Pass(Rule):
    """Identity: ``R_in = R`` (ReLU, Dropout, Identity; BatchNorm in the authors' LRP)."""

    name = "pass"
    exact = True
    reads_values = False

    def backward(self, step, R):
        return [R]


class MaskedPass(Rule):
    """``R_in = R ⊙ [x != 0]``: what the authors' RAP BatchNorm rule reduces to (docs/rules.md §2.7)."""

    name = "masked-pass"

    def backward(self, step, R):
        zero = step.x == 0
        if not bool(zero.any()):  # the usual case: no copy at all
            return [R]
        return [R.masked_fill(zero, 0)]


class Reshape(Rule):
    """Flatten / view / reshape: relevance takes the input's shape back."""

    name = "reshape"
    exact = True
    reads_values = False  # the input's shape only

    def backward(self, step, R):
        return [R.reshape(R.shape[0], *step.x.shape)]


class Slice(Rule):
    """``torch.cat``: the relevance is sliced back into the concatenated inputs."""

    name = "slice"
    exact = True

    def backward(self, step, R):
        fx_node = step.node.fx_node
        dim = fx_node.kwargs.get("dim", fx_node.args[1] if len(fx_node.args) > 1 else 0)
        dim = dim % step.output.dim()
        sizes = [t.shape[dim] for t in step.inputs]
        return list(torch.split(R, sizes, dim=dim + 1))


class WinnerTakesAll(Rule):
    """Max-pool z-rule: all of ``R`` goes to the arg-max of each window (where the max is non-zero).

    ``R_in = x ⊙ Jᵀ sdiv(R, z)`` with ``z`` the pool output; at the arg-max ``x = z`` so this is a
    scatter of ``R·[z != 0]`` to the arg-max positions (overlapping windows accumulate).
    ``zero_windows="argmax"``: relevance that reaches an all-zero window (z = 0, the z-rule's 0/0)
    goes to its arg-max too instead of being dropped. Relevance reaches such a window only when the
    next layer makes a zero input active (a BatchNorm bias before the next convolution, DenseNet's
    norm1); where a convolution reads the pool directly (VGG, ResNet) none does, so both choices agree.
    """

    name = "winner-takes-all"

    def __init__(self, zero_windows: str = "drop"):
        if zero_windows not in ("drop", "argmax"):
            raise ValueError(f"zero_windows={zero_windows!r}: use 'drop' or 'argmax'")
        self.zero_windows = zero_windows

    def __repr__(self) -> str:
        return f"WinnerTakesAll(zero_windows={self.zero_windows!r})"

    def backward(self, step, R):
        idx = step.record.pool_indices.get(step.node.name)
        if idx is None:
            raise CxrExplainError(f"max-pool node {step.node.name!r} has no recorded indices")
        k = R.shape[0]
        x = step.x
        params = _pool_params(step.node, x)
        g = merge_kb(R if self.zero_windows == "argmax" else R * (step.output != 0))
        idx_k = idx.repeat(k, *([1] * (idx.dim() - 1)))
        big = x.new_empty((k * x.shape[0], *x.shape[1:]))
        out = torch.ops.aten.max_pool2d_with_indices_backward(
            g, big, params["kernel_size"], params["stride"], params["padding"], params["dilation"],
            params["ceil_mode"], idx_k,
        )
        return [split_kb(out, k)]


class Proportional(Rule):
    """The z-rule for parameter-free linear ops (average pools, ``+``): ``R_i = x_i Σ_j J_ji R_j / z_j``.

    For ``+`` with ``s = a + b``: ``R_a = a·sdiv(R, s)``, ``R_b = b·sdiv(R, s)`` (sign-unaware,
    docs/rules.md §2.8); for ``s = a − b``: ``R_b = −b·sdiv(R, s)``. Average pools use the pool's transposed map. ``stabilizer`` adds ``ε·sign(z)``
    to the denominator instead of the safe division (zennit's ``Norm``-like behaviour).
    """

    name = "proportional"

    def __init__(self, stabilizer: float = 0.0):
        self.stabilizer = stabilizer

    def _div(self, R: Tensor, z: Tensor) -> Tensor:
        if self.stabilizer:
            return R / (z + self.stabilizer * torch.where(z >= 0, 1.0, -1.0).to(z.dtype))
        return sdiv(R, z)

    def backward(self, step, R):
        kind = step.node.kind
        s = self._div(R, step.output)
        if kind == "add":
            return [unbroadcast(t * s, t.shape) for t in step.inputs]
        if kind == "sub":  # s = a − b: the contributions are a and −b
            a, b = step.inputs
            return [unbroadcast(a * s, a.shape), unbroadcast(-b * s, b.shape)]
        k = R.shape[0]
        x = step.x
        big = x.new_empty((k * x.shape[0], *x.shape[1:]))
        if kind == "adaptive_avgpool":
            g = torch.ops.aten._adaptive_avg_pool2d_backward(merge_kb(s), big)
        elif kind == "avgpool":
            p = _pool_params(step.node, x)
            g = torch.ops.aten.avg_pool2d_backward(
                merge_kb(s), big, p["kernel_size"], p["stride"], p["padding"], p["ceil_mode"],
                p["count_include_pad"], p["divisor_override"],
            )
        else:
            raise CxrExplainError(f"proportional rule does not handle {kind!r} (node {step.node.name!r})")
        return [x * split_kb(g, k)]




def _pair(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def _pool_params(node: LayerNode, x: Tensor) -> dict[str, Any]:
    """Kernel / stride / padding … of a pool node, from its module or its functional call."""
    m = node.module
    if m is not None:
        get = lambda k, d=None: getattr(m, k, d)  # noqa: E731
    else:
        from torch.fx.operator_schemas import normalize_function

        norm = normalize_function(node.fx_node.target, tuple(node.fx_node.args), dict(node.fx_node.kwargs),
                                  normalize_to_only_use_kwargs=True)
        kw = norm.kwargs if norm is not None else dict(node.fx_node.kwargs)
        get = lambda k, d=None: kw.get(k, d)  # noqa: E731
    ks = _pair(get("kernel_size"))
    stride = get("stride") or ks
    return {
        "kernel_size": ks,
        "stride": _pair(stride),
        "padding": _pair(get("padding", 0) or 0),
        "dilation": _pair(get("dilation", 1) or 1),
        "ceil_mode": bool(get("ceil_mode", False)),
        "count_include_pad": bool(get("count_include_pad", True)),
        "divisor_override": get("divisor_override", None),
    }
