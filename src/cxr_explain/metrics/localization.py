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

:func:`localization_scores` computes one results-table row from one sort of the map
(:class:`SortedHeatmap`: every threshold metric is then a binary search); :class:`MapScorer` scores
several regions of one map from that one sort; :func:`bootstrap_mean_ci`
the confidence intervals of a column.

Ground truth that covers no pixel (a box clipped away by the image border) makes every metric
undefined: they return NaN, which :func:`bootstrap_mean_ci` drops.
"""
from __future__ import annotations

import copy
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from skimage.filters import threshold_otsu

from cxr_explain.errors import CxrExplainError

ArrayLike = Union[np.ndarray, torch.Tensor]

PAPER_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
RESIZE_MODES = ("bilinear", "bicubic", "nearest", "area")
EMPTY_REGION_MODES = ("zero", "nan")
#: The scores a results row may carry besides IoU at each T (always computed: the paper's Table 2),
#: by the name ``evaluate --metrics`` takes, with the columns each fills.
OPTIONAL_SCORES: dict[str, tuple[str, ...]] = {
    "otsu": ("otsu_t", "iou_otsu"), "hit": ("hit",), "mass": ("mass",), "rank": ("rank_acc",), "auprc": ("auprc",)}
#: The scores that need every pixel of the map in order (one sort of a 1024² map is ≈ 80 % of its
#: scoring time); without them no sort is made.
SORTED_SCORES = frozenset({"rank", "auprc"})


def check_scores(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple in :data:`OPTIONAL_SCORES` order; an unknown name is a CxrExplainError."""
    bad = [n for n in names if n not in OPTIONAL_SCORES]
    if bad:
        raise CxrExplainError(f"unknown metric {bad[0]!r}; choose from {', '.join(OPTIONAL_SCORES)} "
                              "(IoU at each threshold is always computed)")
    return tuple(n for n in OPTIONAL_SCORES if n in names)


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
def resize_map(h: ArrayLike, resize_to: tuple[int, int] | None = None, mode: str = "bilinear") -> np.ndarray:
    """Step 1 of :func:`normalize_map`: the map as float32, resized to ``resize_to = (H, W)`` with
    torch's ``F.interpolate(mode, align_corners=False)`` (``bilinear``, ``bicubic``, ``nearest``,
    ``area``) when its shape differs."""
    a = _as_2d(h)
    if resize_to is not None and tuple(resize_to) != a.shape:
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        a = resize_maps(t[None], resize_to, mode)[0]
    return a.astype(np.float32, copy=False)


