"""Gradient-based attributions, computed through the traced graph with autograd.

* ``gradient``: ``∂y_t/∂x`` (Simonyan et al. 2014).
* ``gradient-x-input``: ``x ⊙ ∂y_t/∂x``.
* ``integrated-gradients``: ``(x − x̄) ⊙ (1/m) Σ_{k=1..m} ∂y_t/∂x |_{x̄ + (k−½)/m (x − x̄)}``
  (Sundararajan et al. 2017; midpoint Riemann sum, baseline x̄ = 0 by default, i.e. the
  normalisation mean image for ImageNet-normalised inputs).

All return the per-channel input attribution of shape (K, B, C, H, W).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Union

import torch

from .graph import TracedModel, record_forward

Tensor = torch.Tensor


def _selected(logits: Tensor, targets_k: Tensor) -> Tensor:
    """Σ_b logits[b, t_b] over images with a valid target (t ≥ 0)."""
    valid = targets_k >= 0
    idx = targets_k.clamp(min=0).unsqueeze(1)
    return (logits.gather(1, idx).squeeze(1) * valid).sum()


def per_target_gradients(logits: Tensor, wrt: Tensor, targets: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """For each target column ``t`` of ``targets`` (B, K): ``(t, ∂ Σ_b y_{b, t_b} / ∂ wrt)``; images
    whose target is padding (−1) contribute nothing. The graph is kept until the last target."""
    k = targets.shape[1]
    for j in range(k):
        t = targets[:, j]
        (g,) = torch.autograd.grad(_selected(logits, t), wrt, retain_graph=j < k - 1)
        yield t, g


def input_gradients(
    traced: TracedModel, x: Tensor, targets: Union[Tensor, Callable[[Tensor], Tensor]]
) -> tuple[Tensor, Tensor, Tensor]:
    """``∂y_t/∂x`` for each of the K targets: (grads (K, B, C, H, W), logits (B, n), targets (B, K)).

    ``targets`` may be a function of the logits (e.g. "predicted"), resolved after the one forward."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        record = record_forward(traced, xg, keep=set())
        logits = record[traced.logits]
        if callable(targets):
            targets = targets(logits.detach())
        grads = [g for _, g in per_target_gradients(logits, xg, targets)]
    return torch.stack(grads), logits.detach(), targets


def integrated_gradients(
    traced: TracedModel,
    x: Tensor,
    targets: Tensor,
    steps: int = 32,
    baseline: Optional[Tensor] = None,
    chunk: int = 8,
) -> Tensor:
    """Integrated gradients (midpoint rule with ``steps`` points), shape (K, B, C, H, W)."""
    base = torch.zeros_like(x) if baseline is None else baseline.to(x).expand_as(x)
    diff = x - base
    k = targets.shape[1]
    total = torch.zeros((k, *x.shape), dtype=x.dtype, device=x.device)
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    for start in range(0, steps, chunk):
        a = alphas[start:start + chunk]
        n = a.numel()
        pts = (base.unsqueeze(0) + a.view(-1, *([1] * x.dim())) * diff.unsqueeze(0)).reshape(n * x.shape[0], *x.shape[1:])
        tg = targets.repeat(n, 1)
        g, _, _ = input_gradients(traced, pts, tg)
        total += g.reshape(k, n, *x.shape).sum(1)
    return diff.unsqueeze(0) * total / steps
