"""AUROC per class: scikit-learn point estimates, a bootstrap that matches a naive loop, NaN handling."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxr_explain.errors import CxrExplainError
from cxr_explain.metrics.classification import auroc_per_class, format_table1, weighted_auroc


def _data(n: int = 300, c: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < [0.3, 0.1, 0.5][:c]).astype(float)
    s = np.round(y * [1.0, 0.5, 2.0][:c] + rng.normal(size=(n, c)), 1)  # rounding makes ties
    return y, s


def test_point_estimate_is_sklearn_and_ci_brackets_it() -> None:
    y, s = _data()
    df = auroc_per_class(y, s, ["a", "b", "c"], n_boot=400, seed=1)
    assert list(df.columns[:6]) == ["finding", "auroc", "ci_low", "ci_high", "n_pos", "n_neg"]
    for j, name in enumerate("abc"):
        row = df.iloc[j]
        assert row.finding == name
        assert row.auroc == roc_auc_score(y[:, j], s[:, j])
        assert row.ci_low < row.auroc < row.ci_high
        assert (row.n_pos, row.n_neg) == (int(y[:, j].sum()), int((1 - y[:, j]).sum()))
    assert df.attrs["n_boot"] == 400 and df.attrs["ci"] == 0.95
    # a wider interval at a higher level, and the same numbers for the same seed
    wide = auroc_per_class(y, s, ["a", "b", "c"], n_boot=400, seed=1, ci=0.99)
    assert (wide.ci_low <= df.ci_low).all() and (wide.ci_high >= df.ci_high).all()
    pd.testing.assert_frame_equal(df, auroc_per_class(y, s, ["a", "b", "c"], n_boot=400, seed=1))


def test_fixed_example() -> None:
    y = np.array([[0], [0], [1], [1], [0], [1]], dtype=float)
    s = np.array([[0.1], [0.4], [0.35], [0.8], [0.35], [0.9]])
    # pairs (pos, neg): 0.35 vs {0.1 win, 0.4 loss, 0.35 tie}, 0.8 and 0.9 beat all three -> 7.5 / 9
    df = auroc_per_class(y, s, ["Pneumonia"], n_boot=50)
    assert df.auroc[0] == pytest.approx(7.5 / 9) and df.auroc[0] == roc_auc_score(y, s)


def test_bootstrap_equals_a_naive_loop_over_resamples() -> None:
    y, s = _data(n=80, c=2, seed=3)
    n_boot, seed = 200, 7
    df = auroc_per_class(y, s, ["a", "b"], n_boot=n_boot, seed=seed, chunk=n_boot)
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))  # same draws
    for j in range(2):
        vals = [roc_auc_score(y[i, j], s[i, j]) for i in idx if 0 < y[i, j].sum() < len(i)]
        lo, hi = np.quantile(vals, [0.025, 0.975])
        assert df.ci_low[j] == pytest.approx(lo, abs=1e-12)
        assert df.ci_high[j] == pytest.approx(hi, abs=1e-12)


def test_weighted_auroc_is_auroc_of_the_repeated_sample() -> None:
    y, s = _data(n=120, c=1, seed=5)
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, 120, 120) for _ in range(5)]
    w = np.stack([np.bincount(d, minlength=120) for d in draws], axis=1)  # (N, B)
    got = weighted_auroc(s[:, 0], y[:, 0] == 1, y[:, 0] == 0, w)
    want = [roc_auc_score(y[d, 0], s[d, 0]) for d in draws]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    ones = weighted_auroc(s[:, 0], y[:, 0] == 1, y[:, 0] == 0, np.ones(120))
    assert ones[0] == pytest.approx(roc_auc_score(y[:, 0], s[:, 0]), abs=1e-12)
    assert np.isnan(weighted_auroc(s[:, 0], y[:, 0] == 1, y[:, 0] == 0, (y[:, 0] == 0).astype(float)))[0]


def test_single_class_column_gives_nan_with_a_note() -> None:
    y, s = _data(n=60, c=3)
    y[:, 1] = 0.0  # no positives
    y[:, 2] = 1.0  # no negatives
    df = auroc_per_class(y, s, ["a", "Hernia", "c"], n_boot=100)
    assert np.isfinite(df.auroc[0]) and np.isfinite(df.ci_low[0])
    for j, word in [(1, "only negatives"), (2, "only positives")]:
        assert np.isnan(df.auroc[j]) and np.isnan(df.ci_low[j]) and np.isnan(df.ci_high[j])
        assert word in df.note[j]
    assert (df.n_pos[1], df.n_neg[1], df.n_pos[2], df.n_neg[2]) == (0, 60, 60, 0)


def test_rare_class_skips_one_class_resamples_and_says_so() -> None:
    rng = np.random.default_rng(2)
    y = np.zeros((30, 1))
    y[5] = 1
    s = rng.normal(size=(30, 1))
    df = auroc_per_class(y, s, ["Nodule"], n_boot=300, seed=0)
    # P(no positive in a resample) = (29/30)^30 ~ 0.36, so about a third are skipped
    skipped = int(df.note[0].split(" of ")[0])
    assert 60 < skipped < 160 and "skipped" in df.note[0]
    assert df.ci_low[0] <= df.auroc[0] <= df.ci_high[0]


def test_unknown_labels_are_left_out_of_that_class() -> None:
    y, s = _data(n=100, c=2, seed=9)
    y[:20, 0] = np.nan
    df = auroc_per_class(y, s, ["a", "b"], n_boot=0)
    assert df.auroc[0] == roc_auc_score(y[20:, 0], s[20:, 0])
    assert df.n_pos[0] + df.n_neg[0] == 80 and df.auroc[1] == roc_auc_score(y[:, 1], s[:, 1])
    assert np.isnan(df.ci_low).all()  # n_boot=0: no interval


def test_bad_inputs_raise_one_line_errors() -> None:
    y, s = _data(n=20, c=2)
    bad_y = y.copy()
    bad_y[0, 0] = 2
    bad_s = s.copy()
    bad_s[1, 1] = np.nan
    for args, pattern in [((y, s[:, :1], ["a", "b"]), "same shape"),
                          ((y, s, ["a"]), "label names"),
                          ((bad_y, s, ["a", "b"]), "0, 1 or NaN"),
                          ((y, bad_s, ["a", "b"]), "NaN or inf")]:
        with pytest.raises(CxrExplainError, match=pattern) as info:
            auroc_per_class(*args, n_boot=10)
        assert "\n" not in str(info.value)


def test_table1_names_checkpoint_and_split_beside_every_number() -> None:
    y, s = _data(n=200, c=3)
    y[:, 2] = 0
    df = auroc_per_class(y, s, ["Atelectasis", "Mass", "Hernia"], n_boot=100)
    md = format_table1(df, "chexnet-arnoweng.pth.tar", "nih-test")
    assert "`chexnet-arnoweng.pth.tar`" in md.splitlines()[0] and "`nih-test`" in md.splitlines()[0]
    rows = [line for line in md.splitlines() if line.startswith("| chexnet")]
    assert len(rows) == 4  # three findings and the mean
    assert all("| nih-test |" in r for r in rows)
    assert f"{df.auroc[0]:.3f}" in rows[0] and f"{df.ci_low[0]:.3f}–{df.ci_high[0]:.3f}" in rows[0]
    assert "n/a" in rows[2] and "Hernia: only negatives" in md
    assert f"{df.auroc[:2].mean():.3f}" in rows[3] and "mean (2 findings)" in rows[3]
