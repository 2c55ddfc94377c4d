"""Per-class AUROC with bootstrap confidence intervals (the paper's Table 1).

Point estimate: ``sklearn.metrics.roc_auc_score`` on the images labelled 0 or 1 for that class.
Interval: percentile bootstrap over images, ``scipy.stats.bootstrap(method="percentile")`` on the
image indices (resample the N images with replacement, the same resamples for every class).
A resample is a vector of multiplicities ``w`` (N per resample), and its AUROC is the
weighted Mann–Whitney statistic

    AUC(w) = Σ_g P_g · (N_<g + ½ N_g) / (P · N),

where g runs over the distinct scores, P_g / N_g are the positive / negative weights with
score g, N_<g the negative weight below g, and P, N the totals: exactly what
``roc_auc_score`` returns on the resampled images (ties count ½). Resamples with only one class
present are skipped. Labels other than 0/1 (NaN = unknown) are left out of that class.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import roc_auc_score

from ..errors import CxrExplainError

COLUMNS = ["finding", "auroc", "ci_low", "ci_high", "n_pos", "n_neg", "note"]


def _as_2d(a: object, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise CxrExplainError(f"{name} must be (N, C), got shape {arr.shape}")
    return arr


def weighted_auroc(scores: np.ndarray, pos: np.ndarray, neg: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC of one class under B weightings: ``w`` is (N, B), one column of multiplicities per resample.

    ``pos`` / ``neg`` are boolean masks (N,) of the positive / negative images; other images are
    ignored. Implements the tie-aware formula in the module docstring: with the negatives sorted
    by score and their weights cumulated, each positive adds its weight times the negative weight
    strictly below its score plus half the negative weight tied with it. Returns (B,), NaN where a
    resample has no positive or no negative.
    """
    w = np.asarray(w, dtype=np.float64)
    if w.ndim == 1:
        w = w[:, None]
    neg_idx = np.flatnonzero(neg)
    neg_idx = neg_idx[np.argsort(scores[neg_idx], kind="stable")]
    neg_sorted = scores[neg_idx]
    cum = np.zeros((neg_idx.size + 1, w.shape[1]))
    np.cumsum(w[neg_idx], axis=0, out=cum[1:])
    pos_idx = np.flatnonzero(pos)
    left = np.searchsorted(neg_sorted, scores[pos_idx], side="left")
    right = np.searchsorted(neg_sorted, scores[pos_idx], side="right")
    below = cum[left]
    wp = w[pos_idx]
    num = (wp * (below + 0.5 * (cum[right] - below))).sum(axis=0)
    den = wp.sum(axis=0) * cum[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def auroc_per_class(
    y_true: object,
    scores: object,
    labels: list[str],
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    chunk: int = 250,
) -> pd.DataFrame:
    """One row per finding: AUROC, percentile-bootstrap CI, positives and negatives counted.

    ``y_true`` (N, C) holds 0/1 (NaN = unknown, left out), ``scores`` (N, C) any monotone score
    (logits or probabilities). A class with only one label value gets NaN and a ``note``.
    ``n_boot=0`` skips the bootstrap (CI columns NaN). ``df.attrs`` records n_boot, seed and ci.
    """
    y = _as_2d(y_true, "y_true")
    s = _as_2d(scores, "scores")
    if y.shape != s.shape:
        raise CxrExplainError(f"y_true {y.shape} and scores {s.shape} must have the same shape")
    if y.shape[1] != len(labels):
        raise CxrExplainError(f"{y.shape[1]} score columns but {len(labels)} label names; make them agree")
    if not np.isfinite(s).all():
        raise CxrExplainError("scores contain NaN or inf; check the model outputs")
    known = ~np.isnan(y)
    if not np.isin(y[known], (0.0, 1.0)).all():
        raise CxrExplainError("y_true must hold 0, 1 or NaN (unknown)")
    if not 0 < ci < 1:
        raise CxrExplainError(f"ci must be in (0, 1), got {ci}")
    n, c = y.shape
    pos, neg = y == 1, y == 0
    both = [j for j in range(c) if pos[:, j].any() and neg[:, j].any()]
    boots = np.full((c, max(n_boot, 0)), np.nan)
    ci_scipy = np.full((c, 2), np.nan)
    if n_boot > 0 and n >= 2 and both:

        def resampled_aurocs(idx: np.ndarray, axis: int = -1) -> np.ndarray:
            """(C, B) AUROCs of the B resamples of image indices ``idx`` (B, N); NaN = one class."""
            b = idx.shape[0]
            flat = (idx * b + np.arange(b)[:, None]).ravel()  # image-major: w[i, r] = count of i in r
            w = np.bincount(flat, minlength=n * b).reshape(n, b).astype(np.float64)
            out = np.full((c, b), np.nan)
            for j in both:
                out[j] = weighted_auroc(s[:, j], pos[:, j], neg[:, j], w)
            return out

        with warnings.catch_warnings():  # classes with skipped resamples get their interval below
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            res = stats.bootstrap((np.arange(n),), resampled_aurocs, n_resamples=n_boot, batch=chunk,
                                  vectorized=True, confidence_level=ci, method="percentile",
                                  rng=np.random.default_rng(seed))
        boots = np.asarray(res.bootstrap_distribution).reshape(c, n_boot)
        ci_scipy = np.stack([res.confidence_interval.low, res.confidence_interval.high], axis=-1).reshape(c, 2)
    rows = []
    lo_q, hi_q = (1 - ci) / 2, 1 - (1 - ci) / 2
    for j, name in enumerate(labels):
        n_pos, n_neg = int(pos[:, j].sum()), int(neg[:, j].sum())
        if n_pos == 0 or n_neg == 0:
            rows.append([name, np.nan, np.nan, np.nan, n_pos, n_neg,
                         f"only {'negatives' if n_pos == 0 else 'positives'}: AUROC undefined"])
            continue
        auc = float(roc_auc_score(pos[known[:, j], j], s[known[:, j], j]))
        valid = boots[j][~np.isnan(boots[j])]
        note = ""
        if valid.size == n_boot and n_boot > 0:
            lo, hi = (float(v) for v in ci_scipy[j])
        elif valid.size:  # the percentile interval of the resamples that had both classes
            lo, hi = (float(v) for v in np.quantile(valid, [lo_q, hi_q]))
            note = f"{n_boot - valid.size} of {n_boot} resamples had one class and were skipped"
        else:
            lo = hi = np.nan
            if n_boot > 0:
                note = "no bootstrap resample had both classes"
        rows.append([name, auc, lo, hi, n_pos, n_neg, note])
    df = pd.DataFrame(rows, columns=COLUMNS)
    df.attrs.update({"n_boot": int(n_boot), "seed": int(seed), "ci": float(ci), "n_images": int(n)})
    return df


def _fmt(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def format_table1(df: pd.DataFrame, checkpoint_name: str, split_name: str) -> str:
    """Markdown Table 1: one row per finding, the checkpoint and split named on every row.

    The last row is the unweighted mean AUROC over findings with a defined AUROC.
    """
    ci = float(df.attrs.get("ci", 0.95))
    n_boot = df.attrs.get("n_boot")
    pct = f"{ci * 100:g}%"
    lines = [
        f"**AUROC per finding** — checkpoint `{checkpoint_name}`, split `{split_name}`"
        + (f", {n_boot}-resample bootstrap {pct} CI" if n_boot else ""),
        "",
        f"| checkpoint | split | finding | AUROC | {pct} CI | n pos | n neg |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in df.itertuples(index=False):
        ci_txt = f"{_fmt(r.ci_low)}–{_fmt(r.ci_high)}" if np.isfinite(r.ci_low) else "n/a"
        lines.append(f"| {checkpoint_name} | {split_name} | {r.finding} | {_fmt(r.auroc)} | {ci_txt} "
                     f"| {r.n_pos} | {r.n_neg} |")
        if getattr(r, "note", ""):
            notes.append(f"- {r.finding}: {r.note}")
    defined = df["auroc"].dropna()
    if len(defined):
        lines.append(f"| {checkpoint_name} | {split_name} | **mean ({len(defined)} findings)** | "
                     f"{defined.mean():.3f} | | | |")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"
