"""Depthwise convolutions (one input channel per group) as k² shifted multiply–adds.

PyTorch's CPU kernel for grouped float64 convolutions loops over the groups (an EfficientNet block's
1,152 groups cost ~60 ms for a 2×2 map); written as a sum over the kernel taps,

    z[b, o, y, x] = Σ_{u,v} w[o, 0, u, v] · x_pad[b, o // m, s·y + d·u, s·x + d·v]      (m = C_out / C_in)

costs k² element-wise products instead. The transpose scatters the same products back:

    (Wᵀ s)[b, c, s·y + d·u, s·x + d·v] += Σ_{o: o // m = c} w[o, 0, u, v] · s[b, o, y, x]

Used by :class:`~.linear.LinearMap` for float64 (float32 keeps the oneDNN kernels, which are fast).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def is_depthwise(weight: Tensor, groups: int) -> bool:
    """One input channel per group (``weight`` is (C_out, 1, …)) and more than one group."""
    return groups > 1 and weight.shape[1] == 1


def _taps(kernel: Sequence[int]) -> list[tuple[int, ...]]:
    taps: list[tuple[int, ...]] = [()]
    for k in kernel:
        taps = [t + (u,) for t in taps for u in range(k)]
    return taps


def _window(tap: Sequence[int], out: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> tuple:
    return (slice(None), slice(None)) + tuple(slice(d * u, d * u + s * (n - 1) + 1, s)
                                              for u, n, s, d in zip(tap, out, stride, dilation))


def depthwise_conv(x: Tensor, w: Tensor, stride: Sequence[int], pads: Sequence[tuple[int, int]],
                   dilation: Sequence[int]) -> Tensor:
    """``conv(x, w, groups=C_in)`` for x (B, C_in, *spatial), w (C_out, 1, *kernel), explicit (left, right)
    zero padding per spatial dim; no bias."""
    kernel = w.shape[2:]
    flat_pads = [p for lr in reversed(pads) for p in lr]
    xp = F.pad(x, flat_pads) if any(flat_pads) else x
    m = w.shape[0] // x.shape[1]
    if m > 1:
        xp = xp.repeat_interleave(m, dim=1)
    out_size = [(n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip(xp.shape[2:], kernel, stride, dilation)]
    wv = w.reshape(1, w.shape[0], -1)
    z = None
    for i, tap in enumerate(_taps(kernel)):
        term = xp[_window(tap, out_size, stride, dilation)] * wv[..., i].reshape(1, -1, *[1] * len(kernel))
        z = term if z is None else z.add_(term)
    return z


def depthwise_conv_transpose(s: Tensor, w: Tensor, in_shape: Sequence[int], stride: Sequence[int],
                             pads: Sequence[tuple[int, int]], dilation: Sequence[int]) -> Tensor:
    """``Wᵀ s`` of :func:`depthwise_conv`: s (N, C_out, *out) -> (N, *in_shape)."""
    kernel = w.shape[2:]
    c_in = in_shape[0]
    m = w.shape[0] // c_in
    padded = [n + l + r for n, (l, r) in zip(in_shape[1:], pads)]
    full = s.new_zeros((s.shape[0], w.shape[0], *padded))
    wv = w.reshape(1, w.shape[0], -1)
    for i, tap in enumerate(_taps(kernel)):
        full[_window(tap, s.shape[2:], stride, dilation)] += s * wv[..., i].reshape(1, -1, *[1] * len(kernel))
    if m > 1:
        full = full.reshape(s.shape[0], c_in, m, *padded).sum(2)
    crop = (slice(None), slice(None)) + tuple(slice(l, l + n) for n, (l, _) in zip(in_shape[1:], pads))
    return full[crop]
