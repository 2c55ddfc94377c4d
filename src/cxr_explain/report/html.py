"""One self-contained HTML report of an evaluation folder.

``write_report(results_dir)`` reads the folder once (:class:`~cxr_explain.results.ResultsFolder`),
(re)writes the header tables (:func:`~cxr_explain.results.header.header_tables`: what was evaluated
with what, the model's AUROC on those films) and the summary tables
(:func:`~cxr_explain.results.summary.summary_tables`; one writer for CSV, Markdown and HTML) and the
figures, and fills the jinja2 template ``templates/report.html.j2`` with those tables, the figures
and a gallery per finding (one row per lesion: the X-ray with its box, then each method's heatmap
with its scores). Every image is embedded as a base64 PNG; the page makes no external request and
runs no script.
"""
from __future__ import annotations

import base64
import io
import os
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import jinja2
import numpy as np
import pandas as pd
from PIL import Image

from ..results.folder import ResultsFolder
from ..results.header import header_tables
from ..results.schema import iou_column, thresholds_of
from ..results.summary import ABBREV, summary_tables
from .figures import MapStore, make_figures, region_table, tile

__all__ = ["REPORT_NAME", "write_report", "render_report", "png_data_uri"]

REPORT_NAME = "report.html"
TEMPLATE = "report.html.j2"

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1400px;color:#222}
h1{font-size:1.5em} h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
h3{font-size:1.05em} p.protocol{font-size:.85em;color:#444;background:#f6f6f6;padding:.5em;border-left:3px solid #999}
table.t{border-collapse:collapse;font-size:.78em;margin:.4em 0 1em}
table.t th,table.t td{border:1px solid #ccc;padding:2px 5px;text-align:right;white-space:nowrap}
table.t th{background:#eee} table.t td:first-child,table.t td:nth-child(2){text-align:left}
img.fig{max-width:100%;border:1px solid #ddd}
details{margin:.4em 0} summary{cursor:pointer;font-weight:600;font-size:1.02em}
table.g{border-collapse:collapse} table.g td{vertical-align:top;padding:3px;font-size:.72em;text-align:center}
table.g th{font-size:.8em} table.g img{display:block}
.meta{font-size:.85em;color:#555}
table.kv{border-collapse:collapse;font-size:.85em;margin:.4em 0 1em;max-width:1100px}
table.kv thead{display:none} table.kv td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
table.kv td:first-child{font-weight:600;white-space:nowrap;background:#f4f4f4}
"""


def _template() -> jinja2.Template:
    text = (resources.files(__package__) / "templates" / TEMPLATE).read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    return env.from_string(text)


def png_data_uri(rgb: np.ndarray) -> str:
    """``data:image/png;base64,...`` of a uint8 (H, W[, 3]) image."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buf, format="PNG", optimize=False, compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _file_uri(p: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode("ascii")


def _fmt(v: Any) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "–" if not np.isfinite(v) else f"{v:.2f}"


def gallery(folder: ResultsFolder, df: pd.DataFrame, per_finding: int, thumb: int) -> dict:
    """The gallery as data for the template: per finding (``findings``: name, region count, rows)
    one row per region (best and worst by mean IoU at the middle threshold, up to ``per_finding``),
    cells X-ray + one heatmap per method (``src``: PNG data URI, ``lines``: scores); ``empty``
    says why there is none."""
    if not len(df) or (df["map_file"].astype(str) == "").any():
        return {"empty": "No heatmaps were saved (evaluate with save_maps=True), so there is no gallery."}
    store = MapStore(folder)
    ts = thresholds_of(df)
    mid = iou_column(ts[len(ts) // 2])
    methods = list(dict.fromkeys(df["method"]))
    gt = "box" if (df["gt"] == "box").any() else str(df["gt"].iloc[0])
    sub = df[df["gt"] == gt]
    idx = sub.set_index(["image_id", "finding", "gt", "gt_index", "method"]).sort_index()
    note = (f"Ground truth: {gt}. Per finding, the regions with the highest and lowest mean {mid} over the methods "
            f"(up to {per_finding}); under each map: IoU at T = {', '.join(f'{t:g}' for t in ts)} | Otsu IoU | "
            "hit | mass.")
    order = [f for f in ABBREV if f in set(sub["finding"])] + [f for f in dict.fromkeys(sub["finding"]) if f not in ABBREV]
    findings = []
    for f in order:
        reg = region_table(sub[sub["finding"] == f], methods, mid).sort_values(["_rank", "image_id"], ascending=[False, True])
        if len(reg) > per_finding:
            top = per_finding - per_finding // 2
            reg = pd.concat([reg.head(top), reg.tail(per_finding // 2)])
        rows = []
        for _, key in reg.iterrows():
            base = idx.loc[(key["image_id"], f, key["gt"], key["gt_index"])]
            first = base.iloc[0].copy()
            first["image_id"], first["finding"], first["gt"], first["gt_index"] = key["image_id"], f, key["gt"], key["gt_index"]
            cells = [{"src": png_data_uri(tile(store, first, None, thumb)), "alt": f"X-ray {key['image_id']}",
                      "lines": [str(key["image_id"]), f"p={_fmt(first['prob'])} logit={_fmt(first['logit'])}"]}]
            for m in methods:
                r = base.loc[m].copy() if m in base.index else None
                if r is None:
                    cells.append({"src": None, "alt": "", "lines": ["–"]})
                    continue
                if isinstance(r, pd.DataFrame):
                    r = r.iloc[0].copy()
                r["image_id"], r["finding"], r["gt"], r["gt_index"], r["method"] = key["image_id"], f, key["gt"], key["gt_index"], m
                cells.append({"src": png_data_uri(tile(store, r, m, thumb)), "alt": f"{m} {key['image_id']}",
                              "lines": [" ".join(_fmt(r[iou_column(t)]) for t in ts),
                                        f"{_fmt(r['iou_otsu'])} | {_fmt(r['hit'])} | {_fmt(r['mass'])}"]})
            rows.append(cells)
        n = len(sub[(sub["finding"] == f) & (sub["method"] == methods[0])])
        findings.append({"name": f, "n": n, "rows": rows})
    return {"empty": "", "note": note, "methods": methods, "findings": findings}


def render_report(folder: ResultsFolder, tables: list, figures: dict[str, list[Path]], gallery_data: dict,
                  title: Optional[str] = None, header: Optional[list] = None) -> str:
    """The report page: the template filled with the ``header`` tables (what was evaluated, the
    model's AUROC; :func:`~cxr_explain.results.header.header_tables`), ``tables``
    (:class:`~cxr_explain.results.tables.Table`), ``figures`` (``{name: [png, pdf]}``) and
    :func:`gallery` data."""
    header = header_tables(folder) if header is None else header

    def figs(prefix: str) -> list[dict]:
        return [{"name": k, "src": _file_uri(v[0])} for k, v in figures.items() if k.startswith(prefix)]

    def named(prefix: str) -> list:
        return [t for t in tables if t.name.startswith(prefix)]

    extra_pngs = sorted(folder.figures_dir.glob("deletion*.png"))
    return _template().render(
        title=title or "cxr-explain report", heading=title or "cxr-explain evaluation report", css=_CSS,
        header=header,
        table2=named("table2_"), metrics=named("metrics_"), curves=figs("iou_curves"),
        chexlocalize=named("chexlocalize"),
        checks=named("faithfulness") + named("randomization") + named("conservation"),
        check_figures=figs("randomization") + [{"name": p.stem, "src": _file_uri(p)} for p in extra_pngs],
        intention=named("intention"), grids=figs("fig"), gallery=gallery_data)


def write_report(results_dir: str | os.PathLike, gallery_per_finding: int = 6, thumb: int = 176,
                 grids: bool = True, title: Optional[str] = None) -> Path:
    """Write ``report.html`` into ``results_dir`` (tables, IoU curves, Fig. 3 grids when ``grids``,
    faithfulness and intention results when present, gallery) and return its path."""
    folder = ResultsFolder(results_dir)
    df = folder.require_results("report")  # read once, shared by tables, figures and gallery
    tables = summary_tables(folder)
    header = header_tables(folder)
    for t in header + tables:
        t.write(folder.tables_dir)
    figures = make_figures(folder, grids=grids)
    doc = render_report(folder, tables, figures, gallery(folder, df, gallery_per_finding, thumb), title, header)
    out = folder.path / REPORT_NAME
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, out)
    return out
