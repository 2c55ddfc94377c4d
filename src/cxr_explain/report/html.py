"""One self-contained HTML report of an evaluation folder.

``write_report(results_dir)`` (re)writes the summary tables and figures and puts them, with a
gallery per finding (one row per lesion: the X-ray with its box, then each method's heatmap with
its scores), into ``report.html``. Every image is embedded as a base64 PNG; the page makes no
external request and runs no script.
"""
from __future__ import annotations

import base64
import html
import io
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from ..results.folder import TABLES_DIR, ResultsFolder
from ..results.schema import iou_column, thresholds_of
from ..results.summary import ABBREV, write_summaries
from .figures import MapStore, make_figures, region_table, tile

REPORT_NAME = "report.html"

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
"""


def png_data_uri(rgb: np.ndarray) -> str:
    """``data:image/png;base64,...`` of a uint8 (H, W[, 3]) image."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buf, format="PNG", optimize=False, compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _file_uri(p: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode("ascii")


def markdown_to_html(md: str) -> str:
    """The Markdown our tables are written in (paragraphs, ``###`` / ``**`` headings, pipe tables)
    as HTML; text is escaped."""
    out, table = [], []

    def flush():
        if not table:
            return
        rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in table
                if not re.fullmatch(r"\|?(\s*-+\s*\|)+\s*-*\s*", ln.strip())]
        h = "<table class='t'><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) + "</tr></thead><tbody>"
        for r in rows[1:]:
            h += "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
        out.append(h + "</tbody></table>")
        table.clear()

    for ln in md.splitlines():
        if ln.strip().startswith("|"):
            table.append(ln)
            continue
        flush()
        s = ln.strip()
        if not s:
            continue
        if s.startswith("###"):
            out.append(f"<h3>{html.escape(s.lstrip('#').strip())}</h3>")
        elif s.startswith("**") and s.endswith("**"):
            out.append(f"<h4>{html.escape(s.strip('*'))}</h4>")
        elif s.startswith("Protocol"):
            out.append(f"<p class='protocol'>{html.escape(s)}</p>")
        else:
            out.append(f"<p>{html.escape(s)}</p>")
    flush()
    return "\n".join(out)


def _section_tables(d: Path, names: Sequence[str]) -> str:
    parts = []
    for n in names:
        p = d / TABLES_DIR / f"{n}.md"
        if p.is_file():
            parts.append(markdown_to_html(p.read_text(encoding="utf-8")))
    return "\n".join(parts)


def _fmt(v) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return html.escape(str(v))
    return "–" if not np.isfinite(v) else f"{v:.2f}"


