"""Summary tables from ``results.csv``: Table 2 in the paper's layout and the other metrics.

Every table states the protocol that produced it (:func:`protocol_text`). Cells are the mean over
ground-truth regions with a percentile-bootstrap 95% CI (1000 resamples, seed 0;
:func:`~cxr_explain.metrics.localization.bootstrap_mean_ci`) and the count. Subsets: ``all``
(every evaluated image) and, when the ``split`` column names a test split, ``test``.
Ground truth: ``box`` (the paper's) and ``mask`` (exact masks, synthetic data) are never mixed.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from ..errors import CxrExplainError
from ..metrics.localization import bootstrap_mean_ci
from .folder import TABLES_DIR, ResultsFolder
from .schema import iou_column, thresholds_of

OTHER_METRICS = {
    "iou_otsu": "IoU at Otsu's threshold (CheXlocalize, §2)",
    "hit": "hit rate / pointing game (CheXlocalize, §2)",
    "mass": "relevance mass accuracy (energy pointing game, §3)",
    "rank_acc": "relevance rank accuracy (§3)",
    "auprc": "AUPRC of the map as a pixel detector (§3)",
}
ABBREV = {"Atelectasis": "Atel", "Cardiomegaly": "Card", "Effusion": "Effu", "Infiltration": "Infi",
          "Mass": "Mass", "Nodule": "Nodu", "Pneumonia": "Pneu", "Pneumothorax": "Ptx"}
ALL = "All"


def protocol_text(run: dict, subset: str, gt: str, table: str = "iou") -> str:
    """One paragraph naming the protocol and every choice behind a table's numbers
    (``table="iou"``: Table 2's IoU at T; ``"metrics"``: the §2/§3 scores)."""
    model = run.get("model", {})
    ds = run.get("dataset", {})
    prov = model.get("provenance", {})
    ckpt = prov.get("path") or prov.get("weights") or prov.get("source") or "?"
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
        f"Subset: {where}. Model: {model.get('arch', '?')} ({ckpt}), input {model.get('preprocessing', '?')} "
        f"{model.get('input_size', '?')} px. Data: {ds.get('type', '?')} {ds.get('root', '')}.")


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


def _cell(r: Optional[pd.Series], ci: bool = True) -> str:
    if r is None or not math.isfinite(r["mean"]):
        return "–"
    s = f"{r['mean']:.3f}"
    if ci and math.isfinite(r["ci_low"]):
        s += f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
    return s


def _order(values, preferred: Sequence[str]) -> list:
    vals = list(dict.fromkeys(values))
    return [v for v in preferred if v in vals] + [v for v in vals if v not in preferred]


def table2_markdown(long: pd.DataFrame, thresholds: Sequence[float], protocol: str,
                    methods_order: Sequence[str] = ("cam", "lrp", "rap")) -> str:
    """Table 2's layout: rows (T, method), columns findings (+ All), cells mean [CI]; a last row
    gives the number of regions per finding."""
    findings = [f for f in _order(long["finding"], list(ABBREV)) if f != ALL] + [ALL]
    methods = _order(long["method"], methods_order)
    idx = {(r.metric, r.method, r.finding): r for _, r in long.iterrows()}
    head = "| T | method | " + " | ".join(ABBREV.get(f, f) for f in findings) + " |"
    lines = [protocol, "", head, "|" + "---|" * (len(findings) + 2)]
    for t in thresholds:
        for m in methods:
            cells = [_cell(idx.get((iou_column(t), m, f))) for f in findings]
            lines.append(f"| {t:g} | {m.upper()} | " + " | ".join(cells) + " |")
    first = methods[0] if methods else None
    counts = [str(int(idx[(iou_column(thresholds[0]), first, f)].n)) if (iou_column(thresholds[0]), first, f) in idx
              else "0" for f in findings]
    lines.append("| n | regions | " + " | ".join(counts) + " |")
    return "\n".join(lines) + "\n"


