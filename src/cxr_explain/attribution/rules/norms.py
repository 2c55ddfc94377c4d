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
    """The map API of :class:`~.linear.LinearMap` for a LayerNorm / GroupNorm node (σ held constant).

    LayerNorm works in the tensor's own layout (the groups are its trailing axes, so a channels-last
    view is never copied); GroupNorm on the (B, G, D) view of its input. ``a = γ/σ`` stays factored:
    every modifier ``g`` but ``ones`` is positively homogeneous (degree 2 for ``square``), so
    ``g(γ c / σ) = g(γ c) · (1/σ)^degree`` and no modified weight is ever a full-size tensor."""

    is_conv = False
    rap_conv_form = True  # the sign-symmetric form of RAP's hidden rule (docs/rules.md §9.3)

    def __init__(self, step: Step):
        node = step.node
        x = step.x
        params = norm_parameters(step)
        weight, bias, eps = params["weight"], params["bias"], params["eps"]
        self.shape = tuple(x.shape)
        self.layer = node.kind == "layernorm"
        if self.layer:
            ns = params["normalized_shape"]
            self.dims = tuple(range(-len(ns), 0))  # the group axes, counted from the end
            self.d = math.prod(ns)
            self.gamma = None if weight is None else weight.detach().reshape(ns)
            self._beta = None if bias is None else bias.detach()  # broadcasts over the leading axes
            xg = x
        else:  # groupnorm: (B, G, D) views
            g, c = params["num_groups"], x.shape[1]
            spatial = math.prod(x.shape[2:])
            self.dims = (-1,)
            self.groups = (g, (c // g) * spatial)
            self.d = self.groups[1]
            self.gamma = None if weight is None else (
                weight.detach().reshape(c, 1).expand(c, spatial).reshape(1, *self.groups))
            self._beta = None if bias is None else bias.detach().view(1, -1, *([1] * (x.dim() - 2)))
            xg = x.reshape(x.shape[0], *self.groups)
        self.inv_sigma = torch.rsqrt(xg.var(self.dims, unbiased=False, keepdim=True) + eps)  # held constant
        self.bias = self._beta
        self._rows_cache: dict[str, tuple] = {}

    def _rows(self, mod: str) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """``g(γ(1 − 1/D))``, ``g(−γ/D)`` (group-shaped) and the per-group scale ``(1/σ)^degree``
        (None for ``ones``): row j of ``g(M)`` is ``scale·diag_j`` on the diagonal, ``scale·off_j`` off it."""
        if mod not in self._rows_cache:
            g = WEIGHT_MODS[mod]
            gamma = self.gamma if self.gamma is not None else torch.ones((), dtype=self.inv_sigma.dtype,
                                                                          device=self.inv_sigma.device)
            diag, off = g(gamma * (1.0 - 1.0 / self.d)), g(gamma * (-1.0 / self.d))
            scale = None if mod == "ones" else (self.inv_sigma * self.inv_sigma if mod == "square" else self.inv_sigma)
            self._rows_cache[mod] = (diag, off, scale)
        return self._rows_cache[mod]

    def _grouped(self, t: Tensor, lead: int) -> Tensor:
        """``t`` (lead axes, then the input's feature axes) in the group layout."""
        return t if self.layer else t.reshape(*t.shape[:lead], *self.groups)

    def apply(self, step: Step, x: Tensor, mod: str) -> Tensor:
        """``g(M) x``: ``scale · (d_j x_j + o_j (S − x_j))`` per group, ``S`` the group sum."""
        diag, off, scale = self._rows(mod)
        xg = self._grouped(x, 1)
        out = diag * xg + off * (xg.sum(self.dims, keepdim=True) - xg)
        if scale is not None:
            out = out * scale
        return out.reshape(x.shape)

    def apply_t(self, step: Step, s: Tensor, mods: Sequence[str], in_shape: Sequence[int]) -> list[Tensor]:
        """``g(M)ᵀ s``: ``d_i t_i + Σ_j o_j t_j − o_i t_i`` with ``t = scale · s``; ``s`` is (K·B, …)
        (targets × batch), the per-sample scale broadcast over K."""
        k = s.shape[0] // self.shape[0]
        sk = self._grouped(s.reshape(k, self.shape[0], *s.shape[1:]), 2)
        out = []
        for mod in mods:
            diag, off, scale = self._rows(mod)
            t = sk if scale is None else sk * scale
            ot = off * t
            out.append((diag * t + ot.sum(self.dims, keepdim=True) - ot).reshape(s.shape))
        return out

    def ones_of(self, step: Step, mod: str, in_shape: Sequence[int]) -> Tensor:
        """``g(M) 1`` per sample (B, *shape)."""
        ones = torch.ones(self.shape, dtype=self.inv_sigma.dtype, device=self.inv_sigma.device)
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
