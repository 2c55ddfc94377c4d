"""Faithfulness and sanity of the evaluated methods (docs/evaluation.md §4) on a subset of images.

* Deletion / insertion (pixel flipping; Samek et al. 2017, Petsiuk et al. 2018): patches of
  ``patch`` pixels (default input_size / 14, i.e. 16 px at 224) ordered by summed relevance,
  ``steps`` (default 20) steps, replaced by / copied from a Gaussian-blurred image (sigma 5 px);
  the curve is the explained logit, the score its area on [0, 1]. Lower deletion AUC / higher
  insertion AUC = more faithful.
* Cascading model-parameter randomisation (Adebayo et al. 2018): the layer groups of
  :func:`cascade_layers` re-initialised from the output down; Spearman rank correlation and SSIM of
  |map| with the original |map| after each step.

The explained output is the logit of the image's first ground-truth finding. Defaults keep the
cost small: the first 8 evaluated images (``faithfulness_images``), randomisation on the first 2.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ..attribution import explain
from ..data.images import Preprocessing
from ..metrics.faithfulness import deletion_insertion, randomization_sanity
from ..metrics.localization import bootstrap_mean_ci
from ..results.folder import TABLES_DIR

FAITHFULNESS_NAME = "faithfulness.csv"
RANDOMIZATION_NAME = "randomization.csv"


def cascade_layers(model: nn.Module, min_groups: int = 4) -> list[str]:
    """Module names to re-initialise, output layer first: the root's children that hold
    parameters, the largest one split into its own such children until there are at least
    ``min_groups`` (DenseNet-121: classifier, norm5, denseblock4, transition3, ... conv0)."""
    def kids(name: str, mod: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"{name}.{n}" if name else n, c) for n, c in mod.named_children()
                if any(True for _ in c.parameters())]

    groups = kids("", model)
    while len(groups) < min_groups:
        sizes = [(sum(p.numel() for p in m.parameters()), k) for k, (_, m) in enumerate(groups)]
        for _, k in sorted(sizes, reverse=True):
            sub = kids(*groups[k])
            if len(sub) > 1:
                groups = groups[:k] + sub + groups[k + 1:]
                break
        else:
            break
    return [n for n, _ in reversed(groups)]


def run_faithfulness(model: nn.Module, dataset: Any, out_dir: Path, methods: Sequence[str], indices: Sequence[int],
                     gts: dict, pre: Preprocessing, progress: bool = True, steps: int = 20,
                     patch: int | None = None, n_random: int = 2) -> dict[str, Path]:
    """Deletion / insertion AUCs of ``methods`` on ``indices`` and the randomisation check on the
    first ``n_random`` of them; writes CSVs, tables and a plot into ``out_dir``."""
    from ..data.labels import find_label

    out = Path(out_dir)
    labels = list(model.cxr_spec.labels)
    dev = next(model.parameters()).device
    patch = patch or max(1, pre.size // 14)
    rows, rrows = [], []
    items = list(indices)
    bar = None
    if progress:
        from ..progress import progress_bar

        bar = progress_bar(total=len(items) * len(methods), unit="map", desc="faithfulness")
    layers = cascade_layers(model)
    for j, i in enumerate(items):
        s = dataset.samples[i]
        finding = gts[i][0].finding
        cls = find_label(finding, labels)
        x, _, _ = pre(dataset.read_image(i))
        x = x.to(dev)

        def f(batch: torch.Tensor, cls=cls) -> torch.Tensor:
            return model(batch)[:, cls]

        for m in methods:
            h = explain(model, x[None], method=m, target=cls).maps[0].detach().float().cpu()
            _, d_auc = deletion_insertion(f, x, h, patch=patch, steps=steps, baseline="blur", mode="deletion")
            _, i_auc = deletion_insertion(f, x, h, patch=patch, steps=steps, baseline="blur", mode="insertion")
            rows.append({"image_id": s.image_id, "finding": finding, "method": m,
                         "deletion_auc": d_auc, "insertion_auc": i_auc})
            if j < n_random:
                def efn(mdl: nn.Module, img: torch.Tensor, m=m, cls=cls) -> torch.Tensor:
                    return explain(mdl, img[None], method=m, target=cls).maps[0].detach().float().cpu()

                r = randomization_sanity(efn, model, x, layers)
                r.insert(0, "method", m)
                r.insert(0, "image_id", s.image_id)
                rrows.append(r)
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    fdf = pd.DataFrame(rows)
    rdf = pd.concat(rrows, ignore_index=True) if rrows else pd.DataFrame()
    fdf.to_csv(out / FAITHFULNESS_NAME, index=False, lineterminator="\n")
    rdf.to_csv(out / RANDOMIZATION_NAME, index=False, lineterminator="\n")
    settings = {"steps": steps, "patch": patch, "baseline": "blur (sigma 5 px)", "images": len(items),
                "randomization_images": min(n_random, len(items)), "layers_top_down": layers}
    (out / "faithfulness.json").write_text(json.dumps(settings, indent=1))
    return write_faithfulness_tables(out)


def _ci(v) -> str:
    m, lo, hi = bootstrap_mean_ci(np.asarray(v, dtype=float))
    return "–" if not math.isfinite(m) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def write_faithfulness_tables(out_dir: Path) -> dict[str, Path]:
    """``tables/faithfulness.md`` (AUCs per method), ``tables/randomization.md`` (similarity per
    method and step) and ``figures/randomization.{png,pdf}`` from the CSVs in ``out_dir``."""
    out = Path(out_dir)
    (out / TABLES_DIR).mkdir(exist_ok=True)
    st = json.loads((out / "faithfulness.json").read_text()) if (out / "faithfulness.json").is_file() else {}
    fdf = pd.read_csv(out / FAITHFULNESS_NAME, dtype={"image_id": str})
    prot = (f"Protocol: docs/evaluation.md §4, deletion / insertion (pixel flipping): {st.get('patch', '?')} px "
            f"patches in order of summed relevance, {st.get('steps', '?')} steps, removed pixels replaced by the "
            f"{st.get('baseline', 'blurred image')}; score = area under the explained logit's curve on [0, 1]; "
            f"mean [bootstrap 95% CI] over {st.get('images', '?')} images. Lower deletion / higher insertion = more faithful.")
    lines = ["### Deletion / insertion AUC", "", prot, "", "| method | deletion AUC | insertion AUC | n |", "|---|---|---|---|"]
    for m, g in fdf.groupby("method", sort=False):
        lines.append(f"| {m.upper()} | {_ci(g['deletion_auc'])} | {_ci(g['insertion_auc'])} | {len(g)} |")
    written = {"faithfulness": out / TABLES_DIR / "faithfulness.md"}
    written["faithfulness"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    rp = out / RANDOMIZATION_NAME
    if rp.is_file() and rp.stat().st_size > 1:
        rdf = pd.read_csv(rp, dtype={"image_id": str})
        agg = rdf.groupby(["method", "step", "layer"], sort=False)[["spearman_abs", "ssim_abs"]].mean().reset_index()
        prot = ("Protocol: docs/evaluation.md §4, cascading model-parameter randomisation (Adebayo et al. 2018): "
                "layers re-initialised from the output down, cumulatively; Spearman rank correlation and SSIM between "
                f"|original map| and |map| after each step, mean over {rdf['image_id'].nunique()} image(s). "
                "A map that stays similar explains the image, not the model.")
        lines = ["### Model-parameter randomisation", "", prot, "", "| method | step | randomised down to | Spearman (abs map) | SSIM (abs map) |",
                 "|---|---|---|---|---|"]
        for r in agg.itertuples():
            lines.append(f"| {r.method.upper()} | {r.step} | {r.layer} | {r.spearman_abs:.3f} | {r.ssim_abs:.3f} |")
        written["randomization"] = out / TABLES_DIR / "randomization.md"
        written["randomization"].write_text("\n".join(lines) + "\n", encoding="utf-8")
        _plot_randomization(agg, out / "figures" / "randomization")
    return written


def _plot_randomization(agg: pd.DataFrame, base: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, col, name in zip(axes, ["spearman_abs", "ssim_abs"], ["Spearman rank correlation (|map|)", "SSIM (|map|)"]):
        for m, g in agg.groupby("method", sort=False):
            ax.plot(g["step"], g[col], marker="o", ms=3, label=m.upper())
        layers = list(agg[agg["method"] == agg["method"].iloc[0]]["layer"])
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([l.split(".")[-1] for l in layers], rotation=60, fontsize=6)
        ax.set_ylabel(name, fontsize=8)
        ax.set_ylim(-0.2, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Cascading randomisation, output layer first (docs/evaluation.md §4)", fontsize=9)
    fig.tight_layout()
    base.parent.mkdir(parents=True, exist_ok=True)
    for ext in (".png", ".pdf"):
        fig.savefig(base.with_suffix(ext))
