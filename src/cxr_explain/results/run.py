"""The run record ``run.json``: the settings an evaluation folder was made with.

Written by :func:`cxr_explain.evaluation.evaluate` before the first row; read by the summaries
(protocol paragraphs) and the report (model, preprocessing for the maps, dataset). A rerun into
the same folder must use the same scoring settings (:data:`FIXED`); method options may be added
for new methods but not changed for old ones.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CxrExplainError

__all__ = ["RUN_FILE", "FIXED", "ABOUT", "load_run", "record_run", "record_about"]

RUN_FILE = "run.json"
#: Settings that every row of one results folder shares.
FIXED = ("thresholds", "resize", "empty_region", "scaling", "model", "masks", "versus", "metrics")
#: What a run record written before a setting existed meant by it (every score was computed).
FIXED_DEFAULTS = {"metrics": ["otsu", "hit", "mass", "rank", "auprc"]}
#: Key of the run's description for people (checkpoint file and digest, training data, films, notes):
#: written after the evaluation by :func:`record_about`, never compared on a rerun.
ABOUT = "about"


def load_run(results_dir: Path | str) -> dict:
    """The settings stored in ``run.json`` ({} if absent)."""
    p = Path(results_dir) / RUN_FILE
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except ValueError:
        raise CxrExplainError(f"{p} is not valid JSON; rerun evaluate into a new folder") from None


def record_run(out: Path | str, settings: dict) -> dict:
    """Write ``run.json`` into ``out`` (atomically) and return what was written; on a rerun the
    :data:`FIXED` settings and each earlier method's options must match, and the method lists merge."""
    out = Path(out)
    p = out / RUN_FILE
    if p.is_file():
        try:
            old = json.loads(p.read_text())
        except ValueError:
            raise CxrExplainError(f"{p} is not valid JSON; delete it or evaluate into a new --out folder") from None
        for k in FIXED:
            if old.get(k, FIXED_DEFAULTS.get(k)) != settings.get(k, FIXED_DEFAULTS.get(k)):
                raise CxrExplainError(
                    f"{out} holds results made with another {k} ({old.get(k, FIXED_DEFAULTS.get(k))!r}); "
                    "evaluate into a new --out folder or delete it")
        old_ms, new_ms = old.get("method_settings", {}), settings.get("method_settings", {})
        for m in set(old_ms) & set(new_ms):
            if old_ms[m] != new_ms[m]:
                raise CxrExplainError(
                    f"{out} holds {m} results made with other options ({old_ms[m]!r}, now {new_ms[m]!r}); "
                    "evaluate into a new --out folder or delete it")
        settings["method_settings"] = {**old_ms, **new_ms}
        settings["methods"] = list(dict.fromkeys(list(old.get("methods", [])) + list(settings["methods"])))
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(settings, indent=1))
    os.replace(tmp, p)
    return settings


def record_about(out: Path | str, about: dict) -> dict:
    """Store ``about`` (the description the report header shows: checkpoint, training data, films,
    notes) under :data:`ABOUT` in ``out``'s ``run.json`` (atomically), replacing an earlier one;
    returns the whole record. A CxrExplainError when the folder has no run record yet."""
    out = Path(out)
    run = load_run(out)
    if not run:
        raise CxrExplainError(f"{out / RUN_FILE}: no run record to describe; run evaluate into {out} first")
    run[ABOUT] = dict(about)
    p = out / RUN_FILE
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(run, indent=1))
    os.replace(tmp, p)
    return run
