"""Conv1d / Conv2d / Linear layers: their bias-free linear map with arbitrary weights, cached
modified weights, and the modified-z rule family of LRP (z, z⁺, ε, zᴮ, flat, w², α-β;
docs/rules.md §3). The same rules run on LayerNorm / GroupNorm through :class:`~.norms.NormMap`
(docs/rules.md §9.3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.grad import conv1d_input, conv2d_input

from ...errors import CxrExplainError
from ..graph import LayerNode
from .base import Rule, Step, Tensor, merge_kb, safe_inverse, split_kb
from .depthwise import depthwise_conv, depthwise_conv_transpose, is_depthwise


# --------------------------------------------------------------------------------------------
# Linear maps (Conv2d, Linear): forward with given weights and its transpose
# --------------------------------------------------------------------------------------------


class LinearMap:
    """The bias-free linear map of a Conv1d / Conv2d / Linear layer, applied with arbitrary weights.

    Convolutions keep their stride, dilation and groups (depthwise included); string padding
    (``"same"``, ``"valid"``) is resolved to explicit per-side padding exactly as PyTorch applies it
    (``"same"`` with an odd total pads one more on the right/bottom). A Linear layer may read any
    (…, features) layout (channels-last ConvNeXt blocks, tokens).

    The map API shared with :class:`~.norms.NormMap`: :meth:`apply` (``g(W) x``), :meth:`apply_t`
    (``g(W)ᵀ s`` for several modifiers ``g``), :meth:`ones_of` (``g(W) 1``), :meth:`bias_shape`.
    """

    rap_conv_form: bool  # RAP's hidden rule uses its Conv form (docs/rules.md §2.3) for this map

    def __init__(self, module: nn.Module, node: LayerNode):
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            raise CxrExplainError(f"node {node.name!r}: {type(module).__name__} is not Conv1d/Conv2d/Linear")
        self.module = module
        self.node = node
        self.is_conv = isinstance(module, (nn.Conv1d, nn.Conv2d))
        self.rap_conv_form = self.is_conv
        if self.is_conv:
            if module.padding_mode != "zeros":
                raise CxrExplainError(
                    f"layer {node.module_path}: padding_mode={module.padding_mode!r} is not supported; use zeros"
                )
            self.nd = 1 if isinstance(module, nn.Conv1d) else 2
            self._conv = F.conv1d if self.nd == 1 else F.conv2d
            self._conv_input = conv1d_input if self.nd == 1 else conv2d_input
            self.pads = _resolve_padding(module)  # ((left, right) per spatial dim)
            self.sym = tuple(l for l, _ in self.pads) if all(l == r for l, r in self.pads) else None

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.module.bias

    # -- the raw maps with given weights -----------------------------------------------------
    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        """``z_j = Σ_i w_ji x_i`` (no bias)."""
        m = self.module
        if not self.is_conv:
            return F.linear(x, w)
        if self._slow_grouped(w):
            return depthwise_conv(x, w, m.stride, self.pads, m.dilation)
        if self.sym is not None:
            return self._conv(x, w, None, m.stride, self.sym, m.dilation, m.groups)
        return self._conv(F.pad(x, self._pad_arg()), w, None, m.stride, 0, m.dilation, m.groups)

    def transpose(self, s: Tensor, w: Tensor, in_shape: Sequence[int]) -> Tensor:
        """``Wᵀ s`` (the vector–Jacobian product of the bias-free map); ``s`` is (N, *out_shape)."""
        m = self.module
        if not self.is_conv:
            return s @ w
        if self._slow_grouped(w):
            return depthwise_conv_transpose(s, w, in_shape, m.stride, self.pads, m.dilation)
        if self._as_forward_conv(in_shape, s):
            # stride 1: Wᵀs is a plain convolution with the flipped, transposed kernel (a faster
            # kernel on CPU than convolution_backward; same sums), per group
            g = m.groups
            wt = w.reshape(g, w.shape[0] // g, *w.shape[1:]).transpose(1, 2)
            wt = wt.reshape(w.shape[1] * g, w.shape[0] // g, *w.shape[2:]).flip(list(range(2, w.dim())))
            pad = [d * (k - 1) - p for d, k, p in zip(m.dilation, m.kernel_size, self.sym)]
            return self._conv(s, wt, None, 1, pad, m.dilation, g)
        if self.sym is not None:
            return self._conv_input((s.shape[0], *in_shape), w, s, m.stride, self.sym, m.dilation, m.groups)
        padded = [n + l + r for n, (l, r) in zip(in_shape[1:], self.pads)]
        full = self._conv_input((s.shape[0], in_shape[0], *padded), w, s, m.stride, 0, m.dilation, m.groups)
        crop = [slice(None), slice(None)] + [slice(l, l + n) for n, (l, _) in zip(in_shape[1:], self.pads)]
        return full[tuple(crop)]

    def transpose_many(self, s: Tensor, ws: Sequence[Tensor], in_shape: Sequence[int]) -> list[Tensor]:
        """``[W₁ᵀ s, W₂ᵀ s, …]``; for an ungrouped convolution in one call with the kernels stacked
        along the input channels (zᴮ's two maps at a stride-2 stem cost one: the kernel's time hardly
        depends on the few output channels)."""
        if len(ws) == 1 or not self.is_conv or self.module.groups != 1:
            return [self.transpose(s, w, in_shape) for w in ws]
        c = in_shape[0]
        both = self.transpose(s, torch.cat(list(ws), 1), (c * len(ws), *in_shape[1:]))
        return list(both.split(c, 1))

    def _pad_arg(self) -> list[int]:
        out: list[int] = []
        for l, r in reversed(self.pads):  # F.pad lists the last dimension first
            out += [l, r]
        return out

    def _slow_grouped(self, w: Tensor) -> bool:
        """A float64 depthwise convolution, whose PyTorch CPU kernel loops over the groups: use the
        tap-sum form of :mod:`.depthwise` instead (same sums)."""
        return w.dtype == torch.float64 and not w.is_cuda and is_depthwise(w, self.module.groups)

    def _as_forward_conv(self, in_shape, s) -> bool:
        m = self.module
        if self.sym is None or any(st != 1 for st in m.stride):
            return False
        if any(d * (k - 1) - p < 0 for d, k, p in zip(m.dilation, m.kernel_size, self.sym)):
            return False
        return tuple(s.shape[2:]) == tuple(n + 2 * p - d * (k - 1) for n, p, d, k in
                                           zip(in_shape[1:], self.sym, m.dilation, m.kernel_size))

    # -- the map API (modified weights by name, cached) --------------------------------------
    def apply(self, step: Step, x: Tensor, mod: str) -> Tensor:
        """``g(W) x`` with the modified weights ``g = mod`` (no bias)."""
        return self.forward(x, modified_weights(step, self, mod))

    def apply_t(self, step: Step, s: Tensor, mods: Sequence[str], in_shape: Sequence[int]) -> list[Tensor]:
        """``[g(W)ᵀ s for g in mods]``; ``s`` is (N, *out_shape) with N = targets × batch."""
        return self.transpose_many(s, [modified_weights(step, self, mod) for mod in mods], in_shape)

    def ones_of(self, step: Step, mod: str, in_shape: Sequence[int]) -> Tensor:
        """``g(W)`` applied to an all-ones input (zero padding included), shape (1, *out); cached."""
        return ones_response(step, self, mod, in_shape)

    def bias_shape(self, out: Tensor) -> Optional[Tensor]:
        """The bias broadcast to an output tensor's layout: (1, C, …) for a convolution, the last
        axis for a Linear layer (whatever its leading axes)."""
        if self.bias is None:
            return None
        if not self.is_conv:
            return self.bias.detach()
        return self.bias.detach().view(1, -1, *([1] * (out.dim() - 2)))

    def preactivation(self, step: Step) -> Tensor:
        """The recorded output without its bias: ``z = W x``."""
        z = step.output
        b = self.bias_shape(z)
        return z if b is None else z - b


def _resolve_padding(m: nn.Module) -> tuple[tuple[int, int], ...]:
    """Per spatial dimension (left, right) zero padding of a convolution, strings resolved as
    PyTorch does: ``"same"`` pads ``d·(k−1)`` in total, ``⌊total/2⌋`` on the left."""
    nd = len(m.kernel_size)
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return tuple((0, 0) for _ in range(nd))
        if m.padding == "same":
            out = []
            for d, k in zip(m.dilation, m.kernel_size):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return tuple(out)
        raise CxrExplainError(f"convolution padding {m.padding!r} is not supported")
    pad = m.padding if isinstance(m.padding, (tuple, list)) else (m.padding,) * nd
    return tuple((int(p), int(p)) for p in pad)


def linear_map(step: Step):
    """The linear map a Conv/Linear/normalisation node's rule works on: :class:`LinearMap` for a
    convolution or linear layer, :class:`~.norms.NormMap` for LayerNorm / GroupNorm."""
    node = step.node
    if node.kind in ("layernorm", "groupnorm"):
        from .norms import NormMap

        return NormMap(step)
    if node.module is None:
        raise CxrExplainError(f"node {node!r}: this rule needs a Conv/Linear module or a normalisation")
    return LinearMap(node.module, node)


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


#: A modified weight is kept between calls when its layer applies it at fewer output positions per
#: call than this (dense layers, small late maps): there rebuilding it would cost a noticeable share of
#: the layer's own product. Elsewhere it is rebuilt once per call (< 1/64 of one product) and freed
#: with the node: ConvNeXt-Tiny's W⁺ and |W⁻| copies (207 MB) would otherwise all be alive at the
#: peak, at the end of the backward walk.
CACHE_BELOW_POSITIONS = 64


def modified_weights(step: Step, lm: LinearMap, mod: str) -> Tensor:
    """Modified weights: ``id``, ``pos`` (W⁺), ``neg`` (W⁻), ``negabs`` (|W⁻|), ``abs``, ``ones``,
    ``square``. Cached with the traced model where the layer is applied at few positions
    (:data:`CACHE_BELOW_POSITIONS`; VGG's first dense layer has 100M weights: clamping it on every
    call would cost more than the layer), else made once per call at this node."""
    positions = step.output.numel() // max(1, lm.weight.shape[0])  # per output channel
    if positions < CACHE_BELOW_POSITIONS:
        return cached_for_weight(step, lm, (step.node.name, mod), WEIGHT_MODS[mod])
    key = ("modified-weight", mod)
    if key not in step.local:
        step.local[key] = WEIGHT_MODS[mod](lm.weight.detach())
    return step.local[key]


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
                 use_bias: bool = False, name: Optional[str] = None, fallback: Optional[str] = None):
        self.terms = tuple(terms)
        self.stabilizer = stabilizer
        self.epsilon = epsilon
        self.use_bias = use_bias
        if fallback not in (None, "flat-grouped", "flat"):
            raise ValueError(f"unknown fallback {fallback!r}")
        self.fallback = fallback
        if name:
            self.name = name

    def __repr__(self):
        return (f"ZRule({self.name}, stabilizer={self.stabilizer}, eps={self.epsilon}, bias={self.use_bias}, "
                f"fallback={self.fallback})")

    def reads_output(self, node, inputs) -> bool:
        return False  # z is recomputed from the input with the modified weights

    def _falls_back(self, lm) -> bool:
        """Whether zero denominators send their relevance on evenly (:func:`_flat_fallback`, §9.6):
        ``"flat"`` everywhere, ``"flat-grouped"`` in grouped / depthwise convolutions only."""
        if self.fallback == "flat":
            return True
        return self.fallback == "flat-grouped" and getattr(lm, "is_conv", False) and lm.module.groups > 1

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
        if "neg" in mods and not nonneg and bool(x.min() < 0):  # one reduction, no mask
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
        lm = linear_map(step)
        x = step.x
        ins, const = self._inputs(step, x)
        terms = [t for t in self.terms if t.input_mod in ins]
        z = None
        for t in terms:
            if t.input_mod in const:  # c·1 through a linear map = c · (its response to ones), cached
                zt = const[t.input_mod] * lm.ones_of(step, t.param_mod, x.shape[1:])
            else:
                zt = lm.apply(step, ins[t.input_mod], t.param_mod)
            z = t.coef * zt if z is None else z + t.coef * zt
        if self.use_bias and lm.bias is not None:
            z = z + lm.bias_shape(z)
        dead = None
        if self.stabilizer == "safe":
            zero = z == 0
            if bool(zero.any()):
                s = R * torch.reciprocal(z).masked_fill_(zero, 0)
                dead = R * zero if self._falls_back(lm) else None
                if dead is not None and not bool(dead.any()):  # the zero denominators got no relevance
                    dead = None
            else:  # the usual case: a plain division, no mask
                s = R / z
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
            f = ins[t.input_mod] if t.coef == 1 else t.coef * ins[t.input_mod]
            factors[t.param_mod] = f if t.param_mod not in factors else factors[t.param_mod] + f
        if {"id", "pos", "neg"} <= factors.keys():  # zᴮ: Wᵀs = W⁺ᵀs + W⁻ᵀs saves one map
            f_id = factors.pop("id")
            factors["pos"] = factors["pos"] + f_id
            factors["neg"] = factors["neg"] + f_id
        backs = lm.apply_t(step, s2, list(factors), x.shape[1:])
        result = None
        for factor, back in zip(factors.values(), backs):
            back = split_kb(back, k)
            result = factor * back if result is None else result.addcmul_(factor, back)
        if dead is not None:
            result = result + _flat_fallback(step, lm, x, dead)
        return [result]


def _flat_fallback(step: Step, lm, x: Tensor, dead: Tensor) -> Tensor:
    """The relevance ``dead`` (K, B, *out) of outputs whose denominator is 0, spread evenly over the
    inputs each output reads (docs/rules.md §9.6): over its non-zero inputs, ``R_i += [x_i ≠ 0] R_j /
    #{i: x_i ≠ 0}``, or where it reads none, over all of them, ``R_i += R_j / n_j``."""
    k = dead.shape[0]
    n_all = lm.ones_of(step, "ones", x.shape[1:])
    nonzero = x != 0
    if bool(nonzero.all()):  # signed inputs (after SiLU, a norm): every input is active
        back = lm.apply_t(step, merge_kb(dead * safe_inverse(n_all)), ["ones"], x.shape[1:])[0]
        return split_kb(back, k)
    active = nonzero.to(x.dtype)
    n_active = lm.apply(step, active, "ones")  # (B, *out): non-zero inputs read by each output
    some = n_active > 0
    if bool(some.all()):  # the usual case: every output reads a non-zero input
        back = lm.apply_t(step, merge_kb(dead * safe_inverse(n_active)), ["ones"], x.shape[1:])[0]
        return active * split_kb(back, k)
    s_active = dead * (some * safe_inverse(n_active))
    s_all = dead * (~some * safe_inverse(n_all))
    n = s_active.shape[0] * s_active.shape[1]
    back = lm.apply_t(step, torch.cat([merge_kb(s_active), merge_kb(s_all)]), ["ones"], x.shape[1:])[0]
    return active * split_kb(back[:n], k) + split_kb(back[n:], k)


class Combined(Rule):
    """A weighted sum of rules, each normalised on its own: ``R = Σ_k w_k · rule_k(R)`` (α-β)."""

    def __init__(self, parts: Sequence[tuple[float, Rule]], name: str = "combined"):
        self.parts = tuple(parts)
        self.name = name

    def reads_output(self, node, inputs) -> bool:
        return any(rule.reads_output(node, inputs) for _, rule in self.parts)

    def backward(self, step, R):
        total = None
        for w, rule in self.parts:
            r = rule.backward(step, R)[0]
            total = w * r if total is None else total + w * r
        return [total]


def zplus(fallback: Optional[str] = None) -> ZRule:
    """LRP-α1β0 = z⁺ without bias: ``R_i = Σ_j (x⁺_i W⁺_ji + x⁻_i W⁻_ji) R_j / Σ_k (…)`` (joint).

    ``fallback=None``: an output with a zero denominator loses its relevance (the authors' code,
    zennit); ``"flat"``: it spreads it evenly over the inputs it reads (docs/rules.md §9.6);
    ``"flat-grouped"``: that only in grouped / depthwise convolutions."""
    return ZRule([Term("pos", "pos"), Term("neg", "neg")], "safe", name="z+", fallback=fallback)


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
