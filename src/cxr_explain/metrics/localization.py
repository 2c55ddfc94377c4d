"""Localisation metrics: does a heatmap point at the lesion?

All functions take a 2-D heatmap ``h`` (numpy array or torch tensor) and a boolean ground-truth
mask of the same shape (a rasterised box, ``Box.to_mask``, or an exact pixel mask), and are pure.
Protocols (``docs/evaluation.md`` §1-§3, §6):

* Paper protocol (RAP paper, Table 2): :func:`normalize_map` (resize to the original image size,
  negatives -> 0, divide by the max), then :func:`iou_at_thresholds` with T in {0.1, ..., 0.5}.
* CheXlocalize (Saporta et al. 2022): :func:`otsu_iou` and :func:`hit` (pointing game).
* XAI literature: :func:`relevance_mass` (energy pointing game; Wang et al. 2020, Arras et al. 2022),
  :func:`rank_accuracy` (Arras et al. 2022), :func:`auprc` (Arun et al. 2021).
* Paper Section 3 ("inconsistency of intention"): :func:`region_shares`.

:func:`localization_scores` computes one results-table row; :func:`bootstrap_mean_ci` the
confidence intervals of a column.

Ground truth that covers no pixel (a box clipped away by the image border) makes every metric
undefined: they return NaN, which :func:`bootstrap_mean_ci` drops.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from skimage.filters import threshold_otsu
from sklearn.metrics import average_precision_score

from cxr_explain.errors import CxrExplainError

ArrayLike = Union[np.ndarray, torch.Tensor]

PAPER_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
RESIZE_MODES = ("bilinear", "bicubic", "nearest", "area")
EMPTY_REGION_MODES = ("zero", "nan")


# --------------------------------------------------------------------------- helpers
def _as_2d(h: ArrayLike, name: str = "heatmap") -> np.ndarray:
    """A float array of shape (H, W); a leading singleton (1, H, W) is squeezed."""
    if isinstance(h, torch.Tensor):
        h = h.detach().cpu().numpy()
    a = np.asarray(h)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise CxrExplainError(f"{name} has shape {tuple(np.shape(h))}; pass one 2-D (H, W) map")
    if a.dtype == bool or not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
    return a


def _as_mask(m: ArrayLike, shape: tuple[int, ...], name: str = "ground-truth mask") -> np.ndarray:
    if isinstance(m, torch.Tensor):
        m = m.detach().cpu().numpy()
    m = np.asarray(m)
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.shape != tuple(shape):
        raise CxrExplainError(
            f"{name} has shape {m.shape} but the heatmap has {tuple(shape)}; "
            "resize the heatmap to the original image size first (normalize_map(resize_to=...))"
        )
    return m.astype(bool, copy=False)


# --------------------------------------------------------------------------- normalisation
def normalize_map(
    h: ArrayLike,
    resize_to: tuple[int, int] | None = None,
    mode: str = "bilinear",
    scaling: str = "clip",
) -> np.ndarray:
    """The paper protocol's normalisation: resize, then ``h = max(h, 0) / max(max(h, 0))``.

    1. Resize to ``resize_to = (H, W)`` (the original image size) with torch's
       ``F.interpolate(mode, align_corners=False)`` -- the same resize for every method
       (``mode`` in ``bilinear`` (default), ``bicubic``, ``nearest``, ``area``).
    2. Negative values -> 0 ("negative attributions are cast as zero").
    3. Divide by the maximum, so the map lies in [0, 1]; a map with no positive value stays all zero.

    ``scaling="minmax"`` replaces steps 2-3 by ``(h - min) / (max - min)`` (CheXlocalize's
    normalisation; the same as ``"clip"`` for a map whose minimum is 0; a constant map -> zeros).
    Returns a float32 array of shape ``resize_to`` (or of ``h``'s shape when ``resize_to`` is None).
    """
    a = _as_2d(h)
    if resize_to is not None and tuple(resize_to) != a.shape:
        if mode not in RESIZE_MODES:
            raise CxrExplainError(f"unknown resize mode {mode!r}; use one of {', '.join(RESIZE_MODES)}")
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
        kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        size = (int(resize_to[0]), int(resize_to[1]))
        a = F.interpolate(t, size=size, mode=mode, **kw)[0, 0].numpy()
    a = a.astype(np.float32, copy=False)
    if a.size and not np.isfinite(a).all():
        raise CxrExplainError("heatmap contains inf/NaN values; check the explanation method's output")
    if scaling == "minmax":
        lo = float(a.min()) if a.size else 0.0
        a = a - lo
    elif scaling == "clip":
        a = np.maximum(a, 0.0)
    else:
        raise CxrExplainError(f"unknown scaling {scaling!r}; use 'clip' (paper) or 'minmax' (CheXlocalize)")
    m = float(a.max()) if a.size else 0.0
    return a / m if m > 0 else np.zeros_like(a)


# --------------------------------------------------------------------------- IoU
def iou_at_thresholds(
    h_norm: ArrayLike,
    gt_mask: ArrayLike,
    thresholds: Sequence[float] = PAPER_THRESHOLDS,
    empty_region: str = "zero",
) -> np.ndarray:
    """IoU of the region ``h > T`` with the ground truth, for each threshold T.

    ``IoU(T) = |{h > T} & gt| / |{h > T} | gt|`` (paper protocol, Table 2; ``h_norm`` from
    :func:`normalize_map`). ``empty_region`` says what a threshold whose region is empty scores:
    ``"zero"`` (default: IoU of an empty set with a non-empty box is 0) or ``"nan"`` (exclude it
    from means). Returns a float64 array of ``len(thresholds)``; NaN everywhere if ``gt`` is empty.
    """
    if empty_region not in EMPTY_REGION_MODES:
        raise CxrExplainError(f"unknown empty_region {empty_region!r}; use 'zero' or 'nan'")
    h = _as_2d(h_norm)
    gt = _as_mask(gt_mask, h.shape)
    t = np.asarray(thresholds, dtype=np.float64)
    out = np.full(t.shape, np.nan)
    n_gt = int(gt.sum())
    if n_gt == 0:
        return out
    tt = t.astype(h.dtype)  # compare in the map's precision, as ``h > T`` does in numpy
    inside = h[gt]
    region = np.array([np.count_nonzero(h > x) for x in tt], dtype=np.int64)
    inter = np.array([np.count_nonzero(inside > x) for x in tt], dtype=np.int64)
    union = region + n_gt - inter
    out = inter / union
    if empty_region == "nan":
        out = np.where(region == 0, np.nan, out)
    return out.astype(np.float64)


def otsu_threshold(h_norm: ArrayLike, nbins: int = 256) -> float:
    """Otsu's threshold of the map's values: ``skimage.filters.threshold_otsu(h, nbins)``.

    scikit-image histograms the values in ``nbins`` equal bins over [min, max], picks the split that
    maximises the between-class variance ``w0 w1 (mu0 - mu1)^2`` and returns the centre of the last
    bin of the lower class, so the mask is ``h > t`` (CheXlocalize's convention). A constant map
    returns its value (its mask ``h > t`` is empty); an empty map raises :class:`CxrExplainError`.
    """
    a = _as_2d(h_norm)
    if a.size == 0:
        raise CxrExplainError("Otsu's threshold of an empty heatmap is undefined; pass a map with pixels")
    return float(threshold_otsu(a, nbins=nbins))


def otsu_iou(h_norm: ArrayLike, gt_mask: ArrayLike, empty_region: str = "zero") -> float:
    """CheXlocalize's mask: IoU of ``h > otsu_threshold(h)`` with the ground truth."""
    t = otsu_threshold(h_norm)
    return float(iou_at_thresholds(h_norm, gt_mask, (t,), empty_region=empty_region)[0])


# --------------------------------------------------------------------------- pointing / mass / rank
def hit(h: ArrayLike, gt_mask: ArrayLike) -> float:
    """Pointing game: 1.0 if the map's arg-max pixel lies inside the ground truth, else 0.0.

    A map with no positive value points nowhere and misses; ties go to the first pixel in
    row-major order (``np.argmax``). NaN if the ground truth is empty.
    """
    a = _as_2d(h)
    gt = _as_mask(gt_mask, a.shape)
    if not gt.any():
        return float("nan")
    i = int(np.argmax(a))
    if not a.flat[i] > 0:
        return 0.0
    return float(gt.flat[i])


def relevance_mass(h: ArrayLike, gt_mask: ArrayLike) -> float:
    """Relevance mass accuracy (energy pointing game): ``sum(h+ in gt) / sum(h+)``, ``h+ = max(h, 0)``.

    0.0 if the map has no positive relevance; NaN if the ground truth is empty.
    """
    a = _as_2d(h)
    gt = _as_mask(gt_mask, a.shape)
    if not gt.any():
        return float("nan")
    p = np.maximum(a, 0).astype(np.float64, copy=False)
    total = p.sum()
    return float(p[gt].sum() / total) if total > 0 else 0.0


def rank_accuracy(h: ArrayLike, gt_mask: ArrayLike) -> float:
    """Relevance rank accuracy: of the K highest-relevance pixels (K = |gt|), the share inside gt.

    Only positive relevance can be selected (a pixel with ``h <= 0`` carries no evidence; a map with
    no positive value scores 0). Ties at the K-th value are shared out in expectation: if ``n_tie``
    pixels tie for the ``s`` remaining slots, each counts ``s / n_tie`` -- the mean over random
    tie-breaks, so the result does not depend on pixel order. NaN if the ground truth is empty.
    """
    a = _as_2d(h).ravel()
    gt = _as_mask(gt_mask, _as_2d(h).shape).ravel()
    k = int(gt.sum())
    if k == 0:
        return float("nan")
    p = np.maximum(a, 0)
    kth = np.partition(p, p.size - k)[p.size - k]  # K-th largest value
    if kth > 0:
        above = p > kth
        tied = p == kth
        slots = k - int(above.sum())
        inside = float((above & gt).sum()) + slots * float((tied & gt).sum()) / float(tied.sum())
    else:  # fewer than K positive pixels: only they are selected
        inside = float(((p > 0) & gt).sum())
    return inside / k


def auprc(h: ArrayLike, gt_mask: ArrayLike) -> float:
    """Average precision of the map as a pixel-wise detector of the ground truth (Arun et al. 2021).

    ``sklearn.metrics.average_precision_score(gt, h)`` over all pixels: ``AP = sum_n (R_n - R_{n-1}) P_n``
    with the distinct values of ``h`` as thresholds in decreasing order. NaN if the ground truth is empty.
    """
    a = _as_2d(h)
    gt = _as_mask(gt_mask, a.shape)
    if not gt.any():
        return float("nan")
    return float(average_precision_score(gt.ravel(), a.ravel()))


def region_shares(
    h: ArrayLike, lesion_mask: ArrayLike, lung_mask: ArrayLike
) -> tuple[float, float, float]:
    """Where the positive relevance goes (paper Section 3, "inconsistency of intention").

    Returns ``(inside_lesion, lung_outside_lesion, outside_lungs)`` as shares of ``sum(max(h, 0))``:
    ``lesion``; ``lung & ~lesion``; ``~lung & ~lesion`` (the lesion takes precedence where it
    extends past the lung mask). They sum to 1; NaN each if the map has no positive relevance.
    """
    a = _as_2d(h)
    les = _as_mask(lesion_mask, a.shape, "lesion mask")
    lung = _as_mask(lung_mask, a.shape, "lung mask")
    p = np.maximum(a, 0).astype(np.float64, copy=False)
    total = p.sum()
    if not total > 0:
        return (float("nan"),) * 3
    inside = p[les].sum() / total
    lung_only = p[lung & ~les].sum() / total
    outside = 1.0 - inside - lung_only
    return float(inside), float(lung_only), float(max(outside, 0.0))


# --------------------------------------------------------------------------- one row
def localization_scores(
    h: ArrayLike,
    gt_mask: ArrayLike,
    thresholds: Sequence[float] = PAPER_THRESHOLDS,
    original_size: tuple[int, int] | None = None,
    resize: str = "bilinear",
    empty_region: str = "zero",
    scaling: str = "clip",
) -> dict[str, float]:
    """All localisation metrics of one (image, finding, method), as one results-table row.

    The raw map ``h`` is brought to the original pixel space with :func:`normalize_map`
    (``original_size`` defaults to ``gt_mask``'s shape; ``resize`` is the interpolation; ``scaling``
    ``clip`` (paper) or ``minmax`` (CheXlocalize)), then:
    ``iou@T`` for each T (paper protocol), ``otsu_t`` and ``iou_otsu`` (CheXlocalize), ``hit``,
    ``mass`` (relevance mass), ``rank_acc`` and ``auprc``. Keys are ``iou@0.1``-style with the
    threshold printed by ``format(T, 'g')``.
    """
    gt = np.asarray(gt_mask.detach().cpu().numpy() if isinstance(gt_mask, torch.Tensor) else gt_mask)
    size = tuple(original_size) if original_size is not None else gt.shape[-2:]
    hn = normalize_map(h, resize_to=size, mode=resize, scaling=scaling)
    gt = _as_mask(gt, hn.shape)
    row: dict[str, float] = {}
    ious = iou_at_thresholds(hn, gt, thresholds, empty_region=empty_region)
    for t, v in zip(thresholds, ious):
        row[f"iou@{format(float(t), 'g')}"] = float(v)
    t_otsu = otsu_threshold(hn)
    row["otsu_t"] = t_otsu
    row["iou_otsu"] = float(iou_at_thresholds(hn, gt, (t_otsu,), empty_region=empty_region)[0])
    row["hit"] = hit(hn, gt)
    row["mass"] = relevance_mass(hn, gt)
    row["rank_acc"] = rank_accuracy(hn, gt)
    row["auprc"] = auprc(hn, gt)
    return row


# --------------------------------------------------------------------------- bootstrap
def bootstrap_mean_ci(
    values: ArrayLike | Sequence[float],
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> tuple[float, float, float]:
    """The mean and a percentile-bootstrap confidence interval ``(mean, low, high)``.

    NaNs are dropped; ``n_boot`` resamples with replacement (``numpy.random.default_rng(seed)``),
    the interval is the ``(1-ci)/2`` and ``(1+ci)/2`` quantiles of the resampled means. Vectorised
    in chunks of at most ~4M drawn indices. No values -> ``(nan, nan, nan)``.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    n = v.size
    if n == 0:
        return (float("nan"),) * 3
    if not 0 < ci < 1:
        raise CxrExplainError(f"ci must lie in (0, 1), got {ci}")
    rng = np.random.default_rng(seed)
    chunk = max(1, (1 << 22) // n)
    means = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - ci) / 2, (1 + ci) / 2])
    return float(v.mean()), float(lo), float(hi)
