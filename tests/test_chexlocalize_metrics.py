"""The CheXlocalize protocol (docs/chexlocalize.md) against direct computations and independent references."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from scipy.stats import bootstrap
from skimage.filters import threshold_otsu

from cxr_explain.errors import CxrExplainError
from cxr_explain.metrics.chexlocalize import (
    CUTOFF_GRID,
    THRESHOLD_GRID,
    bootstrap_ci,
    cutoff_grid,
    hit,
    hit_points,
    iou,
    iou_from_counts,
    miou,
    minmax,
    otsu_segmentation,
    protocol_summary,
    resize_map,
    score_map,
    segment,
    threshold_segmentation,
    tune_cutoff,
    tune_threshold,
)


def _smooth_maps(n: int, seed: int = 0):
    """Upsampled random fields (some non-negative like Grad-CAM, some with pixel noise: holes, specks)."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        s = int(rng.integers(3, 12))
        low = rng.standard_normal((s, s))
        if k % 3 == 0:
            low = np.maximum(low, 0)
        h = resize_map(low, (int(rng.integers(40, 120)), int(rng.integers(40, 120))))
        if k % 4 == 1:
            h = h + 0.3 * rng.standard_normal(h.shape).astype(np.float32)
        yield h


# ---------------------------------------------------------------------------- §1 segmentation
def test_otsu_equals_skimage_and_opencv_threshold():
    cv2 = pytest.importorskip("cv2")  # comes with grad-cam, a test dependency
    for h in _smooth_maps(60):
        u = (255 * ((h - h.min()) / (h.max() - h.min()))).astype(np.uint8)
        want = u > threshold_otsu(u)
        assert np.array_equal(otsu_segmentation(h, fill=False), want)
        _, cv = cv2.threshold(u, 0, int(u.max()), cv2.THRESH_OTSU)
        assert np.array_equal(want, cv > 0)


