"""The paper's figures from an evaluation folder: method grids (Fig. 3), image | LRP | RAP tuples
(Figs. 5/6), IoU-vs-threshold curves and the randomisation curves; each written as PNG and PDF.

Heatmaps are read from the float16 maps ``evaluate`` saved (model input resolution), brought back
to the original image with the model's preprocessing (``Preprocessing.to_original``) and shown
with the paper's colours: signed maps (LRP, RAP, gradients) alone in ``seismic`` (red = relevant),
CAM-type maps in ``jet`` blended onto the X-ray; the ground-truth box in red.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from ..attribution.methods import method_class
from ..data.images import get_preprocessing, read_image
from ..data.types import Box
from ..errors import CxrExplainError
from ..results.analyses import RANDOMIZATION_CSV, randomization_summary
from ..results.folder import ResultsFolder
from ..results.schema import iou_column, thresholds_of
from ..results.summary import ABBREV, ALL, subsets_of, summarize
from .overlay import draw_box, figure_grid, overlay

REGION_KEY = ["image_id", "finding", "gt", "gt_index"]


# --------------------------------------------------------------------------- reading
def load_xray_uint8(path: str | Path, size: Optional[int] = None) -> np.ndarray:
    """The X-ray as uint8 (H, W) scaled by its bit depth (``x / (2**bits-1) * 255``), optionally
    resized so that its longer side is ``size``."""
    xr = read_image(path)
    g = np.clip(np.round(xr.pixels / xr.maxval * 255.0), 0, 255).astype(np.uint8)
    if size is not None and max(g.shape) != size:
        s = size / max(g.shape)
        g = np.asarray(Image.fromarray(g).resize((max(1, round(g.shape[1] * s)), max(1, round(g.shape[0] * s))),
                                                 Image.BILINEAR))
    return g


class MapStore:
    """The saved maps of a results folder, brought to original (or display) space with the
    model's preprocessing (from ``run.json``)."""

    def __init__(self, results_dir: str | Path | ResultsFolder):
        self.folder = ResultsFolder.of(results_dir)
        self.dir = self.folder.path
        model = self.folder.run.get("model", {})
        self.pre = get_preprocessing(model.get("preprocessing", "imagenet-rgb"), int(model.get("input_size", 224)))

    def raw(self, map_file: str, finding: str) -> np.ndarray:
        """The saved map (model input resolution, float32) of ``finding``."""
        maps = self.folder.maps(map_file)
        if finding not in maps:
            raise CxrExplainError(f"{self.dir / map_file}: no map for {finding!r}")
        return maps[finding]

    def display(self, row: pd.Series, method: str, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``(map over the display image, display X-ray uint8)`` for one results row."""
        H, W = int(row["height"]), int(row["width"])
        gray = load_xray_uint8(row["image_path"], size)
        h = self.raw(row["map_file"], row["finding"])
        g = self.pre.geometry(H, W)
        if (g.x0, g.y0, g.crop_w, g.crop_h) != (0, 0, W, H):
            h = self.pre.to_original(h, H, W)
        return h, gray


def map_style(method: str) -> dict:
    """How a method's maps are drawn, as the method says: signed maps alone in ``seismic`` (red
    relevant, blue irrelevant), CAM-family maps in ``jet`` blended half onto the X-ray."""
    if method_class(method).signed:
        return {"alpha": 1.0, "symmetric": True, "cmap": None}
    return {"alpha": 0.5, "symmetric": False, "cmap": "jet"}


def tile(store: MapStore, row: pd.Series, method: Optional[str], size: int = 224, box_width: int = 2) -> np.ndarray:
    """One panel: the X-ray (``method=None``) or the method's heatmap, with the region's box in red."""
    H, W = int(row["height"]), int(row["width"])
    box = Box(row["finding"], float(row["box_x"]), float(row["box_y"]), float(row["box_w"]), float(row["box_h"]))
    if method is None:
        gray = load_xray_uint8(row["image_path"], size)
        rgb = np.repeat(gray[..., None], 3, axis=2).copy()
    else:
        h, gray = store.display(row, method, size)
        rgb = overlay(gray, h, **map_style(method))
    if all(math.isfinite(v) for v in (box.x, box.y, box.w, box.h)):
        draw_box(rgb, box.scaled(rgb.shape[1] / W, rgb.shape[0] / H), width=box_width)
    return rgb


# --------------------------------------------------------------------------- selection
def region_table(df: pd.DataFrame, methods: Sequence[str], score: str) -> pd.DataFrame:
    """One row per region present for every method in ``methods``, with each method's row and
    the mean ``score`` over the methods (``_rank``)."""
    sub = df[df["method"].isin(methods)]
    piv = sub.pivot_table(index=REGION_KEY, columns="method", values=score, aggfunc="first")
    piv = piv.dropna(subset=[m for m in methods if m in piv.columns], how="any")
    missing = [m for m in methods if m not in piv.columns]
    if missing:
        raise CxrExplainError(f"the results have no rows for method {missing[0]!r}; evaluate it first")
    out = piv.reset_index()
    out["_rank"] = piv[list(methods)].mean(axis=1).to_numpy()
    return out


def select_regions(df: pd.DataFrame, methods: Sequence[str], n: int = 4, how: str = "best",
                   finding: Optional[str] = None, gt: str = "box", score: Optional[str] = None,
                   seed: int = 0) -> pd.DataFrame:
    """Regions to show: ``how`` = ``best`` / ``worst`` (by the mean over ``methods`` of ``score``,
    default the middle IoU threshold) or ``random``; restricted to ``finding`` and ``gt``."""
    if how not in ("best", "worst", "random"):
        raise CxrExplainError(f"unknown selection {how!r}; use best, worst or random")
    ts = thresholds_of(df)
    score = score or iou_column(ts[len(ts) // 2])
    d = df[df["gt"] == gt]
    if finding is not None:
        d = d[d["finding"] == finding]
    if not len(d):
        return d.iloc[:0]
    reg = region_table(d, methods, score)
    if how == "random":
        reg = reg.sample(n=min(n, len(reg)), random_state=seed)
    else:
        reg = reg.sort_values(["_rank", "image_id"], ascending=[how == "worst", True], kind="stable").head(n)
    return reg[REGION_KEY + ["_rank"]]


def _rows_for(df: pd.DataFrame, key: pd.Series, method: str) -> pd.Series:
    m = df[(df["image_id"] == key["image_id"]) & (df["finding"] == key["finding"]) & (df["gt"] == key["gt"])
           & (df["gt_index"] == key["gt_index"]) & (df["method"] == method)]
    return m.iloc[0]


# --------------------------------------------------------------------------- figures
def _selection(results_dir, df, methods, n, how, finding, gt, seed):
    """(folder, results, evaluated methods, selected regions, map store) for a figure, or an error."""
    folder = ResultsFolder.of(results_dir)
    d = folder.path
    df = folder.results if df is None else df
    methods = [m for m in methods if m in set(df["method"])]
    if not methods:
        raise CxrExplainError(f"{d}: none of the requested methods were evaluated")
    sel = select_regions(df, methods, n, how, finding, gt, seed=seed)
    if not len(sel):
        raise CxrExplainError(f"{d}: no {gt} regions{' of ' + finding if finding else ''} to draw")
    return d, df, methods, sel, MapStore(folder)


def methods_grid(results_dir: str | Path | ResultsFolder, out_path: str | Path, methods: Sequence[str] = ("cam", "lrp", "rap"),
                 n: int = 4, how: str = "best", finding: Optional[str] = None, gt: str = "box",
                 size: int = 224, seed: int = 0, df: Optional[pd.DataFrame] = None) -> list[Path]:
    """Fig. 3: rows of X-ray | CAM | LRP | RAP (``methods``) with the box in red; PNG + PDF."""
    d, df, methods, sel, store = _selection(results_dir, df, methods, n, how, finding, gt, seed)
    ts = thresholds_of(df)
    col = iou_column(ts[len(ts) // 2])
    rows, titles = [], []
    for _, key in sel.iterrows():
        first = _rows_for(df, key, methods[0])
        rows.append([tile(store, first, None, size)] + [tile(store, _rows_for(df, key, m), m, size) for m in methods])
        titles.append(f"{ABBREV.get(key['finding'], key['finding'])} {key['image_id'][:16]}\n"
                      f"mean {col}={key['_rank']:.2f}")
    return figure_grid(rows, ["X-ray"] + [m.upper() for m in methods], out_path, row_titles=titles)


def tuples_figure(results_dir: str | Path | ResultsFolder, out_path: str | Path, methods: Sequence[str] = ("lrp", "rap"),
                  n: int = 4, per_row: int = 2, how: str = "random", finding: Optional[str] = None,
                  gt: str = "box", size: int = 224, seed: int = 0, df: Optional[pd.DataFrame] = None) -> list[Path]:
    """Figs. 5/6: image | LRP | RAP tuples, ``per_row`` tuples side by side; PNG + PDF."""
    d, df, methods, sel, store = _selection(results_dir, df, methods, n, how, finding, gt, seed)
    tuples = []
    for _, key in sel.iterrows():
        first = _rows_for(df, key, methods[0])
        tuples.append([tile(store, first, None, size)] + [tile(store, _rows_for(df, key, m), m, size) for m in methods])
    blank = np.full_like(tuples[0][0], 255)
    rows = []
    for i in range(0, len(tuples), per_row):
        chunk = tuples[i:i + per_row]
        chunk += [[blank] * len(tuples[0])] * (per_row - len(chunk))
        rows.append([p for t in chunk for p in t])
    titles = (["image"] + [m.upper() for m in methods]) * per_row
    return figure_grid(rows, titles, out_path)


def iou_curves(results_dir: str | Path | ResultsFolder, out_path: str | Path, gt: str = "box", subset: str = "all",
               df: Optional[pd.DataFrame] = None, n_boot: int = 1000) -> list[Path]:
    """Mean IoU (bootstrap 95% band) against the threshold T, one panel per finding (+ All), one
    line per method; PNG + PDF."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder = ResultsFolder.of(results_dir)
    d = folder.path
    df = folder.results if df is None else df
    subs = subsets_of(df)
    if subset not in subs:
        raise CxrExplainError(f"{d}: no {subset!r} subset in the results")
    sdf = subs[subset]
    sdf = sdf[sdf["gt"] == gt]
    if not len(sdf):
        raise CxrExplainError(f"{d}: no {gt} rows in the results")
    ts = thresholds_of(df)
    long = summarize(sdf, [iou_column(t) for t in ts], n_boot=n_boot)
    findings = [f for f in ABBREV if f in set(long["finding"])]
    findings += [f for f in dict.fromkeys(long["finding"]) if f not in findings and f != ALL] + [ALL]
    methods = list(dict.fromkeys(sdf["method"]))
    nc = min(3, len(findings))
    nr = math.ceil(len(findings) / nc)
    fig = Figure(figsize=(3.2 * nc, 2.5 * nr), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nr, nc, squeeze=False)
    for k, f in enumerate(findings):
        ax = axes[k // nc][k % nc]
        for m in methods:
            part = long[(long["finding"] == f) & (long["method"] == m)]
            part = part.set_index("metric").reindex([iou_column(t) for t in ts])
            line, = ax.plot(ts, part["mean"], marker="o", ms=3, label=m.upper())
            ax.fill_between(ts, part["ci_low"], part["ci_high"], alpha=0.15, color=line.get_color())
        n = int(long[(long["finding"] == f)]["n"].max()) if (long["finding"] == f).any() else 0
        ax.set_title(f"{f} (n={n})", fontsize=9)
        ax.set_xlabel("threshold T", fontsize=8)
        ax.set_ylabel("mean IoU", fontsize=8)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for k in range(len(findings), nr * nc):
        axes[k // nc][k % nc].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"IoU vs threshold — docs/evaluation.md §1, {subset}, ground truth {gt}", fontsize=10)
    return save_png_and_pdf(fig, out_path)


def randomization_curves(results_dir: str | Path | ResultsFolder, out_path: str | Path) -> list[Path]:
    """Spearman and SSIM of |map| against the cascading randomisation step, one line per method
    (docs/evaluation.md §4), from ``randomization.csv``; PNG + PDF."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder = ResultsFolder.of(results_dir)
    per_image = pd.read_csv(folder.path / RANDOMIZATION_CSV, dtype={"image_id": str})
    if not len(per_image) or "method" not in per_image.columns:
        return []
    agg = randomization_summary(per_image)
    fig = Figure(figsize=(9, 3.4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, col, name in zip(axes, ["spearman_abs", "ssim_abs"], ["Spearman rank correlation (|map|)", "SSIM (|map|)"]):
        for m, g in agg.groupby("method", sort=False):
            ax.plot(g["step"], g[col], marker="o", ms=3, label=m.upper())
        layers = list(agg[agg["method"] == agg["method"].iloc[0]]["layer"])
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([name_.split(".")[-1] for name_ in layers], rotation=60, fontsize=6)
        ax.set_ylabel(name, fontsize=8)
        ax.set_ylim(-0.2, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Cascading randomisation, output layer first (docs/evaluation.md §4)", fontsize=9)
    return save_png_and_pdf(fig, out_path)


def make_figures(results_dir: str | Path | ResultsFolder, methods: Sequence[str] = ("cam", "lrp", "rap"), n: int = 4,
                 seed: int = 0, grids: bool = True) -> dict[str, list[Path]]:
    """All standard figures into ``figures/``: IoU curves per subset and ground truth, the
    randomisation curves (when ``randomization.csv`` is there) and (when maps were saved and
    ``grids``) Fig. 3 grids of the best, worst and random regions and the LRP | RAP tuples."""
    folder = ResultsFolder.of(results_dir)
    df = folder.require_results("draw")
    fd = folder.figures_dir
    out: dict[str, list[Path]] = {}
    for subset, sdf in subsets_of(df).items():
        for gt in dict.fromkeys(sdf["gt"]):
            out[f"iou_curves_{subset}_{gt}"] = iou_curves(folder, fd / f"iou_curves_{subset}_{gt}", gt, subset, df=df)
    rp = folder.path / RANDOMIZATION_CSV
    if rp.is_file() and rp.stat().st_size > 1:
        paths = randomization_curves(folder, fd / "randomization")
        if paths:
            out["randomization"] = paths
    if not grids:
        return out
    have = [m for m in methods if m in set(df["method"])] or list(dict.fromkeys(df["method"]))[:3]
    if (df["map_file"].astype(str) != "").all():
        gt = "box" if (df["gt"] == "box").any() else str(df["gt"].iloc[0])
        for how in ("best", "worst", "random"):
            out[f"fig3_{how}"] = methods_grid(folder, fd / f"fig3_{how}", have, n, how, gt=gt, seed=seed, df=df)
        pair = [m for m in ("lrp", "rap") if m in set(df["method"])] or have[:2]
        out["fig56_tuples"] = tuples_figure(folder, fd / "fig56_tuples", pair, n, gt=gt, seed=seed, df=df)
    return out


def save_png_and_pdf(fig, out_path) -> list[Path]:
    """Lay ``fig`` out and save it as ``out_path`` with .png and .pdf suffixes; returns both paths."""
    fig.tight_layout()
    base = Path(out_path)
    base.parent.mkdir(parents=True, exist_ok=True)
    out = [base.with_suffix(".png"), base.with_suffix(".pdf")]
    for p in out:
        fig.savefig(p)
    return out
