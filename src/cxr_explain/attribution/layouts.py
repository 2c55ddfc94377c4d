"""Which feature map Grad-CAM reads, and how its axes are laid out.

A layer's output is a spatial map of an ``H × W`` image in one of three layouts:

* ``channels-first`` ``(B, C, h, w)`` — CNNs;
* ``channels-last`` ``(B, h, w, C)`` — ConvNeXt's LayerNorm inside a block, timm's Swin stages;
* ``tokens`` ``(B, P + h·w, C)`` — ViT / Swin token sequences with ``P`` class/register tokens in
  front (dropped), the rest read row by row as the ``h × w`` patch grid.

An ``h × w`` map *fits* the image when one down-sampling factor ``s`` explains both sides up to
rounding: ``|h − H/s| ≤ 1`` and ``|w − W/s| ≤ 1`` with ``h·w > 1``; a token grid, cut by a patch
embedding, must be exact: ``h, w ∈ {⌊H/s⌋, ⌈H/s⌉} × {⌊W/s⌋, ⌈W/s⌉}`` for one integer ``s``. A shape with no fitting reading
is not a spatial map; a shape with several (``(B, 16, 16, 16)`` at 64 px) is ambiguous and is never
guessed: :func:`layout_of` raises, asking for ``layer=`` (CLI ``--layer``).

:func:`choose_feature` walks the candidate layers from the logits backwards and takes the first whose
channel count is the classifier's input width and whose spatial positions the output depends on
(a ViT's final LayerNorm feeds only the class token, so the walk moves on to the last block's first
norm: the layer pytorch-grad-cam's tutorial uses).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

from ..errors import CxrExplainError

Tensor = torch.Tensor

CHANNELS_FIRST = "channels-first"
CHANNELS_LAST = "channels-last"
TOKENS = "tokens"
#: Leading tokens tried when a model does not declare its class/register token count.
MAX_PREFIX_TOKENS = 8


@dataclass(frozen=True)
class Layout:
    """How a layer output maps to ``(B, C, h, w)``: ``kind``, the spatial ``grid`` and, for tokens,
    the ``prefix`` tokens dropped in front of the patch grid."""

    kind: str
    grid: tuple[int, int]
    channels: int
    prefix: int = 0

    def to_nchw(self, t: Tensor) -> Tensor:
        """The ``(B, C, h, w)`` view of a tensor in this layout (its gradient has the same layout)."""
        h, w = self.grid
        if self.kind == CHANNELS_FIRST:
            return t
        if self.kind == CHANNELS_LAST:
            return t.permute(0, 3, 1, 2)
        return t[:, self.prefix:, :].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)

    def describe(self) -> str:
        """``tokens`` → ``tokens (1 prefix token dropped, 14×14 grid)`` etc., for messages."""
        h, w = self.grid
        if self.kind == TOKENS:
            return f"{self.kind} ({self.prefix} prefix token(s) dropped, {h}×{w} grid)"
        return f"{self.kind} ({h}×{w})"


def grid_fits(h: int, w: int, image_hw: tuple[int, int]) -> bool:
    """One down-sampling factor ``s`` gives ``|h − H/s| ≤ 1`` and ``|w − W/s| ≤ 1``, and ``h·w > 1``."""
    H, W = image_hw
    if h < 1 or w < 1 or h * w <= 1 or h > H or w > W:
        return False
    lo = max(H / (h + 1), W / (w + 1))
    hi = min(H / (h - 1) if h > 1 else float("inf"), W / (w - 1) if w > 1 else float("inf"))
    return lo <= hi


def patch_grid_fits(h: int, w: int, image_hw: tuple[int, int]) -> bool:
    """An integer patch size ``s`` gives ``h ∈ {⌊H/s⌋, ⌈H/s⌉}`` and ``w ∈ {⌊W/s⌋, ⌈W/s⌉}``, ``h·w > 1``."""
    H, W = image_hw
    if h < 1 or w < 1 or h * w <= 1 or h > H or w > W:
        return False
    for s in range(1, max(H, W) + 1):
        if h in (H // s, -(-H // s)) and w in (W // s, -(-W // s)):
            return True
    return False


def readings(shape: Sequence[int], image_hw: tuple[int, int], prefix_tokens: Optional[int] = None) -> list[Layout]:
    """Every layout under which a tensor of ``shape`` is a spatial map of an ``image_hw`` image.

    ``prefix_tokens``: the class/register token count the model declares; None tries 0 … 8."""
    out: list[Layout] = []
    if len(shape) == 4:
        _, a, b, c = shape
        if grid_fits(b, c, image_hw):
            out.append(Layout(CHANNELS_FIRST, (b, c), a))
        if grid_fits(a, b, image_hw):
            out.append(Layout(CHANNELS_LAST, (a, b), c))
    elif len(shape) == 3:
        _, n, c = shape
        prefixes = [prefix_tokens] if prefix_tokens is not None else range(MAX_PREFIX_TOKENS + 1)
        for p in prefixes:
            for h, w in _factor_pairs(n - p):
                if patch_grid_fits(h, w, image_hw):
                    out.append(Layout(TOKENS, (h, w), c, p))
    return out


def _factor_pairs(n: int) -> Iterable[tuple[int, int]]:
    return [(h, n // h) for h in range(1, n + 1) if n % h == 0] if n > 0 else []


def layout_of(name: str, shape: Sequence[int], image_hw: tuple[int, int], prefix_tokens: Optional[int] = None,
              channels: Optional[int] = None) -> Layout:
    """The one layout of layer ``name``'s output, or a one-line error (not spatial / ambiguous).

    ``channels``: the classifier's input width; among several readings, the one with that many
    channels is taken if it is the only one."""
    found = readings(shape, image_hw, prefix_tokens)
    if not found:
        raise CxrExplainError(
            f"layer {name!r} outputs shape {tuple(shape)}, not a spatial map of the {image_hw[0]}×{image_hw[1]} "
            "input ((B, C, h, w), (B, h, w, C) or tokens (B, N, C)); choose another layer")
    if len(found) > 1 and channels is not None:
        matching = [r for r in found if r.channels == channels]
        if len(matching) == 1:
            return matching[0]
    if len(found) > 1:
        raise CxrExplainError(ambiguous_message(name, shape, found))
    return found[0]


def ambiguous_message(name: str, shape: Sequence[int], found: Sequence[Layout]) -> str:
    options = "; ".join(r.describe() for r in found)
    hint = (" (or set model.num_prefix_tokens)" if any(r.kind == TOKENS for r in found) else "")
    return (f"layer {name!r} outputs shape {tuple(shape)}, which reads as several layouts ({options}); "
            f"pass layer= (CLI --layer) naming a layer with an unambiguous map{hint}")


@dataclass
class Candidate:
    """A layer output seen in one forward pass: ``name`` (what ``layer=`` accepts), its value and a
    ``key`` the caller uses to find it again (a graph node, a module)."""

    name: str
    value: Tensor
    key: object = None


def choose_feature(
    candidates: Sequence[Candidate],
    image_hw: tuple[int, int],
    gradient: Callable[[Candidate], Optional[Tensor]],
    channels: Optional[int] = None,
    prefix_tokens: Optional[int] = None,
) -> tuple[Candidate, Layout]:
    """The last candidate (in forward order) that is a spatial map the output depends on.

    First pass: only readings with ``channels`` channels (the classifier's input width); if none
    is found (VGG's classifier reads 4096 features), a second pass without that filter. A candidate
    whose fitting readings are several raises (never a guess); one whose ``gradient`` (∂ Σ logits /
    ∂ value, None when unused) is zero at every spatial position is skipped."""
    passes = [channels, None] if channels is not None else [None]
    for want in passes:
        for cand in reversed(candidates):
            v = cand.value
            if not isinstance(v, Tensor) or v.dim() not in (3, 4):
                continue
            found = readings(tuple(v.shape), image_hw, prefix_tokens)
            if want is not None:
                found = [r for r in found if r.channels == want]
            if not found:
                continue
            if len(found) > 1:
                raise CxrExplainError(ambiguous_message(cand.name, tuple(v.shape), found))
            g = gradient(cand)
            if g is None or not bool(found[0].to_nchw(g).ne(0).any()):
                continue
            return cand, found[0]
    raise CxrExplainError(
        f"found no spatial feature map ((B, C, h, w), (B, h, w, C) or tokens) of the {image_hw[0]}×{image_hw[1]} "
        "input that the logits depend on; pass layer= (CLI --layer)")


def declared_prefix_tokens(model: torch.nn.Module) -> Optional[int]:
    """Class/register tokens a model declares: timm's ``num_prefix_tokens``, else 1 for a
    ``class_token`` / ``cls_token`` parameter (+1 for a ``dist_token``), else None."""
    n = getattr(model, "num_prefix_tokens", None)
    if isinstance(n, int):
        return n
    cls = any(isinstance(getattr(model, a, None), torch.Tensor) for a in ("class_token", "cls_token"))
    if not cls:
        return None
    return 1 + int(isinstance(getattr(model, "dist_token", None), torch.Tensor))
