"""The CheXlocalize records of an evaluation folder and their table (docs/chexlocalize.md).

:mod:`cxr_explain.evaluation.chexlocalize` writes one record per (image, finding, method) to
:data:`RECORDS_NAME` (columns :data:`RECORD_COLUMNS`) and its table settings to
:data:`SETTINGS_NAME`; :func:`chexlocalize_tables` turns them into mIoU and hit rate per pathology
and method with bootstrap CIs (:func:`~cxr_explain.metrics.chexlocalize.protocol_summary`):
thresholds and cut-offs tuned on the ``val`` split and reported on ``test`` when both are there.
The result is one :class:`~.tables.TableGroup` (one table per reported split, plus the tuned
choices), written as ``tables/chexlocalize.{md,csv,json}`` and shown in the report.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from ..errors import CxrExplainError
from ..metrics.chexlocalize import IOU_MODES, THRESHOLD_GRID, protocol_summary, threshold_column
from .folder import ResultsFolder
from .store import read_results
from .tables import Table, TableGroup, ci_cell

__all__ = ["RECORDS_NAME", "SETTINGS_NAME", "TABLE_NAME", "HUMAN", "RECORD_COLUMNS", "SEGMENTATIONS",
           "CUTOFF_CHOICES", "check_settings", "save_settings", "chexlocalize_tables", "saved_chexlocalize_tables"]

RECORDS_NAME = "chexlocalize_records.csv"
SETTINGS_NAME = "chexlocalize.json"
TABLE_NAME = "chexlocalize"
HUMAN = "human"
RECORD_COLUMNS: list[str] = (
    ["image_id", "finding", "method", "gt", "gt_index", "split", "prob", "logit", "height", "width", "gt_area",
     "hit", "pred_otsu", "inter_otsu"]
    + [threshold_column(t, k) for t in THRESHOLD_GRID for k in ("pred", "inter")]
)
SEGMENTATIONS = ("otsu", "tuned")
CUTOFF_CHOICES = ("none", "tune")
METRICS = (("miou", "mIoU"), ("hit_rate", "hit rate"))


def check_settings(segmentation: str, cutoffs: str, mode: str) -> None:
    """CxrExplainError naming the first unknown option."""
    if segmentation not in SEGMENTATIONS:
        raise CxrExplainError(f"unknown CheXlocalize segmentation {segmentation!r}; use otsu or tuned")
    if cutoffs not in CUTOFF_CHOICES:
        raise CxrExplainError(f"unknown CheXlocalize cut-off choice {cutoffs!r}; use none or tune")
    if mode not in IOU_MODES:
        raise CxrExplainError(f"unknown CheXlocalize IoU mode {mode!r}; use true_positive or full")


def save_settings(out_dir: str | Path, segmentation: str, cutoffs: str, mode: str, n_resamples: int = 1000,
                  seed: int = 0, findings_order: Sequence[str] = ()) -> None:
    """Record the table settings beside the records, so that the report can redraw the table."""
    check_settings(segmentation, cutoffs, mode)
    doc = {"segmentation": segmentation, "cutoffs": cutoffs, "mode": mode, "n_resamples": int(n_resamples),
           "seed": int(seed), "findings_order": list(findings_order)}
    (Path(out_dir) / SETTINGS_NAME).write_text(json.dumps(doc, indent=1))


def _order(values, preferred: Sequence[str]) -> list:
    vals = list(dict.fromkeys(values))
    return [v for v in preferred if v in vals] + [v for v in vals if v not in preferred]


def _cell(r: Optional[dict]) -> str:
    if r is None or not math.isfinite(r["mean"]) or int(r["n"]) <= 0:
        return "–"
    n = int(r["n"])
    return ci_cell(r["mean"], r["ci_low"], r["ci_high"], n) + ("" if n == 1 else f" ({n})")


def _summary_frame(summary: pd.DataFrame, findings_order: Sequence[str],
                   methods_order: Sequence[str] = ("gradcam", "cam", "lrp", "rap")) -> pd.DataFrame:
    """Rows (metric, method), columns pathologies, cells ``mean [95% CI] (n)``."""
    findings = _order(summary["finding"], list(findings_order))
    methods = _order(summary["method"], list(methods_order))
    idx = {(r["metric"], r["method"], r["finding"]): r for r in summary.to_dict("records")}
    rows = [[label, m.upper()] + [_cell(idx.get((metric, m, f))) for f in findings]
            for metric, label in METRICS for m in methods]
    return pd.DataFrame(rows, columns=["metric", "method"] + findings)


def _choices_frame(c: pd.DataFrame) -> pd.DataFrame:
    rows = [[str(r.method).upper(), r.finding, "Otsu" if not np.isfinite(r.threshold) else f"{r.threshold:g}",
             f"{r.cutoff:g}"] for r in c.itertuples(index=False)]
    return pd.DataFrame(rows, columns=["method", "pathology", "threshold", "cut-off"])


def chexlocalize_tables(out_dir: str | Path | ResultsFolder, segmentation: str = "otsu", cutoffs: str = "none",
                        mode: str = "true_positive", n_resamples: int = 1000, seed: int = 0,
                        findings_order: Sequence[str] = ()) -> TableGroup:
    """The CheXlocalize table of the records in ``out_dir``.

    Tuning (``segmentation="tuned"`` or ``cutoffs="tune"``) uses the ``val`` records when there are
    any, else all; the table reports ``test`` when tuned on ``val`` and test records exist, else one
    table per split (all records when no split is known). The human benchmark never gets a cut-off."""
    check_settings(segmentation, cutoffs, mode)
    d = ResultsFolder.of(out_dir).path
    rec = read_results(d / RECORDS_NAME, RECORD_COLUMNS)
    if not len(rec):
        raise CxrExplainError(f"{d / RECORDS_NAME}: no CheXlocalize records; run evaluate with the protocol first")
    splits = [s for s in ("train", "val", "test") if (rec["split"] == s).any()]
    tuning = segmentation == "tuned" or cutoffs == "tune"
    tune_on = "val" if tuning and "val" in splits else None
    report = ["test"] if tune_on == "val" and "test" in splits else (splits or [None])
    tables, longs, chosen = [], [], []
    for ev in report:
        summ, ch = [], []
        for is_human, g in rec.groupby(rec["method"] == HUMAN):
            if ev is not None and not (g["split"] == ev).any():
                continue
            if tune_on is not None and not (g["split"] == tune_on).any():
                t_on = ev  # e.g. the human benchmark exists on test only: nothing to tune, nothing cut
            else:
                t_on = tune_on
            s, c = protocol_summary(g, tune_on=t_on, evaluate_on=ev,
                                    segmentation="otsu" if is_human else segmentation,
                                    cutoffs=None if (is_human or cutoffs == "none") else "tune",
                                    mode=mode, n_resamples=n_resamples, seed=seed)
            summ.append(s)
            ch.append(c)
        if not summ:
            continue
        s, c = pd.concat(summ, ignore_index=True), pd.concat(ch, ignore_index=True)
        where = f"split {ev}" if ev else "all images"
        tuned = "" if not tuning else f"; tuned on {'split ' + tune_on if tune_on else 'the same images (no val split)'}"
        protocol = (f"Segmentation: {'Otsu per map' if segmentation == 'otsu' else 'threshold tuned per pathology'}; "
                    f"probability cut-off: {'tuned per pathology' if cutoffs == 'tune' else 'none'}{tuned}; "
                    f"mIoU over the {'true-positive slice' if mode == 'true_positive' else 'full set'}; hit = the "
                    f"map's arg-max inside the ground truth. Cells: mean [95% percentile-bootstrap CI, "
                    f"{n_resamples} resamples] (n images). Rules: docs/chexlocalize.md.")
        tables.append(Table(TABLE_NAME, f"CheXlocalize protocol — {where}", _summary_frame(s, findings_order), s,
                            protocol, {"subset": ev or "all"}))
        if tuning:
            tables.append(Table(TABLE_NAME, f"CheXlocalize thresholds and cut-offs used for {where}",
                                _choices_frame(c), c, f"Tuned on {'split ' + tune_on if tune_on else 'the same images'}; "
                                "threshold 'Otsu' = Otsu per map."))
        longs.append(s.assign(subset=ev or "all"))
        chosen.append(c.assign(subset=ev or "all"))
    long = pd.concat(longs, ignore_index=True)
    settings = {"segmentation": segmentation, "cutoffs": cutoffs, "mode": mode, "tune_on": tune_on,
                "n_resamples": n_resamples, "seed": seed, "rules": "docs/chexlocalize.md"}
    data = long.assign(**{k: str(v) for k, v in settings.items()})
    doc = {"settings": settings, "choices": json.loads(pd.concat(chosen, ignore_index=True).to_json(orient="records"))}
    return TableGroup(TABLE_NAME, tables, data, doc)


def saved_chexlocalize_tables(folder: ResultsFolder) -> Optional[TableGroup]:
    """:func:`chexlocalize_tables` with the settings saved beside the records; None without records."""
    d = folder.path
    if not (d / RECORDS_NAME).is_file() or not (d / SETTINGS_NAME).is_file():
        return None
    st = json.loads((d / SETTINGS_NAME).read_text())
    return chexlocalize_tables(folder, st["segmentation"], st["cutoffs"], st["mode"], st.get("n_resamples", 1000),
                               st.get("seed", 0), st.get("findings_order", ()))
