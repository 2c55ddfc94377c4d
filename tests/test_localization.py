"""Localisation metrics on hand-computed cases (docs/evaluation.md §1-§3, §6)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from skimage.filters import threshold_otsu

from cxr_explain.data.types import Box
from cxr_explain.errors import CxrExplainError
from cxr_explain.metrics.localization import (
    PAPER_THRESHOLDS,
    auprc,
    bootstrap_mean_ci,
    hit,
    iou_at_thresholds,
    localization_scores,
    MapScorer,
    OPTIONAL_SCORES,
    normalize_map,
    otsu_iou,
    otsu_threshold,
    rank_accuracy,
    region_shares,
    relevance_mass,
    SortedHeatmap,
    sorted_pixels,
)


def box_mask(y0, y1, x0, x1, shape=(32, 32)):
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# ---------------------------------------------------------------- normalize_map
def test_normalize_clips_negatives_and_divides_by_positive_max():
    h = np.array([[-10.0, 0.0], [2.0, 4.0]])
    np.testing.assert_allclose(normalize_map(h), [[0, 0], [0.5, 1.0]])


def test_normalize_all_zero_or_all_negative_stays_zero():
    assert not normalize_map(np.zeros((5, 5))).any()
    out = normalize_map(-np.ones((5, 5)))
    assert out.shape == (5, 5) and not out.any()


def test_normalize_minmax_scaling():
    h = np.array([[-2.0, 0.0], [2.0, 6.0]])
    np.testing.assert_allclose(normalize_map(h, scaling="minmax"), [[0, 0.25], [0.5, 1.0]])
    assert not normalize_map(np.full((3, 3), -4.0), scaling="minmax").any()
    with pytest.raises(CxrExplainError, match="scaling"):
        normalize_map(h, scaling="abs")
    with pytest.raises(CxrExplainError, match="NaN"):
        normalize_map(np.array([[np.nan, 1.0]]))


def test_normalize_bilinear_is_align_corners_false():
    # 2 -> 4 with align_corners=False: sample points at -0.25, 0.25, 0.75, 1.25 (clamped)
    h = np.array([[0.0, 1.0], [0.0, 1.0]])
    out = normalize_map(h, resize_to=(4, 4))
    np.testing.assert_allclose(out[0], [0.0, 0.25, 0.75, 1.0])
    nearest = normalize_map(h, resize_to=(4, 4), mode="nearest")
    np.testing.assert_allclose(nearest[0], [0, 0, 1, 1])


def test_normalize_resize_happens_before_clipping():
    # negative neighbours pull the interpolated values down before the clip
    h = np.array([[-1.0, 1.0]])
    out = normalize_map(h, resize_to=(1, 4))
    # raw interpolation: [-1, -0.5, 0.5, 1] -> clip -> [0, 0, .5, 1]
    np.testing.assert_allclose(out[0], [0, 0, 0.5, 1.0])


def test_7x7_map_upsampled_to_224_keeps_max_location():
    rng = np.random.default_rng(3)
    for _ in range(5):
        h = rng.random((7, 7))
        r, c = np.unravel_index(np.argmax(h), h.shape)
        up = normalize_map(h, resize_to=(224, 224))
        ur, uc = np.unravel_index(np.argmax(up), up.shape)
        assert ur // 32 == r and uc // 32 == c
        assert up.max() == pytest.approx(1.0)


def test_normalize_accepts_torch_and_rejects_3d():
    out = normalize_map(torch.tensor([[[1.0, 3.0]]]))
    np.testing.assert_allclose(out, [[1 / 3, 1.0]], rtol=1e-6)
    with pytest.raises(CxrExplainError):
        normalize_map(np.zeros((3, 4, 4)))
    with pytest.raises(CxrExplainError, match="resize mode"):
        normalize_map(np.zeros((4, 4)), resize_to=(8, 8), mode="cubic-spline")


# ---------------------------------------------------------------- IoU
def test_map_equal_to_box_scores_one_everywhere():
    gt = box_mask(4, 12, 6, 20)
    row = localization_scores(gt * 0.7, gt)
    for t in PAPER_THRESHOLDS:
        assert row[f"iou@{t:g}"] == 1.0
    assert row["iou_otsu"] == 1.0
    assert row["hit"] == 1.0 and row["mass"] == 1.0 and row["rank_acc"] == 1.0
    assert row["auprc"] == pytest.approx(1.0)


def test_map_outside_box_scores_zero():
    gt = box_mask(4, 12, 6, 20)
    h = box_mask(20, 30, 0, 10).astype(float)
    row = localization_scores(h, gt)
    assert all(row[f"iou@{t:g}"] == 0.0 for t in PAPER_THRESHOLDS)
    assert row["hit"] == 0.0 and row["mass"] == 0.0 and row["rank_acc"] == 0.0
    # recall stays 0 at T = 1; at T = 0 every pixel is selected: precision = base rate
    assert row["auprc"] == pytest.approx(gt.sum() / gt.size)


def test_half_overlap_is_one_third():
    # box: columns 0..8, region: columns 4..12, same rows -> inter 4 cols, union 12 cols
    gt = box_mask(0, 10, 0, 8)
    h = box_mask(0, 10, 4, 12).astype(float)
    np.testing.assert_allclose(iou_at_thresholds(h, gt), [1 / 3] * 5)


def test_threshold_sweep_hand_case():
    # a peak (value 1) on 4 box pixels, a plateau (0.25) on 12 other box pixels + 16 outside
    gt = box_mask(0, 4, 0, 4, shape=(8, 8))  # 16 px
    h = np.zeros((8, 8))
    h[0:2, 0:2] = 1.0  # 4 px, inside
    h[2:4, 0:4] = 0.25  # 8 px inside
    h[0:2, 2:4] = 0.25  # 4 px inside
    h[4:8, 0:4] = 0.25  # 16 px outside
    ious = iou_at_thresholds(normalize_map(h), gt, (0.1, 0.2, 0.3))
    # T <= 0.2: region 32 px, inter 16, union 32; T = 0.3: region 4 px, inter 4, union 16
    np.testing.assert_allclose(ious, [0.5, 0.5, 0.25])


def test_all_zero_map_zero_or_nan():
    gt = box_mask(2, 8, 2, 8)
    h = np.zeros((32, 32))
    assert (iou_at_thresholds(h, gt) == 0).all()
    assert np.isnan(iou_at_thresholds(h, gt, empty_region="nan")).all()
    row = localization_scores(h, gt, empty_region="nan")
    assert math.isnan(row["iou@0.3"]) and math.isnan(row["iou_otsu"])
    assert row["hit"] == 0.0 and row["mass"] == 0.0 and row["rank_acc"] == 0.0
    with pytest.raises(CxrExplainError, match="empty_region"):
        iou_at_thresholds(h, gt, empty_region="skip")


def test_empty_region_nan_only_where_region_is_empty():
    gt = box_mask(0, 4, 0, 4, shape=(8, 8))
    h = np.zeros((8, 8))
    h[0, 0] = 0.3  # not normalised on purpose: region empty for T >= 0.3
    out = iou_at_thresholds(h, gt, (0.1, 0.2, 0.3, 0.4), empty_region="nan")
    np.testing.assert_allclose(out[:2], [1 / 16, 1 / 16])
    assert np.isnan(out[2:]).all()


def test_negative_values_are_ignored():
    gt = box_mask(4, 12, 6, 20)
    h = np.where(gt, 1.0, -50.0)  # large negative outside the box
    row = localization_scores(h, gt)
    assert row["iou@0.1"] == 1.0 and row["mass"] == 1.0 and row["hit"] == 1.0
    assert relevance_mass(h, gt) == 1.0


def test_box_at_image_edge():
    # a box that sticks out of the left and bottom border is clipped by Box.to_mask
    box = Box("Effusion", x=-5.0, y=20.0, w=12.0, h=30.0)
    gt = box.to_mask(32, 32)
    assert gt[20:32, 0:7].all() and gt.sum() == 12 * 7
    h = np.zeros((32, 32))
    h[20:, :7] = 1.0
    row = localization_scores(h, gt)
    assert row["iou@0.5"] == 1.0 and row["hit"] == 1.0
    # a heatmap filling the corner pixel only
    h2 = np.zeros((32, 32))
    h2[31, 0] = 1.0
    assert iou_at_thresholds(h2, gt, (0.5,))[0] == pytest.approx(1 / 84)


def test_empty_ground_truth_is_nan():
    gt = np.zeros((16, 16), bool)
    h = np.ones((16, 16))
    assert np.isnan(iou_at_thresholds(h, gt)).all()
    assert math.isnan(hit(h, gt)) and math.isnan(relevance_mass(h, gt))
    assert math.isnan(rank_accuracy(h, gt)) and math.isnan(auprc(h, gt))


def test_two_boxes_of_different_findings_evaluated_separately():
    size = (64, 64)
    mass = Box("Mass", 4, 4, 16, 16)
    nod = Box("Nodule", 40, 40, 8, 8)
    m_mass, m_nod = mass.to_mask(*size), nod.to_mask(*size)
    h_mass = m_mass.astype(float)  # a map for the Mass logit that points at the Mass box
    h_nod = np.zeros(size)
    h_nod[40:48, 44:52] = 1.0  # half of the Nodule box, shifted right by 4
    r_mass = localization_scores(h_mass, m_mass)
    r_nod = localization_scores(h_nod, m_nod)
    assert r_mass["iou@0.1"] == 1.0
    assert r_nod["iou@0.1"] == pytest.approx(32 / 96)
    # each map scored against the other finding's box gives 0
    assert localization_scores(h_mass, m_nod)["iou@0.1"] == 0.0
    assert localization_scores(h_nod, m_mass)["iou@0.1"] == 0.0


def test_localization_scores_resizes_to_original_size():
    gt = Box("Mass", 256, 512, 256, 256).to_mask(1024, 1024)
    h = np.zeros((4, 4))
    h[2, 1] = 1.0  # the cell that covers [512, 768) x [256, 512)
    row = localization_scores(h, gt, thresholds=(0.1, 0.5))
    assert set(row) == {"iou@0.1", "iou@0.5", "otsu_t", "iou_otsu", "hit", "mass", "rank_acc", "auprc"}
    assert row["hit"] == 1.0
    assert 0.4 < row["iou@0.5"] <= 1.0
    with pytest.raises(CxrExplainError, match="shape"):
        iou_at_thresholds(h, gt)


# ---------------------------------------------------------------- Otsu
def _otsu_maps():
    """Bimodal, CAM-like (float32, ties), float64, integer-valued, and values sitting on bin edges."""
    rng = np.random.default_rng(0)
    maps = []
    for seed in range(4):
        h = np.concatenate([rng.normal(0.2, 0.05, 3000), rng.normal(0.7, 0.1, 1000 + 500 * seed)])
        maps.append(normalize_map(np.clip(h, 0, None).reshape(-1, 50)))
    maps.append(normalize_map(rng.random((7, 7)) ** 3, resize_to=(128, 128)))
    maps.append(normalize_map(rng.normal(size=(4, 4)), resize_to=(200, 150)))  # about half exactly 0
    maps.append(rng.normal(size=(64, 64)))  # float64, signed
    maps.append(rng.integers(0, 5, size=(30, 30)))  # integers -> float32 values 0..4
    edges = np.linspace(0, 1, 257, dtype=np.float32)
    maps.append(np.concatenate([edges, edges[::3], np.float32([0.5] * 40)]).reshape(1, -1))  # on the edges
    return maps


@pytest.mark.parametrize("i", range(len(_otsu_maps())))
def test_otsu_is_exactly_skimage(i):
    h = _otsu_maps()[i]
    ref = h.astype(np.float32) if h.dtype.kind in "iub" else h  # integer maps are scored as float32
    assert otsu_threshold(h) == float(threshold_otsu(ref))
    assert otsu_threshold(torch.from_numpy(np.ascontiguousarray(h))) == float(threshold_otsu(ref))
    assert otsu_threshold(h, nbins=32) == float(threshold_otsu(ref, nbins=32))
    if i < 4:
        assert 0.3 < otsu_threshold(h) < 0.6


def test_otsu_edge_cases():
    assert otsu_threshold(np.full((4, 4), 0.5)) == 0.5  # constant: its value, so h > t is empty
    assert otsu_threshold(np.zeros((3, 3))) == 0.0
    assert math.isnan(otsu_iou(np.zeros((3, 3)), np.zeros((3, 3), bool)))  # empty ground truth
    assert otsu_iou(np.zeros((3, 3)), np.eye(3, dtype=bool)) == 0.0  # all-zero map: empty region
    with pytest.raises(CxrExplainError, match="empty heatmap"):
        otsu_threshold(np.zeros((0, 5)))


def test_otsu_iou_separates_two_levels():
    gt = box_mask(0, 8, 0, 8, shape=(16, 16))
    h = np.full((16, 16), 0.1)
    h[gt] = 0.9
    assert 0.1 <= otsu_threshold(h) < 0.9
    assert otsu_iou(h, gt) == 1.0
    assert otsu_threshold(np.full((4, 4), 0.5)) == 0.5


# ---------------------------------------------------------------- hit / mass / rank / AUPRC
def test_hit_hand_cases():
    gt = box_mask(0, 2, 0, 2, shape=(4, 4))
    h = np.zeros((4, 4))
    h[1, 1] = 2.0
    h[3, 3] = 1.0
    assert hit(h, gt) == 1.0
    h[3, 3] = 3.0
    assert hit(h, gt) == 0.0
    assert hit(np.zeros((4, 4)), gt) == 0.0  # all-zero map points nowhere
    assert hit(-np.ones((4, 4)), gt) == 0.0


def test_relevance_mass_hand_case():
    gt = box_mask(0, 2, 0, 2, shape=(4, 4))
    h = np.zeros((4, 4))
    h[0, 0], h[1, 1], h[3, 3], h[2, 2] = 3.0, 1.0, 4.0, -10.0
    assert relevance_mass(h, gt) == pytest.approx(4.0 / 8.0)
    assert relevance_mass(-np.ones((4, 4)), gt) == 0.0


def test_rank_accuracy_hand_cases():
    gt = np.zeros((2, 4), bool)
    gt[0, 0] = gt[0, 2] = True  # K = 2
    h = np.array([[3.0, 2.0, 2.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    # top-1 = 3 (inside); the 2nd slot is shared by two 2.0s, one inside -> 1 + 1/2
    assert rank_accuracy(h, gt) == pytest.approx(0.75)
    h2 = np.array([[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    assert rank_accuracy(h2, gt) == 1.0
    h3 = np.array([[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # one positive pixel, outside
    assert rank_accuracy(h3, gt) == 0.0
    h4 = np.array([[5.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # one positive, inside; K = 2
    assert rank_accuracy(h4, gt) == 0.5


@pytest.mark.parametrize("levels", [None, 5])
def test_auprc_matches_sklearn(levels):
    rng = np.random.default_rng(11)
    gt = rng.random((40, 40)) > 0.8
    h = rng.random((40, 40)) + 0.3 * gt
    if levels:  # many ties
        h = np.round(h * levels)
    assert auprc(h, gt) == pytest.approx(average_precision_score(gt.ravel(), h.ravel()), abs=1e-12)


def test_auprc_perfect_and_worst():
    gt = box_mask(0, 4, 0, 4, shape=(8, 8))
    assert auprc(gt * 1.0 + 0.1, gt) == pytest.approx(1.0)
    # positives ranked strictly last: precision k / (48 + k) at each of the 16 recall steps
    worst = auprc(np.where(gt, 0.0, 1.0) + np.arange(64).reshape(8, 8) * 1e-3 * gt, gt)
    expected = np.mean([k / (48 + k) for k in range(1, 17)])
    assert worst == pytest.approx(expected)


# ---------------------------------------------------------------- region shares
def test_region_shares_hand_case_and_sum():
    lung = box_mask(0, 8, 0, 8, shape=(10, 10))
    lesion = box_mask(0, 2, 0, 2, shape=(10, 10))
    lesion[9, 9] = True  # a lesion pixel outside the lung mask counts as lesion
    h = np.zeros((10, 10))
    h[0, 0] = 2.0  # lesion
    h[9, 9] = 1.0  # lesion (outside lung)
    h[5, 5] = 3.0  # lung, not lesion
    h[9, 0] = 4.0  # outside lungs
    h[0, 1] = -7.0  # negative: ignored
    shares = region_shares(h, lesion, lung)
    np.testing.assert_allclose(shares, [0.3, 0.3, 0.4])
    rng = np.random.default_rng(0)
    s = region_shares(rng.normal(size=(10, 10)), lesion, lung)
    assert sum(s) == pytest.approx(1.0) and min(s) >= 0
    assert all(math.isnan(v) for v in region_shares(-np.ones((10, 10)), lesion, lung))


# ---------------------------------------------------------------- bootstrap
def test_bootstrap_ci_brackets_mean_and_drops_nan():
    rng = np.random.default_rng(5)
    v = rng.normal(0.5, 0.2, 200)
    mean, lo, hi = bootstrap_mean_ci(np.r_[v, np.nan, np.nan], n_boot=2000, seed=1)
    assert mean == pytest.approx(v.mean())
    assert lo < mean < hi
    se = v.std(ddof=1) / np.sqrt(v.size)  # normal-theory half-width ~ 1.96 se
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.15)
    assert bootstrap_mean_ci(v, seed=1) == bootstrap_mean_ci(v, seed=1)
    assert all(math.isnan(x) for x in bootstrap_mean_ci([np.nan]))
    assert bootstrap_mean_ci([0.25]) == (0.25, 0.25, 0.25)


def test_bootstrap_is_the_percentile_interval_of_seeded_resamples():
    v = np.random.default_rng(8).normal(size=60)
    idx = np.random.default_rng(3).integers(0, 60, size=(500, 60))  # the draws default_rng(3) makes
    lo, hi = np.quantile(v[idx].mean(axis=1), [0.05, 0.95])
    mean, got_lo, got_hi = bootstrap_mean_ci(v, n_boot=500, seed=3, ci=0.9)
    assert mean == v.mean()
    assert got_lo == pytest.approx(lo, abs=1e-12) and got_hi == pytest.approx(hi, abs=1e-12)
    assert bootstrap_mean_ci(np.full(7, 0.5)) == (0.5, 0.5, 0.5)  # constant: a point interval
    with pytest.raises(CxrExplainError, match="ci must lie"):
        bootstrap_mean_ci(v, ci=95)


def test_bootstrap_large_input_in_chunks():
    v = np.random.default_rng(0).random(50_000)  # forces several chunks
    mean, lo, hi = bootstrap_mean_ci(v, n_boot=300, seed=0)
    assert lo < mean < hi and hi - lo < 0.02


# ---------------------------------------------------------------- same numbers as the hand-written version
def _fixed_cases():
    """(raw map, gt mask, localization_scores options): the maps the rewrite must score as before."""
    rng = np.random.default_rng(2024)
    size = (96, 112)
    cases = []
    for i in range(12):  # CAM-like, LRP-like (sparse, heavy-tailed), full-resolution, float64
        raw = [rng.normal(size=(4, 4)), rng.normal(size=(12, 14)),
               rng.standard_t(2, size=(48, 56)) * (rng.random((48, 56)) < 0.3),
               rng.normal(size=size)][i % 4]
        raw = raw.astype(np.float64 if i >= 8 else np.float32)
        y, x = rng.integers(0, 80), rng.integers(0, 90)
        gt = box_mask(y, y + int(rng.integers(1, 40)), x, x + int(rng.integers(1, 40)), shape=size)
        cases.append((raw, gt, {}))
    plateau = np.round(rng.random(size) * 4) / 4  # few distinct values: ties at every threshold and rank
    cases += [
        (plateau, box_mask(10, 60, 20, 70, size), {}),
        (plateau, box_mask(10, 60, 20, 70, size), {"scaling": "minmax", "empty_region": "nan"}),
        (rng.normal(size=(8, 8)), box_mask(0, 96, 0, 112, size), {}),  # gt = every pixel
        (rng.normal(size=(8, 8)), box_mask(50, 51, 60, 61, size), {}),  # one-pixel gt
        (rng.normal(size=(8, 8)), box_mask(0, 0, 0, 0, size), {}),  # empty gt: NaN
        (-np.ones((8, 8)), box_mask(0, 30, 0, 30, size), {}),  # nothing positive: all-zero map
        (np.full((8, 8), 3.0), box_mask(0, 30, 0, 30, size), {}),  # constant positive map
        (rng.normal(size=(8, 8)), box_mask(5, 40, 5, 40, size),
         {"thresholds": (0.0, 0.05, 0.5, 0.95, 1.0), "empty_region": "nan", "resize": "nearest"}),
    ]
    return cases


@pytest.mark.parametrize("case", range(len(_fixed_cases())))
def test_localization_scores_equal_the_hand_written_reference(case):
    import localization_reference as old  # the implementation before the rewrite, frozen in tests/

    raw, gt, kw = _fixed_cases()[case]
    new_row = localization_scores(raw, gt, **kw)
    old_row = old.localization_scores(raw, gt, **kw)
    assert list(new_row) == list(old_row)
    exact = [k for k in new_row if k.startswith("iou@")] + ["hit", "rank_acc"]
    np.testing.assert_array_equal([new_row[k] for k in exact], [old_row[k] for k in exact])
    np.testing.assert_allclose([new_row["mass"], new_row["auprc"]], [old_row["mass"], old_row["auprc"]],
                               rtol=0, atol=1e-12)
    hn = normalize_map(raw, resize_to=gt.shape, mode=kw.get("resize", "bilinear"), scaling=kw.get("scaling", "clip"))
    # Otsu is scikit-image's (the old histogram was float64, so it could differ by up to one bin)
    t = float(threshold_otsu(hn))
    assert new_row["otsu_t"] == t
    np.testing.assert_array_equal(new_row["iou_otsu"],
                                  old.iou_at_thresholds(hn, gt, (t,), kw.get("empty_region", "zero"))[0])
    if hn.min() < hn.max():
        assert abs(new_row["otsu_t"] - old_row["otsu_t"]) <= (hn.max() - hn.min()) / 256 + 1e-7


@pytest.mark.parametrize("case", range(0, len(_fixed_cases()), 3))
def test_metric_functions_on_signed_maps_equal_the_reference(case):
    """The public functions also take raw, signed maps (negatives are no evidence for rank/mass/hit)."""
    import localization_reference as old

    raw, gt, _ = _fixed_cases()[case]
    h = normalize_map(raw, resize_to=gt.shape, scaling="minmax") - 0.25  # a quarter of the range negative
    t = (-0.1, 0.0, 0.1, 0.3, 0.7)
    np.testing.assert_array_equal(iou_at_thresholds(h, gt, t), old.iou_at_thresholds(h, gt, t))
    np.testing.assert_array_equal(iou_at_thresholds(h, gt, t, "nan"), old.iou_at_thresholds(h, gt, t, "nan"))
    for new_fn, old_fn in [(hit, old.hit), (rank_accuracy, old.rank_accuracy)]:
        np.testing.assert_array_equal(new_fn(h, gt), old_fn(h, gt))
    for new_fn, old_fn in [(relevance_mass, old.relevance_mass), (auprc, old.auprc)]:
        np.testing.assert_allclose(new_fn(h, gt), old_fn(h, gt), rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", range(len(_fixed_cases())))
def test_one_map_scored_against_many_regions_equals_one_call_per_region(case):
    """evaluate sorts a map once for all regions of its finding (several boxes, a mask): each row
    must be bit for bit the one-region call's, whatever order the regions come in."""
    raw, gt, kw = _fixed_cases()[case]
    th = kw.get("thresholds", PAPER_THRESHOLDS)
    hn = normalize_map(raw, resize_to=gt.shape, mode=kw.get("resize", "bilinear"), scaling=kw.get("scaling", "clip"))
    scorer = MapScorer(hn)
    rng = np.random.default_rng(case)
    other = np.zeros(gt.shape, bool)
    other[rng.integers(0, 50):rng.integers(50, 96), rng.integers(0, 50):rng.integers(50, 112)] = True
    for region in (gt, other, ~gt, gt):  # again after another region: nothing of the first one is kept
        want = localization_scores(raw, region, **kw)
        got = scorer.scores(region, th, kw.get("empty_region", "zero"))
        assert list(got) == list(want)
        np.testing.assert_array_equal(list(got.values()), list(want.values()))


