"""Summary tables as data, and the one writer that renders them.

A :class:`Table` is two pandas frames: ``frame``, what is shown (one string cell per row and
column: ``mean [CI]``, counts), and ``data``, the numbers behind it (one row per statistic). The
writer renders ``frame`` to Markdown (:meth:`Table.to_markdown`) and HTML (:meth:`Table.to_html`,
a jinja2 template, text escaped) and saves ``data`` to CSV and JSON (:meth:`Table.write`), so
every output of a table comes from the same frames and nothing is parsed back from Markdown.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import jinja2
import pandas as pd

__all__ = ["Table", "TableGroup", "ci_cell"]

_HTML = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string(
    """<h3>{{ t.title }}</h3>
{% if t.protocol %}<p class='protocol'>{{ t.protocol }}</p>
{% endif %}<table class='{{ t.html_class }}'><thead><tr>{% for c in t.frame.columns %}<th>{{ c }}</th>{% endfor %}</tr></thead><tbody>
{% for row in t.frame.itertuples(index=False) %}<tr>{% for v in row %}<td>{{ v }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
{% if t.notes %}<p class='meta'>{{ t.notes }}</p>
{% endif %}""")


def ci_cell(mean: float, low: float = math.nan, high: float = math.nan, n: Optional[int] = None) -> str:
    """One table cell: ``0.123 [0.100, 0.150]``; ``0.123`` without a finite interval; ``–`` without a
    finite mean or with ``n = 0``; ``0.123 (n = 1)`` for a single value, whose bootstrap "interval"
    ``[v, v]`` says nothing about its uncertainty. ``n``: the values behind the mean, when known."""
    if (n is not None and int(n) <= 0) or mean is None or not math.isfinite(mean):
        return "–"
    s = f"{mean:.3f}"
    if n is not None and int(n) == 1:
        return s + " (n = 1)"
    if low is not None and math.isfinite(low):
        s += f" [{low:.3f}, {high:.3f}]"
    return s


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


@dataclass
class Table:
    """One summary table: ``name`` (file stem under ``tables/``), ``title``, the ``protocol``
    paragraph behind its numbers, the display ``frame``, the numbers ``data``, ``meta`` (extra
    keys of the JSON and leading columns of the CSV, e.g. subset and ground truth), ``notes``
    (one line under the table) and ``html_class`` (the HTML table's class: ``t`` for a results
    table, ``kv`` for a two-column item / value list)."""

    name: str
    title: str
    frame: pd.DataFrame
    data: pd.DataFrame
    protocol: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    html_class: str = "t"

    def to_markdown(self) -> str:
        """``### title``, the protocol paragraph, the pipe table of ``frame``, the notes."""
        cols = [str(c) for c in self.frame.columns]
        lines = [f"### {self.title}", ""]
        if self.protocol:
            lines += [self.protocol, ""]
        lines.append("| " + " | ".join(_md_cell(c) for c in cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for row in self.frame.itertuples(index=False):
            lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
        if self.notes:
            lines += ["", self.notes]
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        """The same title, protocol, table and notes as HTML (``<table class='t'>`` or :attr:`html_class`,
        text escaped)."""
        return _HTML.render(t=self)

    def csv_frame(self) -> pd.DataFrame:
        """``data`` with the ``meta`` values it lacks as leading columns and the protocol as the last."""
        out = self.data.copy()
        for k, (key, v) in enumerate((k, v) for k, v in self.meta.items() if k not in out.columns):
            out.insert(k, key, v)
        if self.protocol:
            out["protocol"] = self.protocol
        return out

    def write(self, folder: str | os.PathLike[str]) -> dict[str, Path]:
        """Write ``<name>.md``, ``<name>.csv`` (:meth:`csv_frame`) and ``<name>.json`` (protocol, meta,
        ``data`` as records) into ``folder``, each atomically; returns the paths by suffix."""
        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        base = d / self.name
        paths = {"md": base.with_suffix(".md"), "csv": base.with_suffix(".csv"), "json": base.with_suffix(".json")}
        _replace(paths["md"], lambda p: p.write_text(self.to_markdown(), encoding="utf-8"))
        _replace(paths["csv"], lambda p: self.csv_frame().to_csv(p, index=False, lineterminator="\n"))
        rows = json.loads(self.data.to_json(orient="records"))
        doc = {"title": self.title, "protocol": self.protocol, **self.meta, "rows": rows}
        _replace(paths["json"], lambda p: p.write_text(json.dumps(doc, indent=1), encoding="utf-8"))
        return paths


@dataclass
class TableGroup:
    """Several :class:`Table` s kept as one file set ``<name>.{md,csv,json}`` (e.g. one table per
    split and the tuned thresholds): Markdown and HTML are the tables' own renderings in order, the
    CSV is ``data`` and the JSON ``doc`` plus ``data`` as ``rows``."""

    name: str
    tables: list[Table]
    data: pd.DataFrame
    doc: dict[str, Any] = field(default_factory=dict)

    def to_markdown(self) -> str:
        return "\n".join(t.to_markdown() for t in self.tables)

    def to_html(self) -> str:
        return "\n".join(t.to_html() for t in self.tables)

    def write(self, folder: str | os.PathLike[str]) -> dict[str, Path]:
        """Write ``<name>.md``, ``<name>.csv`` and ``<name>.json`` into ``folder``, each atomically."""
        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        base = d / self.name
        paths = {"md": base.with_suffix(".md"), "csv": base.with_suffix(".csv"), "json": base.with_suffix(".json")}
        _replace(paths["md"], lambda p: p.write_text(self.to_markdown(), encoding="utf-8"))
        _replace(paths["csv"], lambda p: self.data.to_csv(p, index=False, lineterminator="\n"))
        doc = {**self.doc, "rows": json.loads(self.data.to_json(orient="records"))}
        _replace(paths["json"], lambda p: p.write_text(json.dumps(doc, indent=1), encoding="utf-8"))
        return paths


def _replace(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
