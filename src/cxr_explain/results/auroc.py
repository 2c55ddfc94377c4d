"""The model's AUROC on the films of an evaluation folder: its files and its table.

:func:`cxr_explain.evaluation.auroc.evaluated_auroc` scores the evaluated films from every
output ``evaluate`` logged for them (``logits.csv``: ``results.csv`` only holds the logits of the
findings each film is boxed for, i.e. positives, which cannot give an AUROC) and writes, through :func:`write_auroc`:

* ``auroc.csv``: one row per finding: auroc, ci_low, ci_high, n_pos, n_neg, note
  (:func:`cxr_explain.metrics.classification.auroc_per_class`);
* ``auroc_scores.csv``: one row per (image, finding): the label (0 / 1, empty = unknown) and the logit;
* ``auroc.json``: the settings (images, bootstrap resamples and seed, the cache key).

:func:`auroc_table` is the report's table of it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from .folder import ResultsFolder
from .tables import Table, ci_cell

__all__ = ["AUROC_NAME", "SCORES_NAME", "SETTINGS_NAME", "write_auroc", "read_auroc", "auroc_settings", "auroc_table"]

AUROC_NAME = "auroc.csv"
SCORES_NAME = "auroc_scores.csv"
SETTINGS_NAME = "auroc.json"


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_auroc(out_dir: str | os.PathLike[str], table: pd.DataFrame, scores: pd.DataFrame,
                settings: dict[str, Any]) -> Path:
    """Write ``auroc.csv`` (``table``), ``auroc_scores.csv`` (``scores``) and ``auroc.json``
    (``settings``) into ``out_dir``, each atomically; returns the path of ``auroc.csv``."""
    d = Path(out_dir)
    _replace(d / SCORES_NAME, scores.to_csv(index=False, lineterminator="\n"))
    _replace(d / SETTINGS_NAME, json.dumps(settings, indent=1))
    _replace(d / AUROC_NAME, table.to_csv(index=False, lineterminator="\n"))
    return d / AUROC_NAME


def auroc_settings(folder: ResultsFolder | str | os.PathLike[str]) -> dict[str, Any]:
    """The settings of the folder's AUROC ({} when there is none or it is unreadable)."""
    p = ResultsFolder.of(folder).path / SETTINGS_NAME
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except ValueError:
        return {}


def read_auroc(folder: ResultsFolder | str | os.PathLike[str]) -> Optional[pd.DataFrame]:
    """``auroc.csv`` of the folder (None when absent)."""
    p = ResultsFolder.of(folder).path / AUROC_NAME
    if not p.is_file():
        return None
    df = pd.read_csv(p, keep_default_na=False, na_values=[""])
    df["note"] = df["note"].fillna("").astype(str)
    return df


def _count(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def auroc_table(folder: ResultsFolder | str | os.PathLike[str]) -> Optional[Table]:
    """One row per finding: AUROC [bootstrap 95% CI] (no interval with a single positive or negative
    film), positives, negatives, note; the last row the unweighted mean over findings with a defined
    AUROC. None when the folder has no ``auroc.csv``."""
    df = read_auroc(folder)
    if df is None:
        return None
    st = auroc_settings(folder)
    rows = []
    for r in df.itertuples(index=False):
        pos, neg = _count(r.n_pos), _count(r.n_neg)
        if min(pos, neg) == 1:  # a bootstrap over one positive (negative) film says nothing
            cell = f"{float(r.auroc):.3f} (n = 1 {'positive' if pos == 1 else 'negative'})"
        else:
            cell = ci_cell(float(r.auroc), float(r.ci_low), float(r.ci_high)) if min(pos, neg) > 0 else "–"
        m = re.fullmatch(r"(\d+) of (\d+) resamples had one class and were skipped", str(r.note))
        note = f"CI over the {int(m.group(2)) - int(m.group(1))} resamples with both classes" if m else str(r.note)
        note = "" if min(pos, neg) == 1 else note
        rows.append([r.finding, cell, pos, neg, note])
    defined = pd.to_numeric(df["auroc"], errors="coerce").dropna()
    if len(defined):
        rows.append([f"mean ({len(defined)} findings)", f"{defined.mean():.3f}", "", "", ""])
    frame = pd.DataFrame(rows, columns=["finding", "AUROC [95% CI]", "positives", "negatives", "note"])
    n_img = st.get("images", "?")
    boot = st.get("n_boot", "?")
    protocol = (f"The model's AUROC per finding on the {n_img} evaluated films (each film's labels against "
                f"the logit of a plain forward pass at the model's input size; unknown labels left out); "
                f"percentile-bootstrap 95% CI over films, {boot} resamples (docs/evaluation.md §5). "
                "The evaluated films are those with a box or mask, so negatives are films boxed for other findings.")
    if not len(defined):
        protocol += " No finding has both positive and negative films here."
    return Table("auroc", "Model AUROC on the evaluated films", frame, df, protocol, {"images": n_img})
