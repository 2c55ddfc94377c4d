"""Heatmap colouring, overlays on the X-ray, and figure grids (the paper's Fig. 3 layout).

Colour convention of the RAP paper (``docs/rules.md`` §2.13): a signed map is divided by ``max|h|``,
mapped to [0, 1] with ``(v + 1) / 2`` and coloured with matplotlib's ``seismic`` (red = relevant,
white = 0, blue = irrelevant / negative). Non-negative maps such as CAM use ``symmetric=False``:
min-max to [0, 1] and a sequential colormap (``jet`` by default).
All images are ``uint8`` arrays of shape (H, W, 3).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence, Union

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from cxr_explain.data.types import Box
from cxr_explain.errors import CxrExplainError

ArrayLike = Union[np.ndarray, torch.Tensor]
RED = (255, 0, 0)
GREEN = (0, 255, 0)


def _np(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _map2d(h: ArrayLike) -> np.ndarray:
    a = _np(h).astype(np.float64)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise CxrExplainError(f"heatmap has shape {a.shape}; pass one 2-D (H, W) map")
    return np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)


def resize_map(h: ArrayLike, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D map to ``size = (H, W)`` (``F.interpolate``, ``align_corners=False``)."""
    a = _map2d(h)
    if a.shape == tuple(size):
        return a
    t = torch.from_numpy(np.ascontiguousarray(a))[None, None]
    out = F.interpolate(t, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def _colormap(name: str):
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise CxrExplainError(
            f"unknown colormap {name!r}; use a matplotlib name such as seismic, jet, inferno") from None


def heatmap_to_rgb(h: ArrayLike, cmap: str | None = None, symmetric: bool = True) -> np.ndarray:
    """Colour a map: ``symmetric`` (signed maps, paper convention) ``v = (h / max|h| + 1) / 2``,
    else ``v = (h - min) / (max - min)``; then ``rgb = cmap(v)``. ``cmap`` defaults to
    ``seismic`` (symmetric) or ``jet``. A constant map gives v = 0.5 (symmetric) or 0.
    Returns uint8 (H, W, 3)."""
    a = _map2d(h)
    if symmetric:
        m = np.abs(a).max() if a.size else 0.0
        v = (a / m + 1.0) / 2.0 if m > 0 else np.full_like(a, 0.5)
    else:
        lo, hi = (a.min(), a.max()) if a.size else (0.0, 0.0)
        v = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    cm = _colormap(cmap or ("seismic" if symmetric else "jet"))
    rgba = cm(np.clip(v, 0.0, 1.0))
    return np.round(rgba[..., :3] * 255).astype(np.uint8)


def map_strength(h: ArrayLike, symmetric: bool = True) -> np.ndarray:
    """How strongly each pixel is coloured, in [0, 1]: ``|h| / max|h|`` (signed maps) or
    ``(h - min) / (max - min)``; all 0 for a constant map."""
    a = _map2d(h)
    if symmetric:
        m = np.abs(a).max() if a.size else 0.0
        return np.abs(a) / m if m > 0 else np.zeros_like(a)
    lo, hi = (a.min(), a.max()) if a.size else (0.0, 0.0)
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def to_gray_uint8(xray: ArrayLike) -> np.ndarray:
    """An X-ray as uint8 (H, W): uint8 as is; float in [0, 1] times 255; anything else (uint16
    DICOM pixels, standardised floats) min-max scaled. (H, W, C) / (C, H, W) are averaged over C."""
    a = _np(xray)
    if a.ndim == 3:
        c_axis = 0 if a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3) else -1
        a = a.mean(axis=c_axis) if a.dtype != np.uint8 else a.mean(axis=c_axis).round().astype(np.uint8)
    if a.ndim != 2:
        raise CxrExplainError(f"X-ray image has shape {a.shape}; pass (H, W) or (H, W, 3)")
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0.0 and hi <= 1.0 and np.issubdtype(_np(xray).dtype, np.floating):
        return np.round(a * 255).astype(np.uint8)
    return np.round((a - lo) / (hi - lo) * 255).astype(np.uint8) if hi > lo else np.zeros(a.shape, np.uint8)