@pytest.mark.parametrize("case", range(len(_fixed_cases())))
@pytest.mark.parametrize("metrics", [("otsu", "hit", "mass"), ("hit",), ("rank",), ()])
def test_a_subset_of_metrics_gives_the_same_numbers_and_none_for_the_rest(case, metrics):
    """``evaluate --metrics``: without rank and AUPRC the map is not sorted; IoU (counted directly),
    Otsu (numpy's histogram) and hit are bit for bit the full row's, mass up to the order of its sum."""
    raw, gt, kw = _fixed_cases()[case]
    full = localization_scores(raw, gt, **kw)
    part = localization_scores(raw, gt, **kw, metrics=metrics)
    assert list(part) == list(full)
    kept = [c for m in metrics for c in OPTIONAL_SCORES[m]]
    for key, value in part.items():
        if key.startswith("iou@") or key in kept:
            if key == "mass":
                np.testing.assert_allclose(value, full[key], rtol=1e-12, atol=0)
            else:
                np.testing.assert_array_equal(value, full[key])
        else:
            assert value is None, key
    scorer = MapScorer(normalize_map(raw, resize_to=gt.shape, mode=kw.get("resize", "bilinear"),
                                     scaling=kw.get("scaling", "clip")), metrics)
    assert (scorer.sorted.values is None) == ("rank" not in metrics)  # no sort unless rank / AUPRC ask for it


