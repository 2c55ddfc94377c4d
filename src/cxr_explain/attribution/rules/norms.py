"""LayerNorm and GroupNorm as linear maps with the normalisation's scale held constant
(docs/rules.md §9.3), so that every Conv/Linear rule (z⁺, ε, α-β, RAP's hidden rule …) applies to them.

A normalisation computes, per sample and per group G of D entries (LayerNorm: the trailing
``normalized_shape`` of every token / position, channels-last or token layout; GroupNorm: C/G channels
× all spatial positions), ``y_j = γ_j (x_j − μ)/σ + β_j`` with ``μ`` the group mean and
``σ = sqrt(var + eps)``. Holding ``σ`` constant (its value at the recorded input) makes it exactly
the affine map

    ``y = M x + β``,  ``M_ji = a_j (δ_ji − 1/D)`` within a group (0 across groups), ``a_j = γ_j/σ``,

whose output equals the layer's. A modified weight ``g(M)`` (``g`` = id, W⁺, W⁻, |W⁻|, |W|, 1, W²,
element-wise) has only two distinct values per row: ``d_j = g(a_j (1 − 1/D))`` on the diagonal and
``o_j = g(−a_j/D)`` off it, so with ``S = Σ_group x``

    ``(g(M) x)_j = d_j x_j + o_j (S − x_j)``,  ``(g(M)ᵀ s)_i = d_i s_i + Σ_j o_j s_j − o_i s_i``,

two element-wise products and a group sum: the D×D matrix is never built.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch.fx.operator_schemas import normalize_function

from ...errors import CxrExplainError
from .base import Step, Tensor
from .linear import WEIGHT_MODS


class NormMap:
    """The map API of :class:`~.linear.LinearMap` for a LayerNorm / GroupNorm node (σ held constant)."""

    is_conv = False
    rap_conv_form = True  # the sign-symmetric form of RAP's hidden rule (docs/rules.md §9.3)

    def __init__(self, step: Step):
        node = step.node
        x = step.x
        params = norm_parameters(step)
        weight, bias, eps = params["weight"], params["bias"], params["eps"]
        self.shape = tuple(x.shape)
        b = x.shape[0]
        if node.kind == "layernorm":
            d = math.prod(params["normalized_shape"])
            self.groups = (math.prod(x.shape[1:]) // d, d)
            gamma = None if weight is None else weight.detach().reshape(1, 1, d)
            self._beta = None if bias is None else bias.detach()  # broadcasts over the leading axes
        else:  # groupnorm
            g = params["num_groups"]
            c = x.shape[1]
            spatial = math.prod(x.shape[2:])
            self.groups = (g, (c // g) * spatial)
            gamma = None if weight is None else (
                weight.detach().reshape(c, 1).expand(c, spatial).reshape(1, g, (c // g) * spatial))
            self._beta = None if bias is None else bias.detach().view(1, -1, *([1] * (x.dim() - 2)))
        xg = x.reshape(b, *self.groups)
        sigma = torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + eps)  # (B, G, 1), held constant
        self.a = (1.0 / sigma) if gamma is None else gamma / sigma  # (B, G, D) or (B, G, 1)
        self.a = self.a.expand(b, *self.groups)
        self.bias = self._beta

    def _rows(self, mod: str) -> tuple[Tensor, Tensor]:
        """Diagonal and off-diagonal values of ``g(M)`` per row j: (B, G, D) each."""
        g = WEIGHT_MODS[mod]
        d = self.groups[1]
        return g(self.a * (1.0 - 1.0 / d)), g(self.a * (-1.0 / d))

    def _grouped(self, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], *self.groups)

    def apply(self, step: Step, x: Tensor, mod: str) -> Tensor:
        """``g(M) x``: ``d_j x_j + o_j (S − x_j)`` per group."""
        diag, off = self._rows(mod)
        xg = self._grouped(x)
        total = xg.sum(-1, keepdim=True)
        return (diag * xg + off * (total - xg)).reshape(x.shape)

    def apply_t(self, step: Step, s: Tensor, mods: Sequence[str], in_shape: Sequence[int]) -> list[Tensor]:
        """``g(M)ᵀ s``: ``d_i s_i + Σ_j o_j s_j − o_i s_i``; ``s`` is (K·B, …) (targets × batch)."""
        k = s.shape[0] // self.shape[0]
        sg = self._grouped(s)
        out = []
        for mod in mods:
            diag, off = (t.repeat(k, 1, 1) for t in self._rows(mod))
            os_ = off * sg
            out.append((diag * sg + os_.sum(-1, keepdim=True) - os_).reshape(s.shape))
        return out

    def ones_of(self, step: Step, mod: str, in_shape: Sequence[int]) -> Tensor:
        """``g(M) 1`` per sample (B, *shape)."""
        ones = torch.ones(self.shape, dtype=self.a.dtype, device=self.a.device)
        return self.apply(step, ones, mod)

    def bias_shape(self, out: Tensor) -> Optional[Tensor]:
        return self._beta

    def preactivation(self, step: Step) -> Tensor:
        """``M x``: the recorded output without β (exact: σ is the recorded one)."""
        z = step.output
        return z if self._beta is None else z - self._beta


def norm_parameters(step: Step) -> dict:
    """``normalized_shape`` / ``num_groups``, ``weight``, ``bias``, ``eps`` of a LayerNorm / GroupNorm
    node, from its module or from its functional call's recorded operands."""
    node = step.node
    m = node.module
    if m is not None:
        if isinstance(m, nn.LayerNorm):
            return {"normalized_shape": tuple(m.normalized_shape), "weight": m.weight, "bias": m.bias, "eps": m.eps}
        if isinstance(m, nn.GroupNorm):
            return {"num_groups": m.num_groups, "weight": m.weight, "bias": m.bias, "eps": m.eps}
        raise CxrExplainError(f"node {node!r}: {type(m).__name__} is not a LayerNorm / GroupNorm")
    from ..graph import rerun_arguments

    args, kwargs = rerun_arguments(node, step.record)
    norm = normalize_function(node.fx_node.target, tuple(args), dict(kwargs), normalize_to_only_use_kwargs=True)
    if norm is None:
        raise CxrExplainError(f"node {node!r}: cannot read the normalisation's arguments")
    kw = norm.kwargs
    out = {"weight": kw.get("weight"), "bias": kw.get("bias"), "eps": kw.get("eps", 1e-5)}
    if node.kind == "layernorm":
        ns = kw["normalized_shape"]
        out["normalized_shape"] = (ns,) if isinstance(ns, int) else tuple(ns)
    else:
        out["num_groups"] = kw["num_groups"]
    return out