def _box_bounds(box: Box, height: int, width: int) -> tuple[int, int, int, int]:
    """``[y0, y1) x [x0, x1)`` as in ``Box.to_mask``: rounded to the nearest pixel, clipped."""
    y0 = int(np.clip(round(box.y), 0, height))
    y1 = int(np.clip(round(box.y + box.h), 0, height))
    x0 = int(np.clip(round(box.x), 0, width))
    x1 = int(np.clip(round(box.x + box.w), 0, width))
    return y0, y1, x0, x1


def draw_box(rgb: np.ndarray, box: Box, color: Sequence[int] = RED, width: int = 3) -> np.ndarray:
    """Draw the outline of ``box`` (``width`` px, inside its rasterised extent) onto ``rgb`` in place."""
    y0, y1, x0, x1 = _box_bounds(box, rgb.shape[0], rgb.shape[1])
    if y1 <= y0 or x1 <= x0:
        return rgb
    c = np.asarray(color, dtype=np.uint8)
    rgb[y0:min(y0 + width, y1), x0:x1] = c
    rgb[max(y1 - width, y0):y1, x0:x1] = c
    rgb[y0:y1, x0:min(x0 + width, x1)] = c
    rgb[y0:y1, max(x1 - width, x0):x1] = c
    return rgb


def draw_contour(
    rgb: np.ndarray, mask: ArrayLike, color: Sequence[int] = GREEN, width: int = 1
) -> np.ndarray:
    """Draw the inner boundary (``width`` px) of a boolean mask onto ``rgb`` in place; a mask of
    another size is resized to the image by nearest neighbour."""
    m = _np(mask).astype(bool)
    h, w = rgb.shape[:2]
    if m.ndim != 2:
        raise CxrExplainError(f"mask has shape {m.shape}; pass a 2-D boolean mask")
    if m.shape != (h, w):
        rows = np.minimum((np.arange(h) + 0.5) * m.shape[0] / h, m.shape[0] - 1).astype(int)
        cols = np.minimum((np.arange(w) + 0.5) * m.shape[1] / w, m.shape[1] - 1).astype(int)
        m = m[rows][:, cols]
    edge = m & ~ndimage.binary_erosion(m, iterations=max(1, width), border_value=0)
    rgb[edge] = np.asarray(color, dtype=np.uint8)
    return rgb


def overlay(
    xray: ArrayLike,
    h: ArrayLike,
    alpha: float = 0.5,
    cmap: str | None = None,
    symmetric: bool = True,
    boxes: Iterable[Box] = (),
    box_color: Sequence[int] = RED,
    box_width: int = 3,
    box_space: tuple[int, int] | None = None,
    masks: Iterable[ArrayLike] = (),
    mask_color: Sequence[int] = GREEN,
    veil: str = "uniform",
) -> np.ndarray:
    """The heatmap blended onto the grayscale X-ray, with boxes and mask contours.

    ``h`` is resized (bilinear) to the X-ray's size, coloured by :func:`heatmap_to_rgb` and blended:
    ``out = (1 - w) * gray + w * colour`` with ``w = alpha`` (``veil="uniform"``) or, with
    ``veil="proportional"``, ``w = alpha * s`` where ``s`` is the map's strength in [0, 1]
    (``|h| / max|h|`` for signed maps, ``(h - min) / (max - min)`` otherwise): the film shows
    unveiled where the map is 0. ``boxes`` are drawn as ``box_width``-px rectangles;
    they are in the X-ray's pixel space unless ``box_space = (H, W)`` names the space they are in
    (e.g. the original 1024x1024 when the X-ray shown is 224x224). Returns uint8 (H, W, 3).
    """
    if not 0.0 <= alpha <= 1.0:
        raise CxrExplainError(f"alpha must lie in [0, 1], got {alpha}")
    gray = to_gray_uint8(xray)
    height, width = gray.shape
    full = resize_map(h, (height, width))
    heat = heatmap_to_rgb(full, cmap=cmap, symmetric=symmetric)
    if veil == "proportional":
        w = alpha * map_strength(full, symmetric)[..., None]
    elif veil == "uniform":
        w = alpha
    else:
        raise CxrExplainError(f"veil must be 'uniform' or 'proportional', got {veil!r}")
    out = (1.0 - w) * gray[..., None].astype(np.float64) + w * heat.astype(np.float64)
    rgb = np.clip(np.round(out), 0, 255).astype(np.uint8)
    for m in masks:
        draw_contour(rgb, m, mask_color)
    sy, sx = (1.0, 1.0) if box_space is None else (height / box_space[0], width / box_space[1])
    for b in boxes:
        if not isinstance(b, Box):
            raise CxrExplainError(f"boxes must be cxr_explain.data.types.Box records, got {type(b).__name__}")
        draw_box(rgb, b.scaled(sx, sy), box_color, box_width)
    return rgb


