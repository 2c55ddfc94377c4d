"""Conv2d / Linear layers: their bias-free linear map with arbitrary weights, cached modified
weights, and the modified-z rule family of LRP (z, z⁺, ε, zᴮ, flat, w², α-β; docs/rules.md §3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.grad import conv2d_input

from ...errors import CxrExplainError
from ..graph import LayerNode
from .base import Rule, Step, Tensor, merge_kb, safe_inverse, split_kb


# --------------------------------------------------------------------------------------------
# Linear maps (Conv2d, Linear): forward with given weights and its transpose
# --------------------------------------------------------------------------------------------


class LinearMap:
    """The bias-free linear map of a Conv2d / Linear layer, applied with arbitrary weights."""

    def __init__(self, module: nn.Module, node: LayerNode):
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise CxrExplainError(f"node {node.name!r}: {type(module).__name__} is not Conv2d/Linear")
        self.module = module
        self.is_conv = isinstance(module, nn.Conv2d)
        if self.is_conv and module.padding_mode != "zeros":
            raise CxrExplainError(
                f"layer {node.module_path}: padding_mode={module.padding_mode!r} is not supported; use zeros"
            )

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.module.bias

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        """``z_j = Σ_i w_ji x_i`` (no bias)."""
        m = self.module
        if self.is_conv:
            return F.conv2d(x, w, None, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, w)

    def transpose(self, s: Tensor, w: Tensor, in_shape: Sequence[int]) -> Tensor:
        """``Wᵀ s`` (the vector–Jacobian product of the bias-free map); ``s`` is (N, *out_shape)."""
        m = self.module
        if self.is_conv:
            if self._as_forward_conv(in_shape, s):
                # stride 1: Wᵀs is a plain convolution with the flipped, transposed kernel (a faster
                # kernel on CPU than convolution_backward; same sums)
                k = m.kernel_size
                wt = w.transpose(0, 1).flip(-1, -2)
                return F.conv2d(s, wt, None, 1, (k[0] - 1 - m.padding[0], k[1] - 1 - m.padding[1]))
            return conv2d_input((s.shape[0], *in_shape), w, s, m.stride, m.padding, m.dilation, m.groups)
        return s @ w

    def transpose_many(self, s: Tensor, ws: Sequence[Tensor], in_shape: Sequence[int]) -> list[Tensor]:
        """``[W₁ᵀ s, W₂ᵀ s, …]``; for a convolution in one call with the kernels stacked along the input
        channels (zᴮ's two maps at a stride-2 stem cost one: the kernel's time hardly depends on the
        few output channels)."""
        if len(ws) == 1 or not self.is_conv:
            return [self.transpose(s, w, in_shape) for w in ws]
        c = in_shape[0]
        both = self.transpose(s, torch.cat(list(ws), 1), (c * len(ws), *in_shape[1:]))
        return list(both.split(c, 1))

    def _as_forward_conv(self, in_shape, s) -> bool:
        m = self.module
        return (tuple(m.stride) == (1, 1) and tuple(m.dilation) == (1, 1) and m.groups == 1
                and isinstance(m.padding, tuple) and all(k - 1 - p >= 0 for k, p in zip(m.kernel_size, m.padding))
                and tuple(s.shape[-2:]) == (in_shape[-2] + 2 * m.padding[0] - m.kernel_size[0] + 1,
                                            in_shape[-1] + 2 * m.padding[1] - m.kernel_size[1] + 1))

    def bias_shape(self, out: Tensor) -> Optional[Tensor]:
        """The bias broadcast to an output tensor's layout (B, C, …)."""
        if self.bias is None:
            return None
        return self.bias.view(1, -1, *([1] * (out.dim() - 2)))


def cached_for_weight(step: Step, lm: LinearMap, key: tuple, make: Callable[[Tensor], Tensor]) -> Tensor:
    """``make(W)`` kept with the traced model across calls and recomputed when the weight changes
    (its version counter, storage, dtype or device)."""
    W = lm.weight.detach()
    stamp = (lm.weight._version, W.data_ptr(), W.dtype, W.device)
    hit = step.cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    out = make(W)
    step.cache[key] = (stamp, out)
    return out


