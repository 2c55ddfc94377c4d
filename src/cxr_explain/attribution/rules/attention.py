"""Attention rules after AttnLRP (Achtibat et al., ICML 2024) and CP-LRP (Ali et al., ICML 2022),
written from the papers' formulas (docs/rules.md §10).

* :class:`SoftmaxLinearised`: softmax ``s = softmax(x)`` linearised around its own input, the
  z-rule of its first-order Taylor expansion ``s ≈ J x + (s − J x)``:
  ``R_in = x ⊙ (R − s ⊙ Σ_dim R)`` (positions with ``x = −∞``, masked out, get 0). What the
  expansion's bias ``s − J x`` would carry is lost: ``Σ R_in = Σ R − Σ (s − J x) ⊙ R / s``.
* :class:`Blocked`: CP-LRP's softmax: the attention weights are held constant, nothing flows in.
* :class:`Matmul`: a product ``a @ b``. Both operands data: AttnLRP's uniform rule, the z-rule on
  each operand with the other held constant, halved: ``R_a = ½ a ⊙ (s bᵀ)``, ``R_b = ½ b ⊙ (aᵀ s)``,
  ``s = R / out``; Σ R_a + Σ R_b = Σ R. One operand a constant (a parameter) or, under CP-LRP, the
  softmax's attention weights: that operand is held constant and the other gets ``a ⊙ (s bᵀ)``.
* :class:`Attention`: a whole attention call (``F.scaled_dot_product_attention``, or the engine's
  decomposed ``nn.MultiheadAttention`` / Swin window attention): the three rules above applied to
  ``S = scale · q kᵀ``, ``X = S + bias``, ``A = softmax(X)``, ``O = A v``, recomputed from the
  stored q, k, v (the additive bias / mask is a constant: its share of X is lost).
* :class:`Reindex`: ops that only move, copy or zero-pad entries (roll, head split, window
  partition): the relevance is moved back by the op's vector–Jacobian product, exactly.

The stabiliser of every division is ``stab(d) = d + ε·sign(d)`` (sign(0) = +1), or for ε = 0 the
safe division of docs/rules.md §1.1.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

from ...errors import CxrExplainError
from ..decompose import attention as engine_attention
from ..graph import LayerNode, rerun, rerun_arguments
from .base import Rule, Step, Tensor, carries_data, sdiv

# kinds a tensor passes through unchanged on its way from a softmax to a matmul (dropout, views)
_TRANSPARENT = ("identity", "reshape", "reindex")


def stabilized_divide(n: Tensor, d: Tensor, epsilon: float) -> Tensor:
    """``n / (d + ε·sign(d))`` with sign(0) = +1; for ε = 0 the safe division ``sdiv(n, d)``."""
    if epsilon:
        return n / (d + epsilon * torch.where(d >= 0, 1.0, -1.0).to(d.dtype))
    return sdiv(n, d)


def softmax_linearised(x: Tensor, s: Tensor, R: Tensor, dim: int) -> Tensor:
    """AttnLRP's softmax rule ``R_in = x ⊙ (R − s ⊙ Σ_dim R)``; ``x`` (B, …), ``s = softmax(x)``,
    ``R`` (K, B, …), ``dim`` counted on ``x``. Entries with ``x = ±∞`` (masks) get 0."""
    x = torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))
    d = dim % x.dim() + 1
    return x.unsqueeze(0) * (R - s.unsqueeze(0) * R.sum(d, keepdim=True))


def _unbroadcast(t: Tensor, shape: Sequence[int]) -> Tensor:
    """Sum a (K, *broadcast_shape) tensor down to (K, *shape) (matmul's batch broadcasting)."""
    extra = t.dim() - 1 - len(shape)
    if extra > 0:
        t = t.sum(tuple(range(1, 1 + extra)))
    dims = [i + 1 for i, n in enumerate(shape) if n == 1 and t.shape[i + 1] != 1]
    return t.sum(dims, keepdim=True) if dims else t


def matmul_relevance(a: Tensor, b: Tensor, R: Tensor, epsilon: float = 0.0, share_a: float = 0.5,
                     share_b: float = 0.5) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """z-rule on each operand of ``out = a @ b`` with the other held constant, scaled by its share:
    ``R_a = share_a · a ⊙ (s bᵀ)``, ``R_b = share_b · b ⊙ (aᵀ s)``, ``s = R / stab(a @ b)``.
    ``a`` (…, L, D), ``b`` (…, D, M) without the target axis; ``R`` (K, …, L, M). A share of 0 gives None."""
    if a.dim() < 2 or b.dim() < 2:
        raise CxrExplainError("the matmul relevance rule needs operands with at least 2 dimensions")
    s = stabilized_divide(R, torch.matmul(a, b).unsqueeze(0), epsilon)
    ra = rb = None
    if share_a:
        ra = _unbroadcast(share_a * a.unsqueeze(0) * torch.matmul(s, b.transpose(-1, -2).unsqueeze(0)), a.shape)
    if share_b:
        rb = _unbroadcast(share_b * b.unsqueeze(0) * torch.matmul(a.transpose(-1, -2).unsqueeze(0), s), b.shape)
    return ra, rb


def attention_relevance(q: Tensor, k: Tensor, v: Tensor, R: Tensor, scale: float, bias: Optional[Tensor] = None,
                        cp: bool = False, epsilon: float = 0.0
                        ) -> tuple[Optional[Tensor], Optional[Tensor], Tensor, Tensor]:
    """Relevance of ``O = softmax(scale · q kᵀ + bias) v`` for q (…, L, d), k (…, M, d), v (…, M, dv)
    and R (K, …, L, dv). Returns ``(R_q, R_k, R_v, lost)`` with ``lost`` (K, …) the relevance the
    softmax linearisation and the bias absorbed (0 under CP-LRP, where R_q = R_k = None).

    AttnLRP: ``R_A, R_v`` = uniform matmul rule at ``A v``; ``R_X`` = softmax rule at ``X``;
    the bias takes ``bias ⊙ R_X / X``; ``R_q, R_k`` = uniform matmul rule at ``q kᵀ``, whose z-rule
    denominator ``S`` times its relevance ``S ⊙ R_X / X`` gives ``s = R_X / X`` directly.
    CP-LRP: ``A`` constant, ``R_v = v ⊙ (Aᵀ (R / O))``.
    """
    S = torch.matmul(q, k.transpose(-1, -2)) * scale
    X = S if bias is None else S + bias
    A = torch.softmax(X, dim=-1)
    if cp:
        _, rv = matmul_relevance(A, v, R, epsilon, 0.0, 1.0)
        return None, None, rv, torch.zeros(R.shape[:2], dtype=R.dtype, device=R.device)
    ra, rv = matmul_relevance(A, v, R, epsilon, 0.5, 0.5)
    rx = softmax_linearised(X, A, ra, -1)
    s = stabilized_divide(rx, X.unsqueeze(0), epsilon) * scale
    rq = 0.5 * q.unsqueeze(0) * torch.matmul(s, k.unsqueeze(0))
    rk = 0.5 * k.unsqueeze(0) * torch.matmul(s.transpose(-1, -2), q.unsqueeze(0))
    k_, b_ = R.shape[:2]
    lost = (R.reshape(k_, b_, -1).sum(-1) - rq.reshape(k_, b_, -1).sum(-1) - rk.reshape(k_, b_, -1).sum(-1)
            - rv.reshape(k_, b_, -1).sum(-1))
    return rq, rk, rv, lost


# --------------------------------------------------------------------------------------------
# Graph helpers
# --------------------------------------------------------------------------------------------


def _occurrences(step: Step) -> list[Any]:
    """The keys (argument position or keyword) of the node's tensor inputs, in the order the engine
    passes them (``step.inputs``): positional arguments first, then keywords."""
    fx_node = step.node.fx_node
    values = step.record.values
    keys: list[Any] = []

    def visit(key):
        def f(n):
            if carries_data(values.get(n.name)):
                keys.append(key)
            return n
        return f

    for i, a in enumerate(fx_node.args):
        fx.node.map_arg(a, visit(i))
    for name, a in fx_node.kwargs.items():
        fx.node.map_arg(a, visit(name))
    return keys


def _from_softmax(node: LayerNode) -> bool:
    """``node``'s value is a softmax output, possibly through dropout / identity / views."""
    while node.kind in _TRANSPARENT and node.inputs:
        node = node.inputs[0]
    return node.kind == "softmax"


def _softmax_dim(step: Step) -> int:
    node = step.node
    if node.module is not None:
        dim = getattr(node.module, "dim", None)
    else:
        fx_node = node.fx_node
        dim = fx_node.kwargs.get("dim", fx_node.args[1] if len(fx_node.args) > 1 else None)
    if dim is None:
        raise CxrExplainError(f"softmax node {node.name!r} has no explicit dim; the softmax rule needs one")
    return int(dim)


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


class SoftmaxLinearised(Rule):
    """AttnLRP's softmax rule (Proposition 3.1): ``R_in = x ⊙ (R − s ⊙ Σ_dim R)``, the z-rule of the
    softmax's linearisation ``s ≈ J x + (s − J x)`` at its input; not conserving (the bias term)."""

    name = "softmax-linearised"

    def backward(self, step, R):
        return [softmax_linearised(step.x, step.output, R, _softmax_dim(step))]


class Blocked(Rule):
    """CP-LRP's softmax: the attention weights are held constant, so no relevance reaches the
    softmax input (nor q and k). The relevance at the weights is 0 under CP-LRP's matmul rule."""

    name = "blocked"

    def backward(self, step, R):
        return [None for _ in step.inputs]


class Matmul(Rule):
    """``a @ b`` (``torch.matmul``, ``@``, ``bmm``): the z-rule on each operand with the other held
    constant, ``R_a = w_a · a ⊙ (s bᵀ)``, ``R_b = w_b · b ⊙ (aᵀ s)``, ``s = R / stab(a @ b)``.

    ``w_a = w_b = ½`` when both operands depend on the input (AttnLRP's uniform rule); ``w = 1`` for
    the only data operand when the other is a constant; with ``cp=True`` an operand that is the
    softmax's attention weights is a constant too (CP-LRP: all relevance to the values)."""

    name = "matmul"

    def __init__(self, cp: bool = False, epsilon: float = 0.0):
        self.cp = cp
        self.epsilon = epsilon

    def __repr__(self):
        return f"Matmul(cp={self.cp}, epsilon={self.epsilon})"

    def backward(self, step, R):
        if len(step.inputs) != 2:
            raise CxrExplainError(f"matmul node {step.node.name!r}: the rule needs two tensor operands")
        a_node, b_node = step.input_nodes
        data = [a_node.data, b_node.data]
        if self.cp:
            data = [d and not _from_softmax(n) for d, n in zip(data, (a_node, b_node))]
        n = sum(data)
        if n == 0:
            if self.cp:
                raise CxrExplainError(f"matmul node {step.node.name!r}: both operands are attention weights; "
                                      "CP-LRP cannot pass relevance through it")
            return [None, None]
        share = [1.0 / n if d else 0.0 for d in data]
        a, b = step.inputs
        if a.dim() < 2 or b.dim() < 2:
            raise CxrExplainError(f"matmul node {step.node.name!r}: 1-D operands are not supported")
        ra, rb = matmul_relevance(a, b, R, self.epsilon, share[0], share[1])
        return [ra, rb]


class Attention(Rule):
    """A whole attention call: ``F.scaled_dot_product_attention(q, k, v, attn_mask, …, is_causal,
    scale)`` or the engine's ``attention(q, k, v, bias, scale)`` (docs/rules.md §10.4).

    Recomputes ``S = scale · q kᵀ``, ``X = S + bias`` (a boolean mask is 0 / −∞, ``is_causal`` the
    lower triangle), ``A = softmax(X)``, ``O = A v`` from the stored q, k, v, then AttnLRP's rules
    (``cp=False``) or CP-LRP's (``cp=True``): see :func:`attention_relevance`."""

    name = "attention"

    def __init__(self, cp: bool = False, epsilon: float = 0.0):
        self.cp = cp
        self.epsilon = epsilon

    def __repr__(self):
        return f"Attention(cp={self.cp}, epsilon={self.epsilon})"

    def backward(self, step, R):
        fx_node = step.node.fx_node
        args, kw = rerun_arguments(step.node, step.record)
        names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
        if fx_node.target is engine_attention:
            names = ["query", "key", "value", "bias", "scale"]
        call = dict(zip(names, args))
        call.update(kw)
        q, k, v = call["query"], call["key"], call["value"]
        if call.get("enable_gqa", False):
            raise CxrExplainError(f"attention node {step.node.name!r}: grouped-query attention is not supported")
        scale = call.get("scale")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        bias = attention_bias(call.get("attn_mask", call.get("bias")), bool(call.get("is_causal", False)),
                              q.shape[-2], k.shape[-2], q.dtype, q.device)
        rq, rk, rv, lost = attention_relevance(q, k, v, R, scale, bias, self.cp, self.epsilon)
        roles = {0: rq, "query": rq, 1: rk, "key": rk, 2: rv, "value": rv}
        return [roles.get(key) for key in _occurrences(step)]


def attention_bias(mask: Optional[Tensor], is_causal: bool, L: int, M: int, dtype: torch.dtype,
                   device: torch.device) -> Optional[Tensor]:
    """The additive bias of scaled-dot-product attention: a float mask as is, a boolean mask as
    0 (attend) / −∞, ``is_causal`` as −∞ above the diagonal; None when there is none."""
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, -math.inf) \
            if mask.dtype == torch.bool else mask.to(dtype)
    if is_causal:
        causal = torch.ones(L, M, dtype=torch.bool, device=device).tril()
        c = torch.zeros(L, M, dtype=dtype, device=device).masked_fill(~causal, -math.inf)
        bias = c if bias is None else bias + c
    return bias


