"""What an ``explain`` output folder records, so that a rerun resumes it or refuses to.

Files in the folder (besides the maps and overlays):

* ``run.json`` — the settings that produced the folder: the model (checkpoint file name and SHA-256,
  architecture, labels), dtype, input size, preprocessing, targets, feature layer, and each method's
  options (``Method.settings()``), plus the warnings the run gave about its model.
* ``maps.csv`` — one row per written map: ``image`` (output name), ``file`` (resolved input path),
  ``method``, ``target``, ``explained`` (the explained value), ``conservation_error``, ``map`` and
  ``overlay`` (paths inside the folder). An (image, method) pair is done when its rows are there and
  their files exist; rows are appended per pair, so an interrupted run loses at most one pair.
* ``predictions.csv`` — the model's outputs per image: ``image``, ``file``, ``finding``, ``logit``,
  ``probability`` (sigmoid for multi-label models, softmax otherwise).
* ``failures.csv`` — this run's failures: ``file``, ``stage`` (input, read, explain, write), ``reason``.

A rerun into the folder must use the same settings, method by method: adding a method is fine, the
same method with other options is not; any difference stops the run before any image is read, with
one line naming it. ``overwrite`` removes the folder's recorded outputs first.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from ..errors import CxrExplainError
from ..results.csvlog import FAILURES_COLUMNS, FAILURES_FILE, CsvLog, read_rows

RUN_FILE = "run.json"
MAPS_FILE = "maps.csv"
PREDICTIONS_FILE = "predictions.csv"
RECORD_FORMAT = "cxr-explain explain/1"
#: Settings every map in the folder shares; methods are compared one by one.
SHARED = ("model", "dtype", "size", "preprocessing", "targets", "layer")
MAPS_COLUMNS = ["image", "file", "method", "target", "explained", "conservation_error", "map", "overlay"]
PREDICTIONS_COLUMNS = ["image", "file", "finding", "logit", "probability"]


# --------------------------------------------------------------------------- settings
def _short(v: Any) -> str:
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12]  # a SHA-256
    if isinstance(v, (list, tuple)) and len(v) > 4:
        return f"[{', '.join(map(str, v[:3]))}, … ({len(v)} items)]"
    return repr(v)


def _diff(old: Any, new: Any, where: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in list(dict.fromkeys([*old, *new])):
            out += _diff(old.get(k), new.get(k), f"{where} {k}".strip())
        return out
    return [] if old == new else [f"{where}: {_short(old)} there, {_short(new)} now"]


def settings_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between a folder's recorded settings and this run's: shared settings, and the
    options of methods both name (``"dtype: 'float32' there, 'float64' now"``)."""
    out: list[str] = []
    for k in SHARED:
        out += _diff(old.get(k), new.get(k), k)
    old_m, new_m = old.get("methods", {}) or {}, new.get("methods", {}) or {}
    for m in new_m:
        if m in old_m:
            out += _diff(old_m[m], new_m[m], f"{m} options")
    return out


def read_record(out: Path) -> Optional[dict[str, Any]]:
    """The folder's ``run.json`` (None when there is none); a one-line error if it is not ours."""
    p = Path(out) / RUN_FILE
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, OSError, UnicodeDecodeError):
        raise CxrExplainError(f"{p} is not a readable run record; choose another --out or delete the file") from None
    if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT:
        raise CxrExplainError(f"{out} holds another kind of run ({p.name} is not from `cxr-explain explain`); "
                              "choose another --out")
    return rec


def check_record(out: Path, settings: dict[str, Any], overwrite: bool = False) -> dict[str, Any]:
    """The settings to record for this run: ``settings``, with the methods the folder already
    holds added. Raises a one-line error naming the differences when the folder was made with
    other settings (unless ``overwrite``, which removes the folder's recorded outputs)."""
    out = Path(out)
    old = read_record(out)
    if old is not None and overwrite:
        remove_outputs(out)
        old = None
    if old is None:
        return dict(settings)
    diff = settings_differences(old, settings)
    if diff:
        more = f" (+{len(diff) - 2} more)" if len(diff) > 2 else ""
        random = [d for d in diff if d.startswith("model weights_sha256")]
        hint = " (no --checkpoint: random weights are drawn anew on every run)" if random else ""
        raise CxrExplainError(f"{out} holds outputs made with other settings: {'; '.join(diff[:2])}{more}{hint}; "
                              "rerun with --overwrite to replace them, or choose another --out")
    merged = dict(settings)
    merged["methods"] = {**(old.get("methods") or {}), **(settings.get("methods") or {})}
    return merged


def write_record(out: Path, settings: Mapping[str, Any]) -> Path:
    """Write ``run.json`` atomically (left untouched when it already says the same)."""
    p = Path(out) / RUN_FILE
    text = json.dumps(settings, indent=1, default=str)
    if p.is_file() and p.read_text(encoding="utf-8") == text:
        return p
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
    return p


def remove_outputs(out: Path) -> int:
    """Delete what an earlier run recorded in ``out`` (maps, overlays, the tables, ``run.json``);
    nothing else in the folder is touched. Returns the number of files removed."""
    out = Path(out)
    n = 0
    root = out.resolve()
    for row in read_rows(out / MAPS_FILE, MAPS_COLUMNS):
        for rel in (row["map"], row["overlay"]):
            p = (out / rel).resolve()
            if rel and root in p.parents and p.is_file():
                p.unlink()
                n += 1
    for name in (MAPS_FILE, PREDICTIONS_FILE, FAILURES_FILE, RUN_FILE):
        p = out / name
        if p.is_file():
            p.unlink()
            n += 1
    return n


__all__ = ["CsvLog", "FAILURES_COLUMNS", "FAILURES_FILE", "MAPS_COLUMNS", "MAPS_FILE", "PREDICTIONS_COLUMNS",
           "PREDICTIONS_FILE", "RECORD_FORMAT", "RUN_FILE", "SHARED", "check_record", "read_record", "read_rows",
           "remove_outputs", "settings_differences", "write_record"]