WEIGHT_MODS: dict[str, Callable[[Tensor], Tensor]] = {
    "id": lambda W: W,
    "pos": lambda W: W.clamp(min=0),
    "neg": lambda W: W.clamp(max=0),
    "abs": lambda W: W.abs(),
    "negabs": lambda W: (-W).clamp(min=0),
    "ones": lambda W: torch.ones_like(W),
    "square": lambda W: W * W,
}


def modified_weights(step: Step, lm: LinearMap, mod: str) -> Tensor:
    """Modified weights: ``id``, ``pos`` (W⁺), ``neg`` (W⁻), ``negabs`` (|W⁻|), ``abs``, ``ones``,
    ``square``. Cached (VGG's first dense layer has 100M weights: clamping it on every call would
    cost more than the layer)."""
    return cached_for_weight(step, lm, (step.node.name, mod), WEIGHT_MODS[mod])


def ones_response(step: Step, lm: LinearMap, mod: str, in_shape: Sequence[int]) -> Tensor:
    """``g(W)`` applied to an all-ones input of ``in_shape`` (zero padding included), shape
    (1, *out): with it a per-sample constant input costs no convolution (zᴮ's l and h, the flat
    rule). Cached like :func:`_weights`."""
    return cached_for_weight(step, lm, (step.node.name, mod, "ones-response", tuple(in_shape)),
                   lambda W: lm.forward(torch.ones((1, *in_shape), dtype=W.dtype, device=W.device),
                                        modified_weights(step, lm, mod)))


