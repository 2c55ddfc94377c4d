"""CSV files written a group of rows at a time, and the failures table both batch commands keep.

``failures.csv`` (``explain`` and ``evaluate`` output folders): one row per input that could not be
processed this run: ``file``, ``stage`` (where it failed: ``input``, ``read``, ``explain``,
``score``, ``write``), ``reason`` (one line). It is rewritten by every run, so it lists the
failures of the last one; a rerun retries every failed input.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["CsvLog", "FAILURES_COLUMNS", "FAILURES_FILE", "merge_logs", "read_rows"]

FAILURES_FILE = "failures.csv"
FAILURES_COLUMNS = ["file", "stage", "reason"]


class CsvLog:
    """A CSV file written a group of rows at a time (opened, appended, flushed, closed), so that a
    killed run leaves at most one cut line, which :meth:`rows` skips."""

    def __init__(self, path: Path, columns: Sequence[str], fresh: bool = False):
        self.path = Path(path)
        self.columns = list(columns)
        if fresh or not self.path.is_file() or self.path.stat().st_size == 0:
            self._write("w", [self.columns])

    def _write(self, mode: str, rows: Iterable[Sequence[Any]]) -> None:
        with open(self.path, mode, newline="", encoding="utf-8") as fh:
            csv.writer(fh, lineterminator="\n").writerows(rows)

    def rows(self) -> list[dict[str, str]]:
        return read_rows(self.path, self.columns)

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = [[_cell(r.get(c)) for c in self.columns] for r in rows]
        if rows:
            self._write("a", rows)


def read_rows(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """The complete rows of a :class:`CsvLog` file (a cut last line is skipped; a missing file, or
    one with other columns, has none)."""
    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh)
        if next(reader, None) != list(columns):
            return []
        return [dict(zip(columns, r)) for r in reader if len(r) == len(columns)]


def merge_logs(path: Path, parts: Sequence[Path], columns: Sequence[str]) -> int:
    """Write the rows of the :class:`CsvLog` files ``parts`` (in order) into a fresh ``path`` and
    delete the parts (per-rank logs of a ``torchrun`` run); returns the number of rows."""
    rows = [r for p in parts for r in read_rows(p, columns)]
    CsvLog(path, columns, fresh=True).append(rows)
    for p in parts:
        if Path(p) != Path(path) and Path(p).is_file():
            Path(p).unlink()
    return len(rows)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return " ".join(str(v).split())  # one line per cell
