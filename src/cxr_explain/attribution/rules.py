"""Relevance rules: one class per rule, each a small piece of data plus a backward formula.

Conventions (``docs/rules.md`` §1): a rule receives the relevance ``R`` at a node's output and returns
the relevance at each of its tensor inputs. Relevance tensors carry a leading *target* axis:
``R`` has shape ``(K, B, *feature_shape)`` for K explained targets of a batch of B images, while the
stored activations have shape ``(B, *feature_shape)`` and are broadcast over K. So a forward pass and
every per-image quantity (z⁺ denominators, first-layer bounds) is computed once for all targets.

``sdiv(n, d)`` is the *safe division*: ``n/d`` where ``d != 0`` and exactly 0 where ``d == 0``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.grad import conv2d_input

from ..errors import CxrExplainError
from .graph import ForwardRecord, LayerNode

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def safe_inverse(d: Tensor) -> Tensor:
    """``1/d`` where ``d != 0``, exactly 0 where ``d == 0`` (computed once per layer and image, then
    multiplied into the relevance of every target)."""
    return torch.reciprocal(d).masked_fill_(d == 0, 0)


def sdiv(n: Tensor, d: Tensor) -> Tensor:
    """Safe division: ``n/d`` where ``d != 0``, exactly 0 where ``d == 0``."""
    return (n / d).masked_fill_(d == 0, 0)


def merge_kb(t: Tensor) -> Tensor:
    """(K, B, *s) -> (K*B, *s)."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def split_kb(t: Tensor, k: int) -> Tensor:
    """(K*B, *s) -> (K, B, *s)."""
    return t.reshape(k, t.shape[0] // k, *t.shape[1:])


def per_sample_sum(t: Tensor) -> Tensor:
    """Sum over all feature axes of a (K, B, ...) tensor -> (K, B)."""
    return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)


@dataclass
class Step:
    """What a rule sees at one node."""

    node: LayerNode
    inputs: list[Tensor]  # the node's tensor inputs (forward values), shape (B, ...)
    output: Tensor  # the node's forward output, shape (B, ...)
    record: ForwardRecord
    n_targets: int
    cache: dict[Any, Any] = field(default_factory=dict)  # modified weights, kept with the traced model
    leak: Optional[Tensor] = None  # (K, B) relevance the rule lost, when the rule knows it

    @property
    def x(self) -> Tensor:
        return self.inputs[0]

    @property
    def x_nonnegative(self) -> bool:
        """The first input is ≥ 0 by construction (known from the graph, no pass over the data)."""
        return bool(self.node.inputs and self.node.inputs[0].nonnegative)