def test_an_unsorted_map_refuses_rank_and_auprc_and_unknown_metrics_are_named():
    h = np.array([[0.5, 0.1, 0.9], [0.5, 0.0, 0.3]], dtype=np.float32)
    sm = SortedHeatmap(h, np.eye(2, 3, dtype=bool), sort=False)
    np.testing.assert_array_equal(sm.iou((0.3, 0.9)), SortedHeatmap(h, np.eye(2, 3, dtype=bool)).iou((0.3, 0.9)))
    for fn in (sm.rank_accuracy, sm.auprc):
        with pytest.raises(CxrExplainError, match="in order"):
            fn()
    with pytest.raises(CxrExplainError, match="unknown metric 'aupr'"):
        MapScorer(h, ["aupr"])
    with pytest.raises(CxrExplainError, match="inf/NaN"):
        SortedHeatmap(np.array([[0.0, np.nan]]), sort=False)


def test_sorted_heatmap_counts_and_errors():
    h = np.array([[0.5, 0.1, 0.9], [0.5, 0.0, 0.3]], dtype=np.float32)
    gt = np.array([[1, 0, 1], [0, 0, 0]], dtype=bool)
    sm = SortedHeatmap(h, gt)
    np.testing.assert_array_equal(sm.values, np.sort(h, axis=None))
    np.testing.assert_array_equal(sm.inside, np.float32([0.5, 0.9]))
    # T = 0.3: region {0.5, 0.9, 0.5} (0.3 is not > 0.3), inside {0.5, 0.9}: IoU 2 / 3
    np.testing.assert_array_equal(sm.iou((0.3, 0.9)), [2 / 3, 0.0])
    assert np.isnan(sm.iou((0.9,), "nan")[0])
    assert sm.rank_accuracy() == 1.5 / 2  # top 2 = 0.9 (in) + one of two tied 0.5 (one in): 1 + 1/2
    with pytest.raises(CxrExplainError, match="without a ground-truth mask"):
        SortedHeatmap(h).iou()
    with pytest.raises(CxrExplainError, match="inf/NaN"):
        SortedHeatmap(np.array([[0.0, np.nan]]))
    with pytest.raises(CxrExplainError, match="empty_region"):
        sm.iou(empty_region="drop")


