"""Summary tables from ``results.csv``: Table 2 in the paper's layout and the other metrics, as
:class:`~.tables.Table` s (display frame + numbers), written by the one table writer.

Every table states the protocol that produced it (:func:`protocol_text`). Cells are the mean over
ground-truth regions with a percentile-bootstrap 95% CI (1000 resamples, seed 0;
:func:`~cxr_explain.metrics.localization.bootstrap_mean_ci`) and the count. Subsets: ``all``
(every evaluated image) and, when the ``split`` column names a test split, ``test``.
Ground truth: ``box`` (the paper's) and ``mask`` (exact masks, synthetic data) are never mixed.
:func:`summary_tables` also gathers the faithfulness and intention tables of :mod:`.analyses`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from ..errors import CxrExplainError
from ..metrics.localization import OPTIONAL_SCORES, bootstrap_mean_ci
from .analyses import analysis_tables
from .folder import TABLES_DIR, ResultsFolder
from .header import arch_text, checkpoint_text, films_text
from .run import ABOUT
from .schema import iou_column, thresholds_of
from .tables import Table, TableGroup, ci_cell

__all__ = ["OTHER_METRICS", "ABBREV", "ALL", "protocol_text", "summarize", "table2", "metrics_table",
           "subsets_of", "localization_tables", "conservation_table", "summary_tables", "write_summaries",
           "table2_text"]

OTHER_METRICS = {
    "iou_otsu": "IoU at Otsu's threshold (CheXlocalize, §2)",
    "hit": "hit rate / pointing game (CheXlocalize, §2)",
    "mass": "relevance mass accuracy (energy pointing game, §3)",
    "rank_acc": "relevance rank accuracy (§3)",
    "auprc": "AUPRC of the map as a pixel detector (§3)",
}
#: Short names of :data:`OTHER_METRICS` in a table's metric column.
METRIC_NAMES = {"iou_otsu": "Otsu IoU", "hit": "hit", "mass": "mass", "rank_acc": "rank acc.", "auprc": "AUPRC"}
ABBREV = {"Atelectasis": "Atel", "Cardiomegaly": "Card", "Effusion": "Effu", "Infiltration": "Infi",
          "Mass": "Mass", "Nodule": "Nodu", "Pneumonia": "Pneu", "Pneumothorax": "Ptx"}
ALL = "All"


def protocol_text(run: dict, subset: str, gt: str, table: str = "iou") -> str:
    """One paragraph naming the protocol and every choice behind a table's numbers
    (``table="iou"``: Table 2's IoU at T; ``"metrics"``: the §2/§3 scores)."""
    model = run.get("model", {})
    ds = run.get("dataset", {})
    about = run.get(ABOUT) or {}
    where = {"all": "all evaluated images", "test": "images in the test split"}.get(subset, subset)
    gt_txt = "the lesion box rasterised as [y, y+h) x [x, x+w)" if gt == "box" else "the exact lesion mask"
    if table == "metrics":
        head = ("Protocol: docs/evaluation.md §2 (CheXlocalize: Otsu threshold, hit = arg-max inside the ground "
                "truth) and §3 (relevance mass, rank accuracy, AUPRC), on maps prepared as in §1. ")
    else:
        head = "Protocol: docs/evaluation.md §1 (RAP paper, Table 2). "
    return (
        head + f"Explained output = the logit of the ground truth's finding "
        f"whatever the prediction; map resized to the original image size ({run.get('resize', 'bilinear')}), "
        f"negatives -> 0, divided by its max ({run.get('scaling', 'clip')}); region = h > T; IoU against {gt_txt} "
        f"in original pixel space; a threshold with an empty region scores "
        f"{'0' if run.get('empty_region', 'zero') == 'zero' else 'NaN (excluded)'}. "
        f"Cells: mean [bootstrap 95% CI, 1000 resamples] over regions; n = number of regions. "
        f"Subset: {where}. Model: {arch_text(model.get('arch', '?'))}, checkpoint {checkpoint_text(about, model)}; "
        f"input {model.get('preprocessing', '?')} {model.get('input_size', '?')} px. Data: {films_text(about, ds)}.")


def summarize(df: pd.DataFrame, metrics: Sequence[str], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Long table: one row per (gt, metric, method, finding incl. ``All``): n, mean, ci_low, ci_high."""
    rows = []
    if not len(df):
        return pd.DataFrame(columns=["gt", "metric", "method", "finding", "n", "mean", "ci_low", "ci_high"])
    for (gt, method), g in df.groupby(["gt", "method"], sort=False):
        parts = [(f, gf) for f, gf in g.groupby("finding", sort=True)] + [(ALL, g)]
        for f, gf in parts:
            for m in metrics:
                v = pd.to_numeric(gf[m], errors="coerce").to_numpy(dtype=float)
                mean, lo, hi = bootstrap_mean_ci(v, n_boot=n_boot, seed=seed)
                rows.append({"gt": gt, "metric": m, "method": method, "finding": f,
                             "n": int(np.isfinite(v).sum()), "mean": mean, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)


def _cell(r: Optional[pd.Series]) -> str:
    return "–" if r is None else ci_cell(r["mean"], r["ci_low"], r["ci_high"], int(r["n"]))


def _order(values, preferred: Sequence[str]) -> list:
    vals = list(dict.fromkeys(values))
    return [v for v in preferred if v in vals] + [v for v in vals if v not in preferred]


def _findings(long: pd.DataFrame) -> list[str]:
    return [f for f in _order(long["finding"], list(ABBREV)) if f != ALL] + [ALL]


def table2(long: pd.DataFrame, thresholds: Sequence[float], protocol: str, subset: str, gt: str,
           methods_order: Sequence[str] = ("cam", "lrp", "rap")) -> Table:
    """Table 2's layout: rows (T, method), columns findings (+ All), cells mean [CI]; a last row
    gives the number of regions per finding. ``long``: :func:`summarize` rows of the IoU metrics."""
    findings = _findings(long)
    methods = _order(long["method"], methods_order)
    idx = {(r.metric, r.method, r.finding): r for _, r in long.iterrows()}
    rows = [[f"{t:g}", m.upper()] + [_cell(idx.get((iou_column(t), m, f))) for f in findings]
            for t in thresholds for m in methods]
    first = methods[0] if methods else None
    key0 = iou_column(thresholds[0])
    rows.append(["n", "regions"] + [str(int(idx[(key0, first, f)].n)) if (key0, first, f) in idx else "0"
                                    for f in findings])
    frame = pd.DataFrame(rows, columns=["T", "method"] + [ABBREV.get(f, f) for f in findings])
    return Table(f"table2_{subset}_{gt}", f"Table 2 — mean IoU per finding and method ({subset}, ground truth: {gt})",
                 frame, long, protocol, {"subset": subset, "gt": gt})


def metrics_table(long: pd.DataFrame, protocol: str, subset: str, gt: str,
                  methods_order: Sequence[str] = ("cam", "lrp", "rap")) -> Table:
    """The §2/§3 scores: rows (metric, method) and a count row per metric, columns findings (+ All),
    cells mean [CI]. ``long``: :func:`summarize` rows of :data:`OTHER_METRICS`."""
    findings = _findings(long)
    methods = _order(long["method"], methods_order)
    idx = {(r.metric, r.method, r.finding): r for _, r in long.iterrows()}
    rows, shown = [], []
    for metric in (m for m in OTHER_METRICS if (long["metric"] == m).any()):
        name = METRIC_NAMES.get(metric, metric)
        shown.append(f"{name} = {OTHER_METRICS[metric]}")
        rows += [[name, m.upper()] + [_cell(idx.get((metric, m, f))) for f in findings] for m in methods]
        if methods:
            rows.append([name, "n"] + [str(int(idx[(metric, methods[0], f)].n)) if (metric, methods[0], f) in idx
                                       else "0" for f in findings])
    frame = pd.DataFrame(rows, columns=["metric", "method"] + [ABBREV.get(f, f) for f in findings])
    return Table(f"metrics_{subset}_{gt}", f"Other localisation metrics ({subset}, ground truth: {gt})",
                 frame, long, protocol, {"subset": subset, "gt": gt}, notes="; ".join(shown) + ".")


def subsets_of(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``all`` and, when some rows are in the test split, ``test``."""
    out = {"all": df}
    if "split" in df.columns and (df["split"] == "test").any() and not (df["split"] == "test").all():
        out["test"] = df[df["split"] == "test"]
    return out


def localization_tables(folder: ResultsFolder, n_boot: int = 1000, seed: int = 0) -> list[Table]:
    """Table 2 and the other-metrics table per subset and ground truth, from ``results.csv``."""
    df = folder.require_results("summarise")
    run = folder.run
    ts = thresholds_of(df)
    chosen = run.get("metrics")  # the scores the run computed (evaluate --metrics); all when not recorded
    computed = {c for m in (OPTIONAL_SCORES if chosen is None else chosen) for c in OPTIONAL_SCORES.get(m, ())}
    metrics = [iou_column(t) for t in ts] + [m for m in OTHER_METRICS if m in df.columns and m in computed]
    tables = []
    for subset, sdf in subsets_of(df).items():
        long = summarize(sdf, metrics, n_boot=n_boot, seed=seed)
        for gt in _order(long["gt"], ["box", "mask"]):
            lg = long[long["gt"] == gt]
            iou = lg["metric"].str.startswith("iou@")
            tables.append(table2(lg[iou], ts, protocol_text(run, subset, gt), subset, gt))
            tables.append(metrics_table(lg[~iou], protocol_text(run, subset, gt, "metrics"), subset, gt))
    return tables


def conservation_table(df: pd.DataFrame) -> list[Table]:
    """The distribution of the conservation error |Σ map − explained| / |explained| per method: one
    value per explained map (image, finding; the rows of its regions repeat it), median and max
    over the maps; methods without it (CAM, gradients) are left out. [] when no row has one."""
    if "conservation_error" not in df.columns or not len(df):
        return []
    maps = df.drop_duplicates(subset=["image_id", "method", "finding"])
    rows = []
    for method, g in maps.groupby("method", sort=False):
        v = pd.to_numeric(g["conservation_error"], errors="coerce").to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        if v.size:
            rows.append({"method": method, "n": int(v.size), "median": float(np.median(v)), "max": float(v.max())})
    if not rows:
        return []
    data = pd.DataFrame(rows)
    frame = pd.DataFrame({"method": data["method"].str.upper(), "maps": data["n"],
                          "median": data["median"].map(lambda x: f"{x:.2e}"),
                          "max": data["max"].map(lambda x: f"{x:.2e}")})
    return [Table("conservation", "Conservation error per method",
                  frame, data, "Conservation error = |Σ map − explained logit| / |explained logit| per explained "
                  "map (image × finding) of a propagation method; 0 for an exactly conserving explanation.")]


def summary_tables(results_dir: Path | str | ResultsFolder, n_boot: int = 1000,
                   seed: int = 0) -> list[Table | TableGroup]:
    """Every summary table of a results folder: :func:`localization_tables`, :func:`conservation_table`, then the faithfulness,
    randomisation and intention tables when their files are there (:func:`.analyses.analysis_tables`)."""
    folder = ResultsFolder.of(results_dir)
    return (localization_tables(folder, n_boot, seed) + conservation_table(folder.results)
            + analysis_tables(folder))


def write_summaries(results_dir: Path | str | ResultsFolder, n_boot: int = 1000, seed: int = 0) -> dict[str, Path]:
    """Write every :func:`summary_tables` table as ``tables/<name>.{md,csv,json}`` (``table2_<subset>_<gt>``,
    ``metrics_<subset>_<gt>``, ``chexlocalize``, ``faithfulness``, ``randomization``, ``intention``); returns
    ``{name: path of the Markdown}``."""
    folder = ResultsFolder.of(results_dir)
    return {t.name: t.write(folder.tables_dir)["md"] for t in summary_tables(folder, n_boot, seed)}


def table2_text(results_dir: Path | str, subset: str = "all", gt: str = "box") -> str:
    """The Markdown of Table 2 for ``subset`` / ``gt`` (written by :func:`write_summaries`)."""
    p = Path(results_dir) / TABLES_DIR / f"table2_{subset}_{gt}.md"
    if not p.is_file():
        write_summaries(results_dir)
    if not p.is_file():
        raise CxrExplainError(f"{p}: no such table (subset {subset!r}, ground truth {gt!r} not in the results)")
    return p.read_text(encoding="utf-8")