# --------------------------------------------------------------------------- files
def save_png(rgb: ArrayLike, path: Union[str, Path], compress_level: int = 6) -> Path:
    """Write a uint8 (H, W), (H, W, 3) or (H, W, 4) image as PNG (Pillow, zlib ``compress_level``
    0-9: 3 writes a 1 MP overlay 2-3× faster than the default 6 for ~6 % more bytes); parent
    folders are created."""
    a = _np(rgb)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise CxrExplainError(
            f"save_png needs a uint8 (H, W[, 3|4]) image, got {a.dtype} {a.shape} for {path}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(p, format="PNG", compress_level=compress_level)
    return p


# --------------------------------------------------------------------------- composites
def _as_rgb(a: ArrayLike) -> np.ndarray:
    a = _np(a)
    if a.ndim == 2:
        a = np.repeat(to_gray_uint8(a)[..., None], 3, axis=2)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] not in (3, 4):
        raise CxrExplainError(
            f"panel must be a uint8 (H, W, 3) image or a 2-D X-ray, got {a.dtype} {a.shape}")
    return a[..., :3]


def figure_grid(
    rows: Sequence[Sequence[ArrayLike]],
    col_titles: Sequence[str],
    path: Union[str, Path],
    row_titles: Sequence[str] | None = None,
    panel_inches: float = 2.0,
    dpi: int = 150,
) -> list[Path]:
    """A grid of images (e.g. rows of X-ray | CAM | LRP | RAP, paper Fig. 3) written as PNG and PDF.

    ``rows[i][j]`` is a uint8 RGB image or a 2-D X-ray; ``col_titles`` head the columns and
    ``row_titles`` (optional) label the rows. ``path``'s suffix is replaced by ``.png`` and ``.pdf``;
    both paths are returned. Uses matplotlib's object API (no pyplot state, any backend).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows or any(len(r) != len(rows[0]) for r in rows):
        raise CxrExplainError("figure_grid needs a non-empty list of rows of equal length")
    n_r, n_c = len(rows), len(rows[0])
    if len(col_titles) != n_c or (row_titles is not None and len(row_titles) != n_r):
        raise CxrExplainError(f"figure_grid has {n_c} columns and {n_r} rows; give one title for each")
    fig = Figure(figsize=(panel_inches * n_c, panel_inches * n_r + 0.3), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_r, n_c, squeeze=False)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            ax = axes[i][j]
            ax.imshow(_as_rgb(img), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_titles[j], fontsize=9)
            if j == 0 and row_titles is not None:
                ax.set_ylabel(row_titles[i], fontsize=8)
    fig.tight_layout(pad=0.3)
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    out = [base.with_suffix(".png"), base.with_suffix(".pdf")]
    for p in out:
        fig.savefig(p, dpi=dpi)
    return out
