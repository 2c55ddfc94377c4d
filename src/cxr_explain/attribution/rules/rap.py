"""RAP's rules: the first step at the head and the hidden relative-influence rule with the uniform
shift (docs/rules.md §2.2, §2.3) and its signed-input branch (§9.5)."""
from __future__ import annotations

from typing import Optional

import torch

from ...errors import CxrExplainError
from .base import Rule, Tensor, merge_kb, per_sample_sum, sdiv, split_kb
from .linear import LinearMap, linear_map


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
    uniform shift (docs/rules.md §2.3), with the signed-input branch (§9.5). It also runs on
    LayerNorm / GroupNorm through their σ-constant linear map (§9.3, Conv form).

    Non-negative input ``x = a⁺`` (post-ReLU: VGG, ResNet, DenseNet): ``P_j = Σ_i x_i W⁺_ji``,
    ``N_j = −Σ_i x_i W⁻_ji`` (computed as ``P − z`` from the stored pre-activation ``z``, one extra
    convolution instead of two), then

    * Conv: ``C_i = x_i Σ_j [W⁺_ji R⁺_j/P_j + |W⁻_ji| R⁻_j/N_j + |W⁻_ji| R_j/(P_j+N_j)]``
    * Linear: ``C_i = x_i Σ_j [W⁺_ji R_j/P_j + |W⁻_ji| R_j/(P_j+N_j)]``

    (safe divisions; the first two terms zeroed where P+N = 0, the last where N = 0).

    Signed input (SiLU / GELU / a norm before the layer): the authors' second branch runs the same
    formula on ``|a⁻|`` with ``P'_j = Σ_i |a⁻_i| W⁺_ji`` and ``N'_j = Σ_i |a⁻_i| |W⁻_ji|``. Ours: each
    output's ``R_j`` is first split between the two branches in proportion to their total
    magnitude, ``R_j·(P_j+N_j)/T_j`` and ``R_j·(P'_j+N'_j)/T_j`` with ``T_j = P_j+N_j+P'_j+N'_j``, and
    the sum of both branches is shifted once (the authors shift each branch to ΣR, giving 2·ΣR).

    Then ``Γ = #{i: C_i ≠ 0}`` per sample over the whole input, ``δ = sdiv(ΣC − ΣR, Γ)``,
    ``C_i ← C_i − δ`` where ``C_i ≠ 0``.
    """

    name = "rap-hidden"

    def __init__(self, shift: bool = True):
        self.shift = shift

    def reads_output(self, node, inputs) -> bool:
        return not _signed(node, inputs[0])  # only the non-negative branch reads z = W x (for N)

    def backward(self, step, R):
        lm = linear_map(step)
        x = step.x
        k = R.shape[0]
        conv = lm.rap_conv_form
        signed = _signed(step.node, x)
        if not signed:
            P = lm.apply(step, x, "pos")
            N = (P - lm.preactivation(step)).clamp_(min=0)
            inv_pn = _inverse(P + N)
            s_pos, s_neg = _slots(R, R * inv_pn, P, N, conv)
            g = lm.apply_t(step, merge_kb(s_pos), ["pos"], x.shape[1:])[0]
            g += lm.apply_t(step, merge_kb(s_neg), ["negabs"], x.shape[1:])[0]
            C = x.unsqueeze(0) * split_kb(g, k)
        else:
            C = _signed_contributions(step, lm, x, R, conv)
        if self.shift:
            C, gamma = uniform_shift(C, per_sample_sum(R))
            step.leak = per_sample_sum(R) * (gamma == 0)  # all of R is lost only where nothing is active
        return [C]


def _signed_contributions(step, lm, x: Tensor, R: Tensor, conv: bool) -> Tensor:
    """The signed-input branch of :class:`RapHidden` before the shift: ``C = a⁺ ⊙ g⁺ + |a⁻| ⊙ g⁻``.

    With ``P, N`` (``P', N'``) the forward maps of ``a⁺`` (``|a⁻|``) through W⁺ and |W⁻|,
    ``u = R/T``, ``T = (P+N) + (P'+N')``, the slots of each branch (:func:`_slots` with ``u·(P+N)``
    resp. ``u·(P'+N')``) go back in one transposed map per weight modifier, both branches stacked
    along the batch: ``[g⁺; g⁻] = W⁺ᵀ[s₁; s₃] + |W⁻|ᵀ[s₂; s₄]``.

    The same operations in the same order as the formula, arranged for memory: each forward map is
    freed (or overwritten in place) once its last use is done, so at most about five output-sized
    tensors are alive at once instead of eleven (ConvNeXt's 4×-wide linear layers set the peak)."""
    k, b = R.shape[0], x.shape[0]
    xp = x.clamp(min=0)  # a⁺
    P, N = lm.apply(step, xp, "pos"), lm.apply(step, xp, "negabs")
    del xp
    xn = (-x).clamp_(min=0)  # |a⁻|
    Pn, Nn = lm.apply(step, xn, "pos"), lm.apply(step, xn, "negabs")
    del xn
    if conv:  # the slots need P and N apart: keep them, recompute the sums P + N where used
        T = P + N
        T += Pn + Nn
    else:  # the slots need P and P + N only: N's storage takes P + N
        mag_p, mag_n = N.add_(P), Nn.add_(Pn)
        del N, Nn
        T = mag_p + mag_n
    u = _times(R, _inverse_(T))  # R_j / T_j: each branch gets u·(P+N) resp. u·(P'+N')
    del T
    if conv:
        s1, s2 = _slots_into(_times(u, P + N), u, P, N)
        del P, N
        s3, s4 = _slots_into(_times(u, Pn + Nn), u, Pn, Nn)
        del Pn, Nn
    else:  # Linear form: s⁺ = u·(P+N)/P, s⁻ = u in both branches
        s1 = _times(u, mag_p).mul_(_inverse_(P))
        del mag_p, P
        s3 = _times(u, mag_n).mul_(_inverse_(Pn))
        del mag_n, Pn
        s2 = s4 = u
    n = k * b
    stacked = torch.cat([merge_kb(s1), merge_kb(s3)])
    del s1, s3
    g = lm.apply_t(step, stacked, ["pos"], x.shape[1:])[0]
    stacked[:n] = merge_kb(s2)  # reuse the buffer for [s₂; s₄]
    stacked[n:] = merge_kb(s4)
    del s2, s4, u
    g += lm.apply_t(step, stacked, ["negabs"], x.shape[1:])[0]
    del stacked
    C = x.clamp(min=0).unsqueeze(0) * split_kb(g[:n], k)
    C.addcmul_((-x).clamp_(min=0).unsqueeze(0), split_kb(g[n:], k))
    return C


def _times(a: Tensor, b: Tensor) -> Tensor:
    """``a * b`` for ``a`` (K, B, …) and ``b`` (B, …), written into ``b``'s storage when K = 1 (the
    caller no longer needs ``b``); the same products either way."""
    if a.shape[0] == 1 and a.shape[1:] == b.shape:
        return b.unsqueeze(0).mul_(a)
    return a * b


def _inverse_(d: Tensor) -> Tensor:
    """:func:`_inverse` in place (``d`` is overwritten)."""
    zero = d == 0
    d.reciprocal_()
    return d.masked_fill_(zero, 0) if bool(zero.any()) else d


def _slots_into(Rb: Tensor, u: Tensor, P: Tensor, N: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_slots`' Conv form for a branch's relevance ``Rb`` and ``u = R/T``, overwriting ``Rb``,
    ``P`` and ``N``: ``s⁺ = Rb⁺/P``, ``s⁻ = Rb⁻/N + u``."""
    s_pos = Rb.clamp(min=0).mul_(_inverse_(P))
    s_neg = Rb.clamp_(max=0).mul_(_inverse_(N)).add_(u)
    return s_pos, s_neg


def _signed(node, x: Tensor) -> bool:
    """The layer input ``x`` has a negative entry (not known ≥ 0 from the graph): the signed branch."""
    return not (node.inputs and node.inputs[0].nonnegative) and bool(x.min() < 0)


def _inverse(d: Tensor) -> Tensor:
    """``1/d`` where ``d ≠ 0``, else 0 (the mask only when a zero occurs)."""
    zero = d == 0
    inv = torch.reciprocal(d)
    return inv.masked_fill_(zero, 0) if bool(zero.any()) else inv


def _slots(R: Tensor, R_over_pn: Tensor, P: Tensor, N: Tensor, conv_form: bool) -> tuple[Tensor, Tensor]:
    """The relevance per unit of excitation (``s⁺``, through W⁺) and of inhibition (``s⁻``, through
    |W⁻|) of docs/rules.md §2.3, given ``R`` and ``R/(P+N)`` (safe): Conv form ``s⁺ = R⁺/P``,
    ``s⁻ = R⁻/N + R/(P+N)``; Linear form ``s⁺ = R/P``, ``s⁻ = R/(P+N)``; safe divisions.

    The authors also zero the ``R/(P+N)`` term where N = 0; that changes nothing, so it is left out:
    with P, N ≥ 0 built from x ≥ 0, N_j = 0 means every input i of output j has x_i |W⁻_ji| = 0, so
    output j's inhibitory term reaches C_i = x_i Σ_j |W⁻_ji| s⁻_j as an exact 0 (for finite s⁻_j)."""
    if conv_form:
        s_neg = R.clamp(max=0).mul_(_inverse(N)).add_(R_over_pn)
        return R.clamp(min=0).mul_(_inverse(P)), s_neg
    return R * _inverse(P), R_over_pn


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


class RapConstantCat(Rule):
    """``torch.cat`` of data with learned constants (a ViT's class token) under RAP (ours,
    docs/rules.md §10.9): the relevance is sliced back as for any concatenation; the constants'
    share has no input to go to, so, as RAP does for the biases it leaves out, the uniform shift of
    §2.3 gives it back to the data: ``δ = sdiv(Σ R_data − Σ R, Γ)`` subtracted from the ``Γ`` non-zero
    entries of the data parts (counted over all of them together, per target and image)."""

    name = "rap-constant-cat"

    def backward(self, step, R):
        fx_node = step.node.fx_node
        dim = fx_node.kwargs.get("dim", fx_node.args[1] if len(fx_node.args) > 1 else 0)
        dim = dim % step.output.dim()
        parts = list(torch.split(R, [t.shape[dim] for t in step.inputs], dim=dim + 1))
        data = [i for i, n in enumerate(step.input_nodes) if n.data]
        if len(data) == len(parts) or not data:
            return parts
        k, b = R.shape[:2]
        flat = torch.cat([parts[i].reshape(k, b, -1) for i in data], -1)
        shifted, gamma = uniform_shift(flat, per_sample_sum(R))
        step.leak = per_sample_sum(R) * (gamma == 0)
        out: list[Optional[Tensor]] = [None] * len(parts)
        pieces = shifted.split([parts[i][0, 0].numel() for i in data], -1)
        for i, piece in zip(data, pieces):
            out[i] = piece.reshape(parts[i].shape)
        return out