def metrics_markdown(long: pd.DataFrame, metric: str, protocol: str,
                     methods_order: Sequence[str] = ("cam", "lrp", "rap")) -> str:
    """One metric: rows method, columns findings (+ All), cells mean [CI]; last row the counts."""
    sub = long[long["metric"] == metric]
    findings = [f for f in _order(sub["finding"], list(ABBREV)) if f != ALL] + [ALL]
    methods = _order(sub["method"], methods_order)
    idx = {(r.method, r.finding): r for _, r in sub.iterrows()}
    lines = [f"**{OTHER_METRICS.get(metric, metric)}**", "",
             "| method | " + " | ".join(ABBREV.get(f, f) for f in findings) + " |",
             "|" + "---|" * (len(findings) + 1)]
    for m in methods:
        lines.append(f"| {m.upper()} | " + " | ".join(_cell(idx.get((m, f))) for f in findings) + " |")
    if methods:
        lines.append("| n | " + " | ".join(str(int(idx[(methods[0], f)].n)) if (methods[0], f) in idx else "0"
                                            for f in findings) + " |")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def subsets_of(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``all`` and, when some rows are in the test split, ``test``."""
    out = {"all": df}
    if "split" in df.columns and (df["split"] == "test").any() and not (df["split"] == "test").all():
        out["test"] = df[df["split"] == "test"]
    return out


def write_summaries(results_dir: Path | str | ResultsFolder, n_boot: int = 1000, seed: int = 0) -> dict[str, Path]:
    """Write ``tables/table2_<subset>_<gt>.{md,csv,json}`` and ``tables/metrics_<subset>_<gt>.{md,csv,json}``
    from ``results.csv``; returns ``{name: path}`` of the Markdown files."""
    folder = ResultsFolder.of(results_dir)
    d = folder.path
    df = folder.require_results("summarise")
    run = folder.run
    ts = thresholds_of(df)
    out_dir = d / TABLES_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    metrics = [iou_column(t) for t in ts] + [m for m in OTHER_METRICS if m in df.columns]
    for subset, sdf in subsets_of(df).items():
        long = summarize(sdf, metrics, n_boot=n_boot, seed=seed)
        for gt in _order(long["gt"], ["box", "mask"]):
            lg = long[long["gt"] == gt]
            prot = protocol_text(run, subset, gt)
            name = f"{subset}_{gt}"
            t2 = lg[lg["metric"].str.startswith("iou@")]
            md = f"### Table 2 — mean IoU per finding and method ({subset}, ground truth: {gt})\n\n"
            written[f"table2_{name}"] = _write(out_dir / f"table2_{name}.md", md + table2_markdown(t2, ts, prot))
            _save_long(out_dir / f"table2_{name}", t2, subset, gt, prot)
            om = lg[~lg["metric"].str.startswith("iou@")]
            md = (f"### Other localisation metrics ({subset}, ground truth: {gt})\n\n"
                  f"{protocol_text(run, subset, gt, 'metrics')}\n\n")
            md += "\n".join(metrics_markdown(om, m, "") for m in OTHER_METRICS if (om["metric"] == m).any())
            written[f"metrics_{name}"] = _write(out_dir / f"metrics_{name}.md", md)
            _save_long(out_dir / f"metrics_{name}", om, subset, gt, protocol_text(run, subset, gt, "metrics"))
    return written


def _save_long(base: Path, long: pd.DataFrame, subset: str, gt: str, protocol: str) -> None:
    t = long.copy()
    t.insert(0, "subset", subset)
    t["protocol"] = protocol
    tmp = base.with_suffix(".csv.tmp")
    t.to_csv(tmp, index=False, lineterminator="\n")
    os.replace(tmp, base.with_suffix(".csv"))
    recs = json.loads(long.to_json(orient="records"))
    _write(base.with_suffix(".json"), json.dumps({"protocol": protocol, "subset": subset, "gt": gt,
                                                  "rows": recs}, indent=1))


def table2_text(results_dir: Path | str, subset: str = "all", gt: str = "box") -> str:
    """The Markdown of Table 2 for ``subset`` / ``gt`` (written by :func:`write_summaries`)."""
    p = Path(results_dir) / TABLES_DIR / f"table2_{subset}_{gt}.md"
    if not p.is_file():
        write_summaries(results_dir)
    if not p.is_file():
        raise CxrExplainError(f"{p}: no such table (subset {subset!r}, ground truth {gt!r} not in the results)")
    return p.read_text(encoding="utf-8")
