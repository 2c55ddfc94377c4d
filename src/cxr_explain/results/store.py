"""The incremental results file (``results.csv``): one CSV row per (image, ground truth, method),
appended as produced; its columns are :mod:`.schema`'s.

Rows are written in groups, one group = all rows of one (image, method) pair, and the file is
flushed and fsync'ed after each batch. On reopening, a partially written last line (a run killed
mid-write) is cut off and any (image, method) group with fewer rows than expected is dropped, so a
rerun redoes exactly the incomplete pairs and the final row set does not depend on interruptions.
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import pandas as pd

from ..errors import CxrExplainError
from .schema import ROW_KEY

def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return repr(v)
    return str(v)


def _cut_partial_line(path: Path) -> int:
    """Truncate ``path`` after its last newline (drop a half-written final line); bytes removed."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as fh:
        block = 1 << 16
        pos = size
        while pos > 0:
            start = max(0, pos - block)
            fh.seek(start)
            chunk = fh.read(pos - start)
            k = chunk.rfind(b"\n")
            if k >= 0:
                keep = start + k + 1
                if keep != size:
                    fh.truncate(keep)
                return size - keep
            pos = start
        fh.truncate(0)
        return size


def read_results(path: Path | str, columns: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Read a results CSV (``image_id`` etc. as strings, scores as floats); a half-written last
    line is ignored. DataError-style message when the header does not match ``columns``."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return pd.DataFrame(columns=list(columns) if columns else [])
    text = p.read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    if not text:
        return pd.DataFrame(columns=list(columns) if columns else [])
    df = pd.read_csv(io.StringIO(text), dtype={"image_id": str, "finding": str, "method": str, "gt": str,
                                               "split": str, "map_file": str, "image_path": str},
                     keep_default_na=False, na_values=["nan", "NaN", ""])
    for c in ("split", "map_file", "image_path"):
        if c in df.columns:
            df[c] = df[c].fillna("")
    if columns is not None and list(df.columns) != list(columns):
        raise CxrExplainError(
            f"{p}: its columns ({', '.join(df.columns[:6])}, ...) differ from this run's "
            "(other thresholds?); evaluate into a new --out folder or delete the file")
    return df


class ResultsWriter:
    """Append-only writer of complete (image, method) groups, resuming an earlier file.

    ``expected[(image_id, method)]`` is the number of rows a complete group has. Opening cuts a
    half-written last line, drops incomplete groups (rewriting the file atomically when needed)
    and records the complete ones in :attr:`done`.
    """

    def __init__(self, path: Path | str, columns: Sequence[str],
                 expected: Optional[Mapping[tuple[str, str], int]] = None, fsync: bool = True):
        self.path = Path(path)
        self.columns = list(columns)
        self.fsync = fsync
        self.done: set[tuple[str, str]] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            _cut_partial_line(self.path)
            df = read_results(self.path, self.columns)
            if len(df):
                self._resume(df, expected)
            elif self.path.stat().st_size == 0:
                self.path.unlink()
        new = not self.path.is_file()
        self._fh = open(self.path, "a", newline="", encoding="utf-8")
        self._w = csv.writer(self._fh, lineterminator="\n")
        if new:
            self._w.writerow(self.columns)
            self.flush()

    def _resume(self, df: pd.DataFrame, expected: Optional[Mapping[tuple[str, str], int]]) -> None:
        df = df.drop_duplicates(subset=ROW_KEY, keep="last")
        counts = df.groupby(["image_id", "method"]).size()
        complete = {k for k, n in counts.items() if expected is None or expected.get(k, -1) == n}
        keep = [(i, m) in complete for i, m in zip(df["image_id"], df["method"])]
        if not all(keep) or len(df) != self.path.read_bytes().count(b"\n") - 1:
            tmp = self.path.with_suffix(".csv.tmp")
            df[keep].to_csv(tmp, index=False, na_rep="nan", lineterminator="\n")
            os.replace(tmp, self.path)
        self.done = complete

    def write_group(self, rows: Iterable[Mapping]) -> None:
        """Append the rows of one (image, method) pair (not flushed: call :meth:`flush`)."""
        rows = list(rows)
        for r in rows:
            self._w.writerow([_fmt(r.get(c)) for c in self.columns])
        if rows:
            self.done.add((str(rows[0]["image_id"]), str(rows[0]["method"])))

    def flush(self) -> None:
        """Flush Python's and the OS's buffers (``fsync``), so a crash loses nothing written."""
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self.flush()
            self._fh.close()

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge_results(out_path: Path | str, parts: Sequence[Path | str], columns: Sequence[str],
                  remove_parts: bool = True) -> pd.DataFrame:
    """Merge ``out_path`` and the per-rank ``parts`` into ``out_path`` (atomic replace), one row per
    :data:`ROW_KEY` (the last one wins), sorted by image, method, finding; parts are deleted."""
    out = Path(out_path)
    frames = [read_results(out, columns)] if out.is_file() else []
    frames += [read_results(p, columns) for p in parts if Path(p).is_file()]
    frames = [f for f in frames if len(f)]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(columns))
    df = df.drop_duplicates(subset=ROW_KEY, keep="last").sort_values(
        ["image_id", "method", "finding", "gt", "gt_index"], kind="stable").reset_index(drop=True)
    tmp = out.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False, na_rep="nan", lineterminator="\n", columns=list(columns))
    os.replace(tmp, out)
    if remove_parts:
        for p in parts:
            if Path(p) != out and Path(p).is_file():
                Path(p).unlink()
    return df


def complete_pairs(path: Path | str, columns: Sequence[str], expected: Mapping[tuple[str, str], int]) -> set:
    """The (image, method) pairs of the results file at ``path`` that have all their
    ``expected[(image_id, method)]`` rows (distinct :data:`~.schema.ROW_KEY`)."""
    df = read_results(path, columns)
    if not len(df):
        return set()
    counts = df.drop_duplicates(subset=ROW_KEY).groupby(["image_id", "method"]).size()
    return {k for k, n in counts.items() if expected.get(k) == n}