@pytest.mark.parametrize("kind", ["clipped", "signed", "no zeros", "all zero", "negative zero", "nan", "empty"])
def test_sorted_pixels_is_numpy_sort(kind):
    """The sort that skips exact zeros returns np.sort's array: the same values in the same order
    (-0.0 equal to 0.0), NaN last, for maps with many, few or no zeros."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(64, 80)).astype(np.float32)
    if kind == "clipped":
        a = np.maximum(a, 0)
    elif kind == "signed":
        a[rng.random(a.shape) < 0.5] = 0
    elif kind == "all zero":
        a[:] = 0
    elif kind == "negative zero":
        a[a < 0] = -0.0
    elif kind == "nan":
        a[a < 0] = 0
        a[3, 4] = np.nan
    elif kind == "empty":
        a = a[:0]
    got, want = sorted_pixels(a), np.sort(a, axis=None)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_relevance_mass_of_the_scorer_equals_the_function():
    rng = np.random.default_rng(4)
    h = normalize_map(rng.normal(size=(24, 24)), resize_to=(96, 96))
    gt = box_mask(10, 50, 20, 70, shape=(96, 96))
    assert MapScorer(h).scores(gt)["mass"] == pytest.approx(relevance_mass(h, gt), rel=1e-12)
    assert MapScorer(np.zeros((96, 96), np.float32)).scores(gt)["mass"] == 0.0
