"""Gradient-based attributions with autograd, through the traced graph or the model itself.

* ``gradient``: ``∂y_t/∂x`` (Simonyan et al. 2014).
* ``gradient-x-input``: ``x ⊙ ∂y_t/∂x``.
* ``integrated-gradients``: ``(x − x̄) ⊙ (1/m) Σ_{k=1..m} ∂y_t/∂x |_{x̄ + (k−½)/m (x − x̄)}``
  (Sundararajan et al. 2017; midpoint Riemann sum, baseline x̄ = 0 by default, i.e. the
  normalisation mean image for ImageNet-normalised inputs).

All return the per-channel input attribution of shape (K, B, C, H, W). They take ``logits_of``, the
function ``x -> logits`` that the explained outputs are read from: :func:`traced_logits` (the traced
graph, its final sigmoid/softmax skipped) or :func:`cxr_explain.attribution.hooks.model_logits` (the
model run as it is, for models torch.fx cannot trace).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from .graph import TracedModel, record_forward
from .targets import Selection

Tensor = torch.Tensor
Choose = Callable[[Tensor], Selection]  # logits (B, n) -> the explained outputs
LogitsOf = Callable[[Tensor], Tensor]  # images (B, C, H, W) -> logits (B, n), differentiable


def traced_logits(traced: TracedModel) -> LogitsOf:
    """``x -> logits`` through the traced graph (out of place; nothing but the logits is kept)."""
    return lambda x: record_forward(traced, x, keep=set())[traced.logits]


def per_target_gradients(logits: Tensor, wrt: Tensor, sel: Selection) -> Iterator[tuple[int, Tensor]]:
    """For each target slot ``k`` of ``sel``: ``(k, ∂ Σ_b v_bk / ∂ wrt)`` with ``v = sel.values(logits)``
    (padding slots contribute nothing). The graph is kept until the last slot."""
    for j in range(sel.k):
        (g,) = torch.autograd.grad(sel.objective(logits, j), wrt, retain_graph=j < sel.k - 1)
        yield j, g


def input_gradients(logits_of: LogitsOf, x: Tensor, choose: Choose) -> tuple[Tensor, Tensor, Selection]:
    """``∂v_k/∂x`` for each of the K explained outputs: (grads (K, B, C, H, W), logits (B, n), selection).

    ``choose`` picks the explained outputs from the logits of the one forward (e.g. "predicted")."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = logits_of(xg)
        sel = choose(logits.detach())
        grads = [g for _, g in per_target_gradients(logits, xg, sel)]
    return torch.stack(grads), logits.detach(), sel


def integrated_gradients(
    logits_of: LogitsOf,
    x: Tensor,
    sel: Selection,
    steps: int = 32,
    baseline: Optional[Tensor] = None,
    chunk: int = 8,
) -> Tensor:
    """Integrated gradients (midpoint rule with ``steps`` points), shape (K, B, C, H, W)."""
    base = torch.zeros_like(x) if baseline is None else baseline.to(x).expand_as(x)
    diff = x - base
    total = torch.zeros((sel.k, *x.shape), dtype=x.dtype, device=x.device)
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    for start in range(0, steps, chunk):
        a = alphas[start:start + chunk]
        n = a.numel()
        pts = (base.unsqueeze(0) + a.view(-1, *([1] * x.dim())) * diff.unsqueeze(0)).reshape(n * x.shape[0], *x.shape[1:])
        g, _, _ = input_gradients(logits_of, pts, lambda _: sel.repeat(n))
        total += g.reshape(sel.k, n, *x.shape).sum(1)
    return diff.unsqueeze(0) * total / steps
