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
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
import torch.nn as nn

from ..attribution import explain
from ..data.images import Preprocessing
from ..metrics.faithfulness import deletion_insertion, randomization_sanity
from ..results.analyses import (FAITHFULNESS_CSV, FAITHFULNESS_SETTINGS, RANDOMIZATION_CSV, faithfulness_table,
                                randomization_table)
from ..results.folder import TABLES_DIR



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
    first ``n_random`` of them; writes the per-image CSVs, the settings and their tables into
    ``out_dir`` (the randomisation plot is the report's); returns ``{table name: Markdown path}``."""
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
    fdf.to_csv(out / FAITHFULNESS_CSV, index=False, lineterminator="\n")
    rdf.to_csv(out / RANDOMIZATION_CSV, index=False, lineterminator="\n")
    settings = {"steps": steps, "patch": patch, "baseline": "blur (sigma 5 px)", "images": len(items),
                "randomization_images": min(n_random, len(items)), "layers_top_down": layers}
    (out / FAITHFULNESS_SETTINGS).write_text(json.dumps(settings, indent=1))
    tables = [faithfulness_table(fdf, settings)] + ([randomization_table(rdf)] if len(rdf) else [])
    return {t.name: t.write(out / TABLES_DIR)["md"] for t in tables}