def resize_maps(maps: torch.Tensor, resize_to: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """:func:`resize_map` of N maps of one size at once, ``maps`` (N, h, w) -> (N, H, W) float32: one
    ``F.interpolate`` call, the same values as one call per map."""
    if mode not in RESIZE_MODES:
        raise CxrExplainError(f"unknown resize mode {mode!r}; use one of {', '.join(RESIZE_MODES)}")
    t = maps.detach().cpu().float()
    size = (int(resize_to[0]), int(resize_to[1]))
    if tuple(t.shape[-2:]) != size:
        kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        t = F.interpolate(t[:, None], size=size, mode=mode, **kw)[:, 0]
    return t.numpy()


def normalize_map(
    h: ArrayLike,
    resize_to: tuple[int, int] | None = None,
    mode: str = "bilinear",
    scaling: str = "clip",
) -> np.ndarray:
    """The paper protocol's normalisation: resize, then ``h = max(h, 0) / max(max(h, 0))``.

    1. Resize to ``resize_to = (H, W)`` (the original image size) with torch's
       ``F.interpolate(mode, align_corners=False)`` -- the same resize for every method
       (``mode`` in ``bilinear`` (default), ``bicubic``, ``nearest``, ``area``; :func:`resize_map`).
    2. Negative values -> 0 ("negative attributions are cast as zero").
    3. Divide by the maximum, so the map lies in [0, 1]; a map with no positive value stays all zero.

    ``scaling="minmax"`` replaces steps 2-3 by ``(h - min) / (max - min)`` (CheXlocalize's
    normalisation; the same as ``"clip"`` for a map whose minimum is 0; a constant map -> zeros).
    Returns a float32 array of shape ``resize_to`` (or of ``h``'s shape when ``resize_to`` is None).
    """
    a = resize_map(h, resize_to, mode)
    if a.size and not (np.isfinite(a.min()) and np.isfinite(a.max())):  # min / max propagate NaN
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


# --------------------------------------------------------------------------- one sort per map
def sorted_pixels(a: np.ndarray) -> np.ndarray:
    """``np.sort(a, axis=None)``; when at least 40 % of the pixels are exactly 0 (a normalised map
    whose raw relevance was negative there, often half of a RAP map) only the non-zero values are
    sorted and the zeros put back as one block where they belong: the same array (a ``-0.0`` comes
    back as ``0.0``, which compares equal), 20 -> 16 ms on a 1024² RAP map."""
    flat = a.ravel()
    zeros = flat.size - int(np.count_nonzero(flat))
    if 5 * zeros < 2 * flat.size:
        return np.sort(flat)
    nonzero = flat[flat != 0]  # NaN is kept (it sorts last)
    nonzero.sort()
    k = int(np.searchsorted(nonzero, 0))
    out = np.empty_like(flat)
    out[:k] = nonzero[:k]
    out[k:k + zeros] = 0
    out[k + zeros:] = nonzero[k:]
    return out


class SortedHeatmap:
    """A map's pixel values sorted once, and its ground-truth pixels sorted once.

    Every threshold metric is then a binary search (``np.searchsorted``) in these two arrays, so
    IoU at any number of thresholds, Otsu's histogram, rank accuracy and AUPRC share one
    ``O(n log n)`` sort instead of each scanning, partitioning or sorting the map again:
    ``#{h > t} = n - searchsorted(values, t, "right")`` and ``#{h > t, gt} =
    |gt| - searchsorted(inside, t, "right")``, exact in the map's own precision.

    ``values``: all pixels ascending; ``inside``: the ground-truth pixels ascending (the map's float
    dtype; integer and bool maps become float32). ``gt_mask=None`` is enough for
    :meth:`otsu_threshold`; the other metrics need the mask.

    ``sort=False`` skips the map's sort (``values`` is None): IoU then counts ``h > T`` directly and
    Otsu's histogram is ``np.histogram``'s (the same counts, so the same numbers), while
    :meth:`rank_accuracy` and :meth:`auprc`, which need the order, raise.
    """

    def __init__(self, h: ArrayLike, gt_mask: ArrayLike | None = None, sort: bool = True) -> None:
        a = _as_2d(h)
        self.array: np.ndarray = a
        self.shape: tuple[int, int] = a.shape
        self.values: np.ndarray | None = sorted_pixels(a) if sort else None
        if a.size and not np.isfinite(self.values[[0, -1]] if sort else [a.min(), a.max()]).all():  # NaN sorts last
            raise CxrExplainError("heatmap contains inf/NaN values; check the explanation method's output")
        self.has_gt = gt_mask is not None
        self.inside: np.ndarray = np.sort(a[_as_mask(gt_mask, a.shape)]) if self.has_gt else a.ravel()[:0]

    def with_gt(self, gt_mask: ArrayLike) -> "SortedHeatmap":
        """The same map against another ground truth: shares the sorted values (no second sort of
        the map), sorts only the ground-truth pixels."""
        other = copy.copy(self)
        other.has_gt = True
        other.inside = np.sort(self.array[_as_mask(gt_mask, self.shape)])
        return other

    @property
    def n(self) -> int:
        return int(self.array.size)

    @property
    def n_gt(self) -> int:
        return int(self.inside.size)

    def _need_gt(self) -> None:
        if not self.has_gt:
            raise CxrExplainError("this SortedHeatmap was built without a ground-truth mask; pass gt_mask")

    def _need_sorted(self, metric: str) -> np.ndarray:
        if self.values is None:
            raise CxrExplainError(f"{metric} needs the map's pixels in order; build the SortedHeatmap with sort=True")
        return self.values

    def _cast(self, t: ArrayLike | Sequence[float] | float) -> np.ndarray:
        """Thresholds in the map's precision, as ``h > T`` compares them in numpy."""
        return np.asarray(t, dtype=np.float64).astype(self.array.dtype)

    def iou(self, thresholds: Sequence[float] = PAPER_THRESHOLDS, empty_region: str = "zero") -> np.ndarray:
        """``IoU(T) = |{h > T} & gt| / |{h > T} | gt|`` for each T (see :func:`iou_at_thresholds`)."""
        if empty_region not in EMPTY_REGION_MODES:
            raise CxrExplainError(f"unknown empty_region {empty_region!r}; use 'zero' or 'nan'")
        self._need_gt()
        t = self._cast(thresholds)
        if self.n_gt == 0:
            return np.full(t.shape, np.nan)
        if self.values is None:  # no sort: count each region
            region = np.array([np.count_nonzero(self.array > x) for x in t.ravel()]).reshape(t.shape)
        else:
            region = self.n - np.searchsorted(self.values, t, side="right")
        inter = self.n_gt - np.searchsorted(self.inside, t, side="right")
        out = inter / (region + self.n_gt - inter)
        if empty_region == "nan":
            out = np.where(region == 0, np.nan, out)
        return out.astype(np.float64)

    def otsu_threshold(self, nbins: int = 256) -> float:
        """``skimage.filters.threshold_otsu`` of the map, from the sorted values.

        The histogram is the one scikit-image builds (``np.histogram``, ``nbins`` equal bins over
        [min, max] in the map's dtype; a value ``x`` falls in bin ``i`` when
        ``edge_i <= x < edge_{i+1}``, the last bin closed), counted by binary search of the edges,
        and handed to ``threshold_otsu(hist=(counts, centres))``: the same threshold, bit for bit.
        A constant map returns its value; an empty map raises :class:`CxrExplainError`.
        """
        v = self.values
        if self.n == 0:
            raise CxrExplainError("Otsu's threshold of an empty heatmap is undefined; pass a map with pixels")
        lo, hi = (v[0], v[-1]) if v is not None else (self.array.min(), self.array.max())
        if not hi > lo:
            return float(lo)
        if v is None:  # scikit-image's own histogram
            counts, edges = np.histogram(self.array, bins=nbins, range=(lo, hi))
        else:
            edges = np.histogram_bin_edges(v, bins=nbins, range=(lo, hi))
            counts = np.diff(np.append(np.searchsorted(v, edges[:-1], side="left"), v.size))
        centres = (edges[:-1] + edges[1:]) / 2.0
        return float(threshold_otsu(hist=(counts, centres)))

    def rank_accuracy(self) -> float:
        """Share of the K = |gt| highest positive pixels inside gt, ties shared (see :func:`rank_accuracy`)."""
        self._need_gt()
        k, n, v, s = self.n_gt, self.n, self._need_sorted("rank accuracy"), self.inside
        if k == 0:
            return float("nan")
        kth = v[n - k]  # the K-th largest value; max(kth, 0) is the K-th largest of max(h, 0)
        if kth > 0:
            lo, hi = np.searchsorted(v, kth, side="left"), np.searchsorted(v, kth, side="right")
            lo_in, hi_in = np.searchsorted(s, kth, side="left"), np.searchsorted(s, kth, side="right")
            slots = k - int(n - hi)  # K minus the pixels strictly above the K-th value
            inside = float(k - hi_in) + slots * float(hi_in - lo_in) / float(hi - lo)
        else:  # fewer than K positive pixels: only they are selected
            inside = float(k - np.searchsorted(s, self._cast(0.0), side="right"))
        return inside / k

    def auprc(self) -> float:
        """Average precision of the map as a pixel detector of the ground truth, from the counts.

        ``AP = sum_j (R_j - R_{j-1}) P_j`` over the distinct values ``u_j`` of ``h`` in decreasing
        order (the definition ``sklearn.metrics.average_precision_score(gt, h)`` implements).
        Recall only moves at values held by ground-truth pixels, so only those terms are non-zero:
        with ``n_j = #{gt pixels == u_j}``, ``tp_j = #{gt pixels >= u_j}`` and
        ``all_j = #{pixels >= u_j}`` (binary searches in the two sorted arrays),
        ``AP = sum_j (n_j / |gt|) * (tp_j / all_j)``. Equal to scikit-learn's per-pixel AP up to
        the order of the float64 sum (the tests check it against sklearn); one vectorised pass
        instead of a curve of ~|gt| points per region.
        """
        self._need_gt()
        s, v = self.inside, self._need_sorted("AUPRC")
        if s.size == 0:
            return float("nan")
        first = np.flatnonzero(np.append(True, s[1:] != s[:-1]))  # start of each run of equal gt values
        u = s[first]
        n_j = np.diff(np.append(first, s.size))
        tp_j = s.size - first  # gt pixels >= u_j
        all_j = v.size - np.searchsorted(v, u, side="left")  # pixels >= u_j
        return float(np.sum(n_j * (tp_j / all_j)) / s.size)


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
    T is compared in the map's precision (float32 maps: ``float32(T)``).
    """
    return SortedHeatmap(h_norm, gt_mask).iou(thresholds, empty_region)


def otsu_threshold(h_norm: ArrayLike, nbins: int = 256) -> float:
    """Otsu's threshold of the map's values: ``skimage.filters.threshold_otsu(h, nbins)``.

    scikit-image histograms the values in ``nbins`` equal bins over [min, max], picks the split that
    maximises the between-class variance ``w0 w1 (mu0 - mu1)^2`` and returns the centre of the last
    bin of the lower class, so the mask is ``h > t`` (CheXlocalize's convention). A constant map
    returns its value (its mask ``h > t`` is empty); an empty map raises :class:`CxrExplainError`.
    """
    return SortedHeatmap(h_norm).otsu_threshold(nbins)


def otsu_iou(h_norm: ArrayLike, gt_mask: ArrayLike, empty_region: str = "zero") -> float:
    """CheXlocalize's mask: IoU of ``h > otsu_threshold(h)`` with the ground truth."""
    sm = SortedHeatmap(h_norm, gt_mask)
    return float(sm.iou((sm.otsu_threshold(),), empty_region)[0])


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
    return SortedHeatmap(h, gt_mask).rank_accuracy()


def auprc(h: ArrayLike, gt_mask: ArrayLike) -> float:
    """Average precision of the map as a pixel-wise detector of the ground truth (Arun et al. 2021).

    ``sklearn.metrics.average_precision_score(gt, h)`` over all pixels: ``AP = sum_n (R_n - R_{n-1}) P_n``
    with the distinct values of ``h`` as thresholds in decreasing order (computed from one sort,
    :meth:`SortedHeatmap.auprc`). NaN if the ground truth is empty.
    """
    return SortedHeatmap(h, gt_mask).auprc()


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
class MapScorer:
    """One normalised map prepared once for scoring any number of ground-truth regions.

    The map is sorted once (:class:`SortedHeatmap`), its arg-max found once and its positive part
    summed once; :meth:`scores` then costs one sort of the region's pixels and a few binary
    searches. ``MapScorer(normalize_map(h, …)).scores(gt, …)`` is :func:`localization_scores`,
    number for number; ``evaluate`` uses it when an image has several boxes (and a mask) of one
    finding, which share one explained map.

    ``metrics``: the :data:`OPTIONAL_SCORES` to compute (default all); the others' columns are None.
    Without ``rank`` and ``auprc`` the map is not sorted (:data:`SORTED_SCORES`) and a 1024² map
    costs about half the time (12 against 27 ms).
    """

    def __init__(self, h_norm: ArrayLike, metrics: Sequence[str] = tuple(OPTIONAL_SCORES)) -> None:
        self.metrics = frozenset(check_scores(metrics))
        self.sorted = SortedHeatmap(h_norm, sort=bool(self.metrics & SORTED_SCORES))
        a = self.sorted.array
        self._argmax = int(np.argmax(a)) if a.size else 0
        self._points = bool(a.size) and bool(a.flat[self._argmax] > 0)  # hit: a map without a positive value misses
        self._total: float | None = None
        self._otsu_t: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.sorted.shape

    def _mass(self, inside: np.ndarray) -> float:
        """:func:`relevance_mass` from the sorted values: ``sum(h+ in gt) / sum(h+)`` in float64 over
        the positive tails of the region's sorted pixels (``inside``) and of the whole map (summed
        once), with no float64 copy of the map; equal to it up to the order of the sums."""
        if self._total is None:
            v = self.sorted.values
            if v is None:  # not sorted: the positive pixels summed in place
                a = self.sorted.array
                self._total = float(np.sum(a, dtype=np.float64, where=a > 0))
            else:
                self._total = float(np.sum(v[np.searchsorted(v, 0, side="right"):], dtype=np.float64))
        if not self._total > 0:
            return 0.0
        return float(np.sum(inside[np.searchsorted(inside, 0, side="right"):], dtype=np.float64) / self._total)

    def scores(self, gt_mask: ArrayLike, thresholds: Sequence[float] = PAPER_THRESHOLDS,
               empty_region: str = "zero") -> dict[str, float]:
        """The row of :func:`localization_scores` for one ground truth (same keys, same numbers; None
        for a metric not asked for)."""
        gt = _as_mask(gt_mask, self.shape)
        sm = self.sorted.with_gt(gt)
        want = self.metrics
        row: dict[str, float | None] = {}
        for t, v in zip(thresholds, sm.iou(thresholds, empty_region)):
            row[f"iou@{format(float(t), 'g')}"] = float(v)
        t_otsu = self._otsu() if "otsu" in want else None
        row["otsu_t"] = t_otsu
        row["iou_otsu"] = float(sm.iou((t_otsu,), empty_region)[0]) if t_otsu is not None else None
        empty = not gt.any()
        if "hit" in want:
            row["hit"] = float("nan") if empty else (float(gt.flat[self._argmax]) if self._points else 0.0)
        else:
            row["hit"] = None
        row["mass"] = (float("nan") if empty else self._mass(sm.inside)) if "mass" in want else None
        row["rank_acc"] = sm.rank_accuracy() if "rank" in want else None
        row["auprc"] = sm.auprc() if "auprc" in want else None
        return row

    def _otsu(self) -> float:
        """Otsu's threshold of the map, computed once whatever the number of regions."""
        if self._otsu_t is None:
            self._otsu_t = self.sorted.otsu_threshold()
        return self._otsu_t


def localization_scores(
    h: ArrayLike,
    gt_mask: ArrayLike,
    thresholds: Sequence[float] = PAPER_THRESHOLDS,
    original_size: tuple[int, int] | None = None,
    resize: str = "bilinear",
    empty_region: str = "zero",
    scaling: str = "clip",
    metrics: Sequence[str] = tuple(OPTIONAL_SCORES),
) -> dict[str, float | None]:
    """All localisation metrics of one (image, finding, method), as one results-table row.

    The raw map ``h`` is brought to the original pixel space with :func:`normalize_map`
    (``original_size`` defaults to ``gt_mask``'s shape; ``resize`` is the interpolation; ``scaling``
    ``clip`` (paper) or ``minmax`` (CheXlocalize)), then:
    ``iou@T`` for each T (paper protocol), ``otsu_t`` and ``iou_otsu`` (CheXlocalize), ``hit``,
    ``mass`` (relevance mass), ``rank_acc`` and ``auprc``. Keys are ``iou@0.1``-style with the
    threshold printed by ``format(T, 'g')``. ``metrics`` limits the scores besides IoU
    (:data:`OPTIONAL_SCORES`); the others are None.
    """
    gt = np.asarray(gt_mask.detach().cpu().numpy() if isinstance(gt_mask, torch.Tensor) else gt_mask)
    size = tuple(original_size) if original_size is not None else gt.shape[-2:]
    hn = normalize_map(h, resize_to=size, mode=resize, scaling=scaling)
    return MapScorer(hn, metrics).scores(gt, thresholds, empty_region)  # sorted once when rank or AUPRC is asked for


# --------------------------------------------------------------------------- bootstrap
def bootstrap_mean_ci(
    values: ArrayLike | Sequence[float],
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> tuple[float, float, float]:
    """The mean and a percentile-bootstrap confidence interval ``(mean, low, high)``.

    NaNs are dropped; the interval is ``scipy.stats.bootstrap(method="percentile")`` of the mean:
    ``n_boot`` resamples with replacement drawn by ``numpy.random.default_rng(seed)``, the
    ``(1-ci)/2`` and ``(1+ci)/2`` quantiles of the resampled means, in batches of at most ~4M drawn
    indices. No values -> ``(nan, nan, nan)``; one value ``v`` -> ``(v, v, v)``.
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
    if n == 1:  # every resample is the one value (scipy needs two)
        return (float(v[0]),) * 3
    from scipy import stats  # imported here: scipy.stats costs 0.5 s of every CLI start

    res = stats.bootstrap((v,), np.mean, n_resamples=n_boot, batch=max(1, (1 << 22) // n), vectorized=True,
                          confidence_level=ci, method="percentile", rng=np.random.default_rng(seed))
    return float(v.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)
