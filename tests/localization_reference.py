"""REFERENCE ONLY: the hand-written localisation metrics as they were before the shared-sort rewrite.

Copied verbatim from ``src/cxr_explain/metrics/localization.py`` at commit 7777b4e (the version that
produced the demo tables before the rewrite), so that ``test_localization.py`` can check that the
library-based, one-sort implementation returns the same numbers on a fixed set of maps.
Not used by the package; do not import it from ``src``.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

from cxr_explain.errors import CxrExplainError
from cxr_explain.metrics.localization import EMPTY_REGION_MODES, PAPER_THRESHOLDS, normalize_map

ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_2d(h: ArrayLike, name: str = "heatmap") -> np.ndarray:
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


def _as_mask(m: ArrayLike, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(m, torch.Tensor):
        m = m.detach().cpu().numpy()
    m = np.asarray(m)
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.shape != tuple(shape):
        raise CxrExplainError(f"mask {m.shape} vs map {tuple(shape)}")
    return m.astype(bool, copy=False)


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
    """Otsu's threshold on a ``nbins``-bin histogram of the map's values (over [min, max]).

    Picks the bin boundary that maximises the between-class variance
    ``w0(t) w1(t) (mu0(t) - mu1(t))^2`` and returns the centre of the last bin of the lower class
    (so the mask is ``h > t``), as CheXlocalize does. A constant map returns its value.
    """
    a = _as_2d(h_norm).astype(np.float64, copy=False).ravel()
    lo, hi = float(a.min()), float(a.max())
    if not hi > lo:
        return lo
    counts, edges = np.histogram(a, bins=nbins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    counts = counts.astype(np.float64)
    w0 = np.cumsum(counts)[:-1]  # class 0 = bins 0..k
    s0 = np.cumsum(counts * centres)[:-1]
    total_w, total_s = counts.sum(), (counts * centres).sum()
    w1 = total_w - w0
    s1 = total_s - s0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (s0 / w0 - s1 / w1) ** 2
    between = np.where((w0 > 0) & (w1 > 0), between, -1.0)
    return float(centres[int(np.argmax(between))])


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
    """Average precision of the map as a pixel-wise detector of the ground truth (exact).

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct values of ``h`` taken as thresholds in
    decreasing order (the step-wise definition of sklearn's ``average_precision_score``;
    Arun et al. 2021). Recall only moves at values held by ground-truth pixels, so
    ``AP = sum_u (#gt pixels == u / |gt|) * (#gt pixels >= u) / (#pixels >= u)`` over those values
    ``u``, from one sort of the map and one of the gt pixels. NaN if the ground truth is empty.
    """
    a = _as_2d(h)
    gt = _as_mask(gt_mask, a.shape)
    n_pos = int(gt.sum())
    if n_pos == 0:
        return float("nan")
    s_all = np.sort(a, axis=None)
    s_pos = np.sort(a[gt], axis=None)
    last = np.flatnonzero(np.r_[s_pos[1:] != s_pos[:-1], True])  # end of each run of equal values
    u = s_pos[last]
    first = np.r_[0, last[:-1] + 1]
    count_u = (last - first + 1).astype(np.float64)
    tp = (n_pos - first).astype(np.float64)  # gt pixels >= u
    selected = (s_all.size - np.searchsorted(s_all, u, side="left")).astype(np.float64)
    return float(np.sum(count_u / n_pos * tp / selected))


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
