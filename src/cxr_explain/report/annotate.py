"""A self-describing overlay: the film with its map, a header saying what the map explains, and a
colour bar with the map's scale.

Layout (uint8 RGB): a header band (file; method, target, probability, logit), below it the film
(long side at most ``max_side`` px) with the map blended in proportion to its strength (nothing over
zero relevance, :func:`~.overlay.overlay` with ``veil="proportional"``) and the lesion boxes, and to
its right the colour bar: signed maps in ``seismic`` from −max|h| (blue, evidence against) to
+max|h| (red, evidence for), CAM-family maps in ``jet`` from their minimum to their maximum.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.types import Box
from .overlay import ArrayLike, overlay, resize_map, to_gray_uint8

#: Blend strength at the map's strongest pixel.
ALPHA_SIGNED = 0.7
ALPHA_CAM = 0.6


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def annotated_overlay(
    xray: ArrayLike,
    h: ArrayLike,
    *,
    signed: bool,
    title: str,
    subtitle: str = "",
    boxes: Iterable[Box] = (),
    box_space: Optional[tuple[int, int]] = None,
    max_side: int = 1024,
    cmap: Optional[str] = None,
) -> np.ndarray:
    """The annotated overlay (module docstring) of map ``h`` (any resolution, resized bilinearly)
    on ``xray`` (H, W). ``boxes`` are in the X-ray's pixels unless ``box_space = (H, W)`` says
    otherwise. Returns uint8 (H', W', 3)."""
    gray = to_gray_uint8(xray)
    height, width = gray.shape
    scale = min(1.0, max_side / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        gray = np.asarray(Image.fromarray(gray).resize(size, Image.BILINEAR))
    fh, fw = gray.shape
    space = box_space or (height, width)
    m = resize_map(h, (fh, fw))
    film = overlay(gray, m, alpha=ALPHA_SIGNED if signed else ALPHA_CAM, cmap=cmap, symmetric=signed,
                   boxes=list(boxes), box_space=space, box_width=max(2, fw // 256), veil="proportional")

    fs = max(12, fw // 48)
    font, small = _font(fs), _font(max(10, fs * 4 // 5))
    pad = fs // 2
    header = 2 * (fs + pad) + pad
    bar_w = max(12, fw // 40)
    label_w = 6 * fs
    canvas = np.full((header + fh, fw + pad + bar_w + pad + label_w, 3), 255, np.uint8)
    canvas[header:, :fw] = film

    # colour bar: top = largest value
    top, bottom = header + pad, header + fh - pad
    n = max(2, bottom - top)
    v = np.linspace(1.0, 0.0, n)
    colours = matplotlib.colormaps[cmap or ("seismic" if signed else "jet")](v)[:, :3]
    x0 = fw + pad
    canvas[top:top + n, x0:x0 + bar_w] = np.round(colours * 255).astype(np.uint8)[:, None, :]

    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    if subtitle:
        draw.text((pad, pad + fs + pad), subtitle, fill=(0, 0, 0), font=small)
    a = np.asarray(m, dtype=np.float64)
    if signed:
        hi = float(np.abs(a).max()) if a.size else 0.0
        ticks = [(0.0, f"+{_fmt(hi)}"), (0.5, "0"), (1.0, _fmt(-hi))]
    else:
        ticks = [(0.0, _fmt(float(a.max()) if a.size else 0.0)), (1.0, _fmt(float(a.min()) if a.size else 0.0))]
    for frac, text in ticks:
        y = top + frac * (n - 1)
        draw.line([(x0 + bar_w, y), (x0 + bar_w + pad // 2, y)], fill=(0, 0, 0), width=1)
        draw.text((x0 + bar_w + pad, y - fs // 2), text, fill=(0, 0, 0), font=small)
    return np.asarray(pil).copy()


def caption(method: str, target: str, probability: Optional[float] = None, logit: Optional[float] = None,
            explained: Optional[float] = None, signed: bool = True, finding: Optional[str] = None) -> str:
    """The overlay's second header line: method, target, p and logit of the finding the map is named
    after (``finding``, shown when it differs from the target, e.g. a contrast's first class), the
    explained value when it is not that logit (a contrast, a probability), and what colour means."""
    parts = [method, f"target {target}"]
    of = f"({finding})" if finding and finding != target else ""
    if probability is not None and np.isfinite(probability):
        parts.append(f"p{of} = {probability:.3f}")
    if logit is not None and np.isfinite(logit):
        parts.append(f"logit{of} = {logit:.3f}")
    if explained is not None and np.isfinite(explained) and (logit is None or abs(explained - logit) > 1e-6):
        parts.append(f"explained = {explained:.3g}")
    parts.append("red: for, blue: against" if signed else "CAM: class activation")
    return " · ".join(parts)


__all__ = ["annotated_overlay", "caption"]