def test_otsu_fill_equals_the_benchmarks_contour_drawing():
    """The benchmark draws every OpenCV contour (RETR_TREE) with more than one point as a filled PIL
    polygon; ours fills holes and drops one-pixel components. Same pixels on maps with holes and specks."""
    cv2 = pytest.importorskip("cv2")
    from PIL import Image, ImageDraw

    changed_holes = changed_specks = 0
    for h in _smooth_maps(200, seed=1):
        raw = otsu_segmentation(h, fill=False)
        img = Image.new("1", (raw.shape[1], raw.shape[0]))
        cnts = cv2.findContours(raw.astype(np.uint8) * 255, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
        for c in cnts:
            if len(c) > 1:
                ImageDraw.Draw(img).polygon([(int(p[0][0]), int(p[0][1])) for p in c], outline=1, fill=1)
        ours = otsu_segmentation(h)
        assert np.array_equal(ours, np.array(img, dtype=bool))
        lab, n = ndimage.label(raw, structure=np.ones((3, 3)))
        assert np.array_equal(ours, ndimage.binary_fill_holes(raw & (np.bincount(lab.ravel()) > 1)[lab]))
        changed_holes += bool((ours & ~raw).any())
        changed_specks += bool((raw & ~ours).any())
    assert changed_holes > 20 and changed_specks > 20  # the comparison exercised both rules


def test_minmax_threshold_and_cutoff():
    h = np.array([[-2.0, 0.0], [2.0, 6.0]])
    assert np.allclose(minmax(h), [[0, 0.25], [0.5, 1]])
    assert np.allclose(minmax(h, clip=True), [[0, 0], [1 / 3, 1]])
    assert not minmax(np.full((3, 3), 7.0)).any() and not otsu_segmentation(np.full((3, 3), 7.0)).any()
    assert threshold_segmentation(h, 0.25).tolist() == [[False, False], [True, True]]
    assert not segment(h, 0.1, prob=0.2, cutoff=0.3).any()
    assert segment(h, 0.1, prob=0.3, cutoff=0.3).sum() == 3
    with pytest.raises(CxrExplainError):
        minmax(np.array([[np.nan, 1.0]]))


def test_resize_is_bilinear_half_pixel():
    import torch

    low = np.arange(12, dtype=np.float32).reshape(3, 4)
    want = torch.nn.functional.interpolate(torch.from_numpy(low)[None, None], size=(7, 9), mode="bilinear",
                                           align_corners=False)[0, 0].numpy()
    assert np.array_equal(resize_map(low, (7, 9)), want)


# ---------------------------------------------------------------------------- §2 IoU, §3 hit
def test_iou_and_hit_on_hand_made_masks():
    gt = np.zeros((4, 5), dtype=bool)
    gt[1:3, 1:4] = True  # 6 pixels
    pred = np.zeros((4, 5), dtype=bool)
    pred[2:4, 2:5] = True  # 6 pixels, 2 shared
    empty = np.zeros_like(gt)
    assert iou(pred, gt) == pytest.approx(2 / 10)
    assert math.isnan(iou(empty, gt)) and iou(empty, gt, "full") == 0.0
    assert math.isnan(iou(pred, empty)) and iou(pred, empty, "full") == 0.0
    assert math.isnan(iou(empty, empty, "full"))
    assert np.allclose(iou_from_counts([6, 0, 6, 0], [6, 6, 0, 0], [2, 0, 0, 0], "full")[:3], [0.2, 0, 0])
    h = np.zeros((4, 5))
    h[0, 4] = h[2, 2] = 3.0  # tie: the first in row-major order (0, 4) is outside gt
    assert hit(h, gt) == 0.0
    h[0, 4] = 2.0
    assert hit(h, gt) == 1.0
    assert hit(-np.ones((4, 5)) + h, gt) == 1.0  # the map as given, any sign
    assert math.isnan(hit(h, empty))
    assert hit_points(np.array([[0.0, 0.0], [3.7, 2.2]]), gt) == 1.0  # (x=3.7, y=2.2) -> gt[2, 3]
    assert hit_points(np.array([[4.0, 1.0]]), gt) == 0.0 and hit_points(None, gt) == 0.0
    assert math.isnan(hit_points(None, empty))


def test_miou_and_hit_rate_equal_a_direct_computation():
    """Three films: the per-film IoU written out by counting pixel sets, then the mean."""
    rng = np.random.default_rng(3)
    films = []
    for _ in range(3):
        h = rng.random((9, 11))
        gt = np.zeros((9, 11), dtype=bool)
        y, x = rng.integers(0, 5, 2)
        gt[y:y + 4, x:x + 6] = True
        films.append((h, gt))
    films.append((rng.random((9, 11)), np.zeros((9, 11), dtype=bool)))  # negative film
    ious, hits = [], []
    for h, gt in films:
        P = {(i, j) for i in range(9) for j in range(11) if (h[i, j] - h.min()) / (h.max() - h.min()) > 0.5}
        G = {(i, j) for i in range(9) for j in range(11) if gt[i, j]}
        ious.append(len(P & G) / len(P | G) if P and G else float("nan"))
        top = max(((h[i, j], -i, -j) for i in range(9) for j in range(11)))
        hits.append(float((-top[1], -top[2]) in G) if G else float("nan"))
        rec = score_map(h, gt)
        assert rec["gt_area"] == len(G) and rec["pred@0.5"] == len(P) and rec["inter@0.5"] == len(P & G)
    got_iou = [iou(threshold_segmentation(h, 0.5), gt) for h, gt in films]
    assert np.allclose(got_iou, ious, equal_nan=True)
    assert [hit(h, gt) for h, gt in films] == pytest.approx(hits, nan_ok=True)
    assert miou(got_iou) == pytest.approx(np.mean(ious[:3]))
    assert miou([hit(h, gt) for h, gt in films]) == pytest.approx(np.mean(hits[:3]))
    assert math.isnan(miou([float("nan")]))


def test_score_map_counts_equal_the_segmentations():
    rng = np.random.default_rng(4)
    for h in _smooth_maps(10, seed=5):
        gt = np.zeros(h.shape, dtype=bool)
        gt[rng.integers(0, h.shape[0] // 2):, : rng.integers(5, h.shape[1])] = True
        rec = score_map(h, gt)
        p = otsu_segmentation(h)
        assert (rec["pred_otsu"], rec["inter_otsu"]) == (p.sum(), (p & gt).sum())
        for t in THRESHOLD_GRID:
            p = threshold_segmentation(h, t)
            assert (rec[f"pred@{t:g}"], rec[f"inter@{t:g}"]) == (p.sum(), (p & gt).sum())
        assert rec["hit"] == hit(h, gt) and rec["gt_area"] == gt.sum()


# ---------------------------------------------------------------------------- §4 tuning
def _records(rows):
    return pd.DataFrame(rows, columns=["prob", "gt_area", "pred_otsu", "inter_otsu"]).assign(
        hit=np.nan, method="gradcam", finding="Edema")


def test_cutoff_tuning_picks_the_known_best():
    # full-set IoUs: film 1 0.667 always; films 2, 3 are negatives with a segmentation (IoU 0 until
    # cut away, then not counted); film 4 0.333 until cut away, then 0 (missed lesion).
    rec = _records([(0.9, 10, 10, 8), (0.15, 0, 20, 0), (0.35, 0, 20, 0), (0.55, 10, 10, 5)])
    best, scores = tune_cutoff(rec)
    want = [0.25, 0.25, 0.333, 0.333, 0.5, 0.5, 0.333, 0.333, 0.333]
    assert scores == pytest.approx(want, abs=1e-9) and best == 0.4  # first of the tied maxima
    # the true-positive slice would be indifferent between 0.0 and 0.4: the full set is what decides
    tp = [miou(iou_from_counts(*((np.where(rec.prob < c, 0, rec.pred_otsu), rec.gt_area,
                                  np.where(rec.prob < c, 0, rec.inter_otsu))), "true_positive")) for c in (0.0, 0.4)]
    assert tp[0] == pytest.approx(tp[1])
    assert cutoff_grid("Lung Lesion") == CUTOFF_GRID[1:] and cutoff_grid("Edema") == CUTOFF_GRID


def test_threshold_tuning_picks_the_known_best():
    h = np.tile(np.arange(101, dtype=np.float32) / 100, (10, 1))  # a ramp 0 .. 1 across columns
    gt = h > 0.42  # columns 43..100
    rec = pd.DataFrame([{**score_map(h, gt), "prob": 1.0}])
    best, scores = tune_threshold(rec)
    want = [58 / 80, 58 / 70, 58 / 60, 50 / 58, 40 / 58, 30 / 58]
    assert scores == pytest.approx(want) and best == 0.4


# ---------------------------------------------------------------------------- §5 bootstrap, table
def test_bootstrap_ci_is_scipys_percentile_bootstrap():
    v = np.array([0.1, 0.5, np.nan, 0.9, 0.2, 0.4])
    mean, lo, hi, n = bootstrap_ci(v, seed=7)
    ref = bootstrap((v[~np.isnan(v)],), np.mean, n_resamples=1000, method="percentile", confidence_level=0.95,
                    random_state=np.random.default_rng(7), vectorized=True).confidence_interval
    assert n == 5 and mean == pytest.approx(np.nanmean(v)) and (lo, hi) == pytest.approx((ref.low, ref.high))
    assert lo < mean < hi
    assert bootstrap_ci([0.3])[0] == 0.3 and math.isnan(bootstrap_ci([0.3])[1])
    assert bootstrap_ci([1.0, 1.0, 1.0])[1:] == (1.0, 1.0, 3)
    assert bootstrap_ci([np.nan])[3] == 0


def test_protocol_summary_tunes_on_val_and_reports_on_test():
    rng = np.random.default_rng(0)
    rows = []
    for split in ("val", "test"):
        for k in range(12):
            h = resize_map(rng.standard_normal((4, 4)), (32, 32))
            gt = np.zeros((32, 32), dtype=bool)
            if k % 3:
                gt[8:20, 4 + k:16 + k] = True
            prob = float(rng.random())
            rows.append({"image_id": f"{split}{k}", "method": "gradcam", "finding": "Edema", "split": split,
                         "prob": prob, **score_map(h, gt)})
    rec = pd.DataFrame(rows)
    summary, choices = protocol_summary(rec, tune_on="val", evaluate_on="test", segmentation="tuned", cutoffs="tune")
    val, test = rec[rec.split == "val"], rec[rec.split == "test"]
    thr = tune_threshold(val)[0]
    cut = tune_cutoff(val, thr)[0]
    assert choices.iloc[0][["threshold", "cutoff"]].tolist() == [thr, cut]
    keep = test.prob >= cut
    p = np.where(keep, test[f"pred@{thr:g}"], 0)
    i = np.where(keep, test[f"inter@{thr:g}"], 0)
    ious = iou_from_counts(p, test.gt_area, i)
    got = summary.set_index("metric")
    assert got.loc["miou", "mean"] == pytest.approx(np.nanmean(ious))
    assert got.loc["miou", "n"] == np.isfinite(ious).sum()
    assert got.loc["hit_rate", "mean"] == pytest.approx(np.nanmean(test.hit)) and got.loc["hit_rate", "n"] == 8
    plain, ch = protocol_summary(rec)  # Otsu, no cut-off, every record
    assert math.isnan(ch.iloc[0]["threshold"]) and ch.iloc[0]["cutoff"] == 0.0
    assert plain.set_index("metric").loc["miou", "mean"] == pytest.approx(
        np.nanmean(iou_from_counts(rec.pred_otsu, rec.gt_area, rec.inter_otsu)))
    with pytest.raises(CxrExplainError, match="split 'train'"):
        protocol_summary(rec, tune_on="train")