def _gallery(folder: ResultsFolder, df: pd.DataFrame, per_finding: int, thumb: int) -> str:
    """Per finding a collapsible table: one row per region (best and worst by mean IoU at the
    middle threshold, up to ``per_finding``), columns X-ray + one heatmap per method with scores."""
    if not len(df) or (df["map_file"].astype(str) == "").any():
        return "<p>No heatmaps were saved (evaluate with save_maps=True), so there is no gallery.</p>"
    store = MapStore(folder)
    ts = thresholds_of(df)
    mid = iou_column(ts[len(ts) // 2])
    methods = list(dict.fromkeys(df["method"]))
    gt = "box" if (df["gt"] == "box").any() else str(df["gt"].iloc[0])
    sub = df[df["gt"] == gt]
    idx = sub.set_index(["image_id", "finding", "gt", "gt_index", "method"]).sort_index()
    parts = [f"<p class='meta'>Ground truth: {gt}. Per finding, the regions with the highest and lowest mean "
             f"{mid} over the methods (up to {per_finding}); under each map: IoU at "
             f"T = {', '.join(f'{t:g}' for t in ts)} | Otsu IoU | hit | mass.</p>"]
    order = [f for f in ABBREV if f in set(sub["finding"])] + [f for f in dict.fromkeys(sub["finding"]) if f not in ABBREV]
    for k, f in enumerate(order):
        reg = region_table(sub[sub["finding"] == f], methods, mid).sort_values(["_rank", "image_id"], ascending=[False, True])
        if len(reg) > per_finding:
            top = per_finding - per_finding // 2
            reg = pd.concat([reg.head(top), reg.tail(per_finding // 2)])
        rows = []
        for _, key in reg.iterrows():
            base = idx.loc[(key["image_id"], f, key["gt"], key["gt_index"])]
            first = base.iloc[0].copy()
            first["image_id"], first["finding"], first["gt"], first["gt_index"] = key["image_id"], f, key["gt"], key["gt_index"]
            cells = [f"<td><img alt='X-ray {html.escape(key['image_id'])}' src='{png_data_uri(tile(store, first, None, thumb))}'>"
                     f"{html.escape(str(key['image_id']))}<br>p={_fmt(first['prob'])} logit={_fmt(first['logit'])}</td>"]
            for m in methods:
                r = base.loc[m].copy() if m in base.index else None
                if r is None:
                    cells.append("<td>–</td>")
                    continue
                if isinstance(r, pd.DataFrame):
                    r = r.iloc[0].copy()
                r["image_id"], r["finding"], r["gt"], r["gt_index"], r["method"] = key["image_id"], f, key["gt"], key["gt_index"], m
                sc = " ".join(_fmt(r[iou_column(t)]) for t in ts)
                cells.append(f"<td><img alt='{m} {html.escape(key['image_id'])}' src='{png_data_uri(tile(store, r, m, thumb))}'>"
                             f"{sc}<br>{_fmt(r['iou_otsu'])} | {_fmt(r['hit'])} | {_fmt(r['mass'])}</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
        n = len(sub[(sub["finding"] == f) & (sub["method"] == methods[0])])
        head = "<tr><th>X-ray</th>" + "".join(f"<th>{html.escape(m.upper())}</th>" for m in methods) + "</tr>"
        parts.append(f"<details{' open' if k == 0 else ''}><summary>{html.escape(f)} ({n} regions)</summary>"
                     f"<table class='g'>{head}{''.join(rows)}</table></details>")
    return "\n".join(parts)


def write_report(results_dir: str | os.PathLike, gallery_per_finding: int = 6, thumb: int = 176,
                 grids: bool = True, title: Optional[str] = None) -> Path:
    """Write ``report.html`` into ``results_dir`` (tables, IoU curves, Fig. 3 grids when ``grids``,
    faithfulness and intention results when present, gallery) and return its path."""
    folder = ResultsFolder(results_dir)
    d = folder.path
    df = folder.require_results("report")  # read once, shared by tables, figures and gallery
    run = folder.run
    write_summaries(folder)
    figs = make_figures(folder, grids=grids)
    model = run.get("model", {})
    ds = run.get("dataset", {})
    n_img = df["image_id"].nunique()
    parts = [f"<h1>{html.escape(title or 'cxr-explain evaluation report')}</h1>",
             f"<p class='meta'>Model: {html.escape(str(model.get('arch', '?')))} "
             f"({html.escape(str(model.get('provenance', {})))}), labels {html.escape(', '.join(model.get('labels', [])))}; "
             f"input {html.escape(str(model.get('preprocessing', '?')))} {model.get('input_size', '?')} px.<br>"
             f"Data: {html.escape(str(ds.get('type', '?')))} {html.escape(str(ds.get('root', '')))}; "
             f"{n_img} images, {len(df)} result rows, methods {html.escape(', '.join(dict.fromkeys(df['method'])))}.</p>"]
    names = sorted(p.stem for p in (d / TABLES_DIR).glob("table2_*.md"))
    parts.append("<h2>Table 2: mean IoU per finding and method</h2>")
    parts.append(_section_tables(d, names))
    parts.append("<h2>IoU against the threshold</h2>")
    for k, paths in figs.items():
        if k.startswith("iou_curves"):
            parts.append(f"<p><img class='fig' alt='{k}' src='{_file_uri(paths[0])}'></p>")
    parts.append("<h2>Other localisation metrics</h2>")
    parts.append(_section_tables(d, sorted(p.stem for p in (d / TABLES_DIR).glob("metrics_*.md"))))
    cxl = sorted(p.stem for p in (d / TABLES_DIR).glob("chexlocalize*.md"))
    if cxl:
        parts.append("<h2>CheXlocalize protocol: mIoU and hit rate per pathology</h2>")
        parts.append(_section_tables(d, cxl))
    extra = sorted(p.stem for p in (d / TABLES_DIR).glob("faithfulness*.md")) + \
        sorted(p.stem for p in (d / TABLES_DIR).glob("randomization*.md"))
    if extra:
        parts.append("<h2>Faithfulness and sanity (docs/evaluation.md §4)</h2>")
        parts.append(_section_tables(d, extra))
        for png in sorted((folder.figures_dir).glob("randomization*.png")) + sorted((folder.figures_dir).glob("deletion*.png")):
            parts.append(f"<p><img class='fig' alt='{png.stem}' src='{_file_uri(png)}'></p>")
    intent = sorted(p.stem for p in (d / TABLES_DIR).glob("intention*.md"))
    if intent:
        parts.append("<h2>Where does the relevance go? (docs/evaluation.md §6)</h2>")
        parts.append(_section_tables(d, intent))
    grid_figs = [(k, v) for k, v in figs.items() if k.startswith("fig")]
    if grid_figs:
        parts.append("<h2>Figures (paper Figs. 3, 5, 6)</h2>")
        for k, paths in grid_figs:
            parts.append(f"<h3>{html.escape(k)}</h3><p><img class='fig' alt='{k}' src='{_file_uri(paths[0])}'></p>")
    parts.append("<h2>Gallery per finding and method</h2>")
    parts.append(_gallery(folder, df, gallery_per_finding, thumb))
    doc = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
           f"<title>{html.escape(title or 'cxr-explain report')}</title><style>{_CSS}</style></head><body>"
           + "\n".join(parts) + "</body></html>\n")
    out = d / REPORT_NAME
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, out)
    return out