class Reindex(Rule):
    """Ops that only move, copy or zero-pad entries (``torch.roll``, head split / merge, Swin's window
    partition and patch-merging gather): ``R_in = Jᵀ R``, the op's vector–Jacobian product, which moves
    every entry's relevance back to where it came from; padded zeros' relevance is dropped. Every
    data operand (depending on the image) receives its part, unlike §9's ``Rearrange`` (first operand)."""

    name = "reindex"

    def backward(self, step, R):
        node = step.node
        data: dict[str, int] = {}  # name -> first position among the engine's operands
        for i, inp in enumerate(step.input_nodes):
            if inp.data and inp.name not in data:
                data[inp.name] = i
        outs: list[Optional[Tensor]] = [None for _ in step.inputs]
        if not data:
            return outs
        with torch.enable_grad():
            leaves = {name: step.inputs[i].detach().requires_grad_(True) for name, i in data.items()}
            out = rerun(node, step.record, leaves)
            xs = list(leaves.values())
            per_target = [torch.autograd.grad(out, xs, R[j], retain_graph=j < R.shape[0] - 1, allow_unused=True)
                          for j in range(R.shape[0])]
        for slot, i in enumerate(data.values()):
            outs[i] = torch.stack([g[slot] if g[slot] is not None else torch.zeros_like(xs[slot])
                                   for g in per_target]).detach()
        return outs