class Rule:
    """A relevance rule. Subclasses implement :meth:`backward`.

    ``exact``: the rule passes on exactly the relevance it receives, by construction, so the engine
    does not spend a reduction checking it. A rule that knows its own loss cheaply may set
    ``step.leak`` (K, B) instead of letting the engine sum input and output relevance.
    """

    name = "rule"
    exact = False

    def backward(self, step: Step, R: Tensor) -> list[Optional[Tensor]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# --------------------------------------------------------------------------------------------
# Parameter-free rules
# --------------------------------------------------------------------------------------------


class Pass(Rule):
    """Identity: ``R_in = R`` (ReLU, Dropout, Identity; BatchNorm in the authors' LRP)."""

    name = "pass"
    exact = True

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
    """

    name = "winner-takes-all"

    def backward(self, step, R):
        idx = step.record.pool_indices.get(step.node.name)
        if idx is None:
            raise CxrExplainError(f"max-pool node {step.node.name!r} has no recorded indices")
        k = R.shape[0]
        x = step.x
        params = _pool_params(step.node, x)
        g = merge_kb(R * (step.output != 0))
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
    docs/rules.md §2.8). Average pools use the pool's transposed map. ``stabilizer`` adds ``ε·sign(z)``
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
            return [_unbroadcast(t * s, t.shape) for t in step.inputs]
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


def _unbroadcast(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum a (K, *broadcast_shape) relevance down to (K, *shape)."""
    target = (t.shape[0], *shape)
    if t.shape == target:
        return t
    while t.dim() > len(target):
        t = t.sum(1)
    dims = [i for i in range(1, t.dim()) if target[i] == 1 and t.shape[i] != 1]
    return t.sum(dims, keepdim=True) if dims else t


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


def _cached(step: Step, lm: LinearMap, key: tuple, make: Callable[[Tensor], Tensor]) -> Tensor:
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


_WEIGHT_MODS: dict[str, Callable[[Tensor], Tensor]] = {
    "id": lambda W: W,
    "pos": lambda W: W.clamp(min=0),
    "neg": lambda W: W.clamp(max=0),
    "abs": lambda W: W.abs(),
    "negabs": lambda W: (-W).clamp(min=0),
    "ones": lambda W: torch.ones_like(W),
    "square": lambda W: W * W,
}


def _weights(step: Step, lm: LinearMap, mod: str) -> Tensor:
    """Modified weights: ``id``, ``pos`` (W⁺), ``neg`` (W⁻), ``negabs`` (|W⁻|), ``abs``, ``ones``,
    ``square``. Cached (VGG's first dense layer has 100M weights: clamping it on every call would
    cost more than the layer)."""
    return _cached(step, lm, (step.node.name, mod), _WEIGHT_MODS[mod])


def _ones_response(step: Step, lm: LinearMap, mod: str, in_shape: Sequence[int]) -> Tensor:
    """``g(W)`` applied to an all-ones input of ``in_shape`` (zero padding included), shape
    (1, *out): with it a per-sample constant input costs no convolution (zᴮ's l and h, the flat
    rule). Cached like :func:`_weights`."""
    return _cached(step, lm, (step.node.name, mod, "ones-response", tuple(in_shape)),
                   lambda W: lm.forward(torch.ones((1, *in_shape), dtype=W.dtype, device=W.device),
                                        _weights(step, lm, mod)))


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
                zt = const[t.input_mod] * _ones_response(step, lm, t.param_mod, x.shape[1:])
            else:
                zt = lm.forward(ins[t.input_mod], _weights(step, lm, t.param_mod))
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
        backs = lm.transpose_many(s2, [_weights(step, lm, pm) for pm in factors], x.shape[1:])
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


# --------------------------------------------------------------------------------------------
# RAP rules (docs/rules.md §2.2 and §2.3)
# --------------------------------------------------------------------------------------------


class RapFirstStep(Rule):
    """RAP's first step at the last linear layer: absolute influence normalisation (docs/rules.md §2.2).

    For target t with input a, row w = W[t], bias b: ``c_i = a_i w_i``; ``Pos = Σ max(c,0)``,
    ``Neg = Σ min(c,0)``; ``b_pos = b·sdiv(Pos, Pos+Neg)``, ``b_neg = b·sdiv(Neg, Pos+Neg)`` spread over
    ``a_i > 0`` in proportion to ``a⁺_i W⁺_i`` resp. ``a⁺_i W⁻_i``; ``r = c + shares``;
    ``R_i = |r_i| · Σ r / Σ |r|``. The incoming relevance is a seed per (target, image): a one-hot
    (RAP starts from 1.0) or a contrast ``e_a − e_b``; each non-zero entry gets its own first step,
    scaled by the entry, so Σ R = Σ_t s_t · logit_t.
    """

    name = "rap-first-step"

    def backward(self, step, R):
        lm = LinearMap(step.node.module, step.node)
        if lm.is_conv:
            raise CxrExplainError(f"RAP's first step needs a Linear head; {step.node!r} is a convolution")
        a = step.x  # (B, D)
        if a.dim() != 2:
            raise CxrExplainError(f"RAP's first step expects a (batch, features) input at {step.node!r}")
        W = lm.weight.detach()
        bias = lm.bias.detach() if lm.bias is not None else None
        out = torch.zeros((R.shape[0], *a.shape), dtype=a.dtype, device=a.device)
        m = int((R != 0).sum(-1).max()) if R.numel() else 0
        if m == 0:
            return [out]
        # one first step per non-zero seed entry (a contrast has two), weighted by the entry
        idx = R.abs().topk(m, dim=-1).indices  # (K, B, m)
        for j in range(m):
            t = idx[..., j]  # (K, B)
            scale = R.gather(-1, t.unsqueeze(-1)).squeeze(-1)  # (K, B); 0 where a row has fewer entries
            out = out + self._unit(a, W, bias, t) * scale.unsqueeze(-1)
        return [out]

    @staticmethod
    def _unit(a: Tensor, W: Tensor, bias: Optional[Tensor], t: Tensor) -> Tensor:
        """The normalised first-step relevance (K, B, D) for output unit ``t`` (K, B), Σ = logit_t."""
        w = W[t]  # (K, B, D)
        b = bias[t] if bias is not None else torch.zeros(t.shape, dtype=a.dtype, device=a.device)
        c = a.unsqueeze(0) * w
        pos = c.clamp(min=0).sum(-1)
        neg = c.clamp(max=0).sum(-1)
        b_pos = b * sdiv(pos, pos + neg)
        b_neg = b * sdiv(neg, pos + neg)
        ap = a.clamp(min=0).unsqueeze(0)
        pp = ap * w.clamp(min=0)
        pn = ap * w.clamp(max=0)
        shares = pp * sdiv(b_pos, pp.sum(-1)).unsqueeze(-1) + pn * sdiv(b_neg, pn.sum(-1)).unsqueeze(-1)
        r = c + shares
        absr = r.abs()
        return absr * sdiv(r.sum(-1), absr.sum(-1)).unsqueeze(-1)


class RapHidden(Rule):
    """RAP's hidden Linear/Conv rule: relative influence with inhibitory double counting and the
    uniform shift (docs/rules.md §2.3), positive-input branch (inputs are post-ReLU, the a⁻ branch is 0).

    With ``x = a⁺``: ``P_j = Σ_i x_i W⁺_ji``, ``N_j = −Σ_i x_i W⁻_ji`` (computed as ``P − z`` from the
    stored pre-activation ``z``, one extra convolution instead of two), then

    * Conv: ``C_i = x_i Σ_j [W⁺_ji R⁺_j/P_j + |W⁻_ji| R⁻_j/N_j + |W⁻_ji| R_j/(P_j+N_j)]``
    * Linear: ``C_i = x_i Σ_j [W⁺_ji R_j/P_j + |W⁻_ji| R_j/(P_j+N_j)]``

    (safe divisions; the first two terms zeroed where P+N = 0, the last where N = 0); then
    ``Γ = #{i: C_i ≠ 0}`` per sample over the whole input, ``δ = sdiv(ΣC − ΣR, Γ)``,
    ``C_i ← C_i − δ`` where ``C_i ≠ 0``.
    """

    name = "rap-hidden"

    def __init__(self, shift: bool = True):
        self.shift = shift

    def backward(self, step, R):
        lm = LinearMap(step.node.module, step.node)
        signed = not step.x_nonnegative and bool((step.x < 0).any())
        x = step.x.clamp(min=0) if signed else step.x
        Wp = _weights(step, lm, "pos")
        P = lm.forward(x, Wp)
        z = step.output
        if lm.bias is not None:
            z = z - lm.bias_shape(z).detach()
        if signed:
            # signed input: z is not P − N any more; compute N directly
            N = -lm.forward(x, _weights(step, lm, "neg"))
        else:
            N = (P - z).clamp(min=0)
        # P, N ≥ 0, so P ≠ 0 or N ≠ 0 already implies P + N ≠ 0: the spec's extra masks are implied.
        inv_p = safe_inverse(P)
        inv_pn = safe_inverse(P + N).masked_fill_(N == 0, 0)  # the last term is zero where N = 0
        if lm.is_conv:
            s_pos = R.clamp(min=0) * inv_p
            s_neg = R.clamp(max=0) * safe_inverse(N) + R * inv_pn
        else:
            s_pos = R * inv_p
            s_neg = R * inv_pn
        k = R.shape[0]
        g = lm.transpose(merge_kb(s_pos), Wp, x.shape[1:])
        g = g + lm.transpose(merge_kb(s_neg), _weights(step, lm, "negabs"), x.shape[1:])
        C = x.unsqueeze(0) * split_kb(g, k)
        if self.shift:
            C, gamma = uniform_shift(C, per_sample_sum(R))
            step.leak = per_sample_sum(R) * (gamma == 0)  # all of R is lost only where nothing is active
        return [C]


def uniform_shift(C: Tensor, target_sum: Tensor) -> tuple[Tensor, Tensor]:
    """``C_i ← C_i − δ`` on the non-zero entries, ``δ = sdiv(ΣC − target, Γ)``, ``Γ = #(C ≠ 0)``
    counted per (target, sample) over the whole tensor (docs/rules.md §2.3). Returns (C, Γ); in place."""
    k, b = C.shape[:2]
    C = C.contiguous()
    flat = C.view(k * b, -1)
    nz = flat != 0
    gamma = nz.sum(1).view(k, b)
    delta = sdiv(per_sample_sum(C) - target_sum, gamma.to(C.dtype))
    flat.sub_(nz * delta.view(k * b, 1))
    return C, gamma