# --------------------------------------------------------------------------------------------
# LRP rules for Conv2d / Linear: the generic modified-z rule
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One product ``coef · input_mod(x) · param_mod(W)`` of a modified-z rule.

    input modifiers: ``id`` (x), ``pos`` (x⁺), ``neg`` (x⁻), ``ones`` (1), ``low`` / ``high``
    (the per-sample min / max of the layer input, for zᴮ).
    """

    input_mod: str
    param_mod: str
    coef: float = 1.0


class ZRule(Rule):
    """The modified-z rule family of LRP, one formula for z, z⁺, ε, zᴮ, flat, w²:

    ``z_j = Σ_t c_t Σ_i f_t(x)_i g_t(W)_ji [+ b_j]``, ``s = R / stab(z)``,
    ``R_i = Σ_t c_t f_t(x)_i Σ_j g_t(W)_ji s_j``.

    ``stabilizer``: ``"safe"`` (safe division, no ε), ``"epsilon"`` (``z + ε·sign(z)``, sign(0)=+1),
    ``"plus-epsilon"`` (``z + ε``, the authors' zᴮ in LRP, docs/rules.md §3.5).
    Terms whose input modifier is ``neg`` are skipped when the input has no negative entry.
    """

    name = "z"

    def __init__(self, terms: Sequence[Term], stabilizer: str = "safe", epsilon: float = 0.0,
                 use_bias: bool = False, name: Optional[str] = None):
        self.terms = tuple(terms)
        self.stabilizer = stabilizer
        self.epsilon = epsilon
        self.use_bias = use_bias
        if name:
            self.name = name

    def __repr__(self):
        return f"ZRule({self.name}, stabilizer={self.stabilizer}, eps={self.epsilon}, bias={self.use_bias})"

    def _inputs(self, step: Step, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The modified inputs, and for the constant ones (``ones``, ``low``, ``high``) their
        per-sample value as a (B, 1, …) tensor."""
        mods = {t.input_mod for t in self.terms}
        out: dict[str, Tensor] = {}
        const: dict[str, Tensor] = {}
        nonneg = step.x_nonnegative
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        if "id" in mods:
            out["id"] = x
        if "pos" in mods:
            out["pos"] = x if nonneg else x.clamp(min=0)
        if "neg" in mods and not nonneg and bool((x < 0).any()):
            out["neg"] = x.clamp(max=0)
        if "ones" in mods:
            const["ones"] = torch.ones(shape, dtype=x.dtype, device=x.device)
        if "low" in mods or "high" in mods:
            flat = x.reshape(x.shape[0], -1)
            const["low"] = flat.min(1).values.view(shape)
            const["high"] = flat.max(1).values.view(shape)
        out.update({k: v.expand_as(x) for k, v in const.items()})
        return out, const

    def backward(self, step, R):
        lm = LinearMap(step.node.module, step.node)
        x = step.x
        ins, const = self._inputs(step, x)
        terms = [t for t in self.terms if t.input_mod in ins]
        z = None
        for t in terms:
            if t.input_mod in const:  # c·1 through a linear map = c · (its response to ones), cached
                zt = const[t.input_mod] * ones_response(step, lm, t.param_mod, x.shape[1:])
            else:
                zt = lm.forward(ins[t.input_mod], modified_weights(step, lm, t.param_mod))
            z = t.coef * zt if z is None else z + t.coef * zt
        if self.use_bias and lm.bias is not None:
            z = z + lm.bias_shape(z).detach()
        if self.stabilizer == "safe":
            s = R * safe_inverse(z)
        elif self.stabilizer == "epsilon":
            s = R / (z + self.epsilon * torch.where(z >= 0, 1.0, -1.0).to(z.dtype))
        elif self.stabilizer == "plus-epsilon":
            s = R / (z + self.epsilon)
        else:
            raise ValueError(f"unknown stabilizer {self.stabilizer!r}")
        k = R.shape[0]
        s2 = merge_kb(s)
        factors: dict[str, Tensor] = {}
        for t in terms:  # Σ over terms sharing a weight modifier: one transposed map each
            f = t.coef * ins[t.input_mod]
            factors[t.param_mod] = f if t.param_mod not in factors else factors[t.param_mod] + f
        if {"id", "pos", "neg"} <= factors.keys():  # zᴮ: Wᵀs = W⁺ᵀs + W⁻ᵀs saves one map
            f_id = factors.pop("id")
            factors["pos"] = factors["pos"] + f_id
            factors["neg"] = factors["neg"] + f_id
        backs = lm.transpose_many(s2, [modified_weights(step, lm, pm) for pm in factors], x.shape[1:])
        result = None
        for factor, back in zip(factors.values(), backs):
            contrib = factor * split_kb(back, k)
            result = contrib if result is None else result + contrib
        return [result]


class Combined(Rule):
    """A weighted sum of rules, each normalised on its own: ``R = Σ_k w_k · rule_k(R)`` (α-β)."""

    def __init__(self, parts: Sequence[tuple[float, Rule]], name: str = "combined"):
        self.parts = tuple(parts)
        self.name = name

    def backward(self, step, R):
        total = None
        for w, rule in self.parts:
            r = rule.backward(step, R)[0]
            total = w * r if total is None else total + w * r
        return [total]


def zplus() -> ZRule:
    """LRP-α1β0 = z⁺ without bias: ``R_i = Σ_j (x⁺_i W⁺_ji + x⁻_i W⁻_ji) R_j / Σ_k (…)`` (joint)."""
    return ZRule([Term("pos", "pos"), Term("neg", "neg")], "safe", name="z+")


def alpha_beta(alpha: float, beta: float) -> Rule:
    """LRP-αβ: ``α·z⁺-part − β·z⁻-part``, each part normalised separately, biases excluded."""
    pos = ZRule([Term("pos", "pos"), Term("neg", "neg")], "safe", name="alpha")
    neg = ZRule([Term("pos", "neg"), Term("neg", "pos")], "safe", name="beta")
    if beta == 0:
        return pos
    return Combined([(alpha, pos), (-beta, neg)], name=f"alpha{alpha:g}beta{beta:g}")


def epsilon(eps: float = 0.25, use_bias: bool = True) -> ZRule:
    """LRP-ε: ``R_i = x_i Σ_j W_ji R_j / (z_j + ε·sign(z_j))`` with ``z_j = Σ_i x_i W_ji + b_j``."""
    return ZRule([Term("id", "id")], "epsilon", epsilon=eps, use_bias=use_bias, name="epsilon")


def zbox(stabilizer: str = "safe", eps: float = 0.0) -> ZRule:
    """zᴮ with the per-sample min ``l`` and max ``h`` of the layer input (docs/rules.md §2.4):
    ``R_i = Σ_j (x_i W_ji − l W⁺_ji − h W⁻_ji) R_j / Σ_i (…)``, no bias."""
    return ZRule([Term("id", "id"), Term("low", "pos", -1.0), Term("high", "neg", -1.0)],
                 stabilizer, epsilon=eps, name="zB")


def flat() -> ZRule:
    """Flat rule: relevance spread uniformly over each output's receptive field."""
    return ZRule([Term("ones", "ones")], "safe", name="flat")


def wsquare() -> ZRule:
    """w²-rule: ``R_i = Σ_j W_ji² R_j / Σ_i W_ji²``."""
    return ZRule([Term("ones", "square")], "safe", name="w2")
