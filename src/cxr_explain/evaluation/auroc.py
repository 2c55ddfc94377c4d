"""The model's AUROC per finding on the films an evaluation scored (the report header's numbers).

``results.csv`` holds one logit per (film, boxed finding): positives only, from which no AUROC
can be computed honestly. :func:`evaluated_auroc` therefore takes every output of each evaluated
film from ``logits.csv``, which ``evaluate`` logs from its own forward passes
(:mod:`cxr_explain.results.logits`; only rows with these weights' digest count), runs one plain
forward pass over the films it lacks (a folder written by an older version), takes each film's
labels from the dataset, and computes
:func:`~cxr_explain.metrics.classification.auroc_per_class` with bootstrap CIs over films. It runs
after :func:`~.runner.evaluate`, leaving the loop alone, and writes through
:mod:`cxr_explain.results.auroc`. A rerun with the same films and weights reuses the files.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..data.images import get_preprocessing
from ..errors import CxrExplainError
from ..metrics.classification import auroc_per_class
from ..models.checkpoints import weights_sha256
from ..results.auroc import AUROC_NAME, auroc_settings, write_auroc
from ..results.folder import ResultsFolder
from ..results.logits import read_logits
from ..runtime import loader_workers, resolve_device

__all__ = ["evaluated_auroc", "forward_logits"]


def forward_logits(model: nn.Module, dataset: Any, indices: list[int], batch_size: int = 32,
                   device: str = "cpu", workers: Optional[int] = None, progress: bool = False) -> np.ndarray:
    """Logits (N, C) of ``model`` on the dataset's images ``indices`` (the spec's preprocessing)."""
    spec = model.cxr_spec
    pre = get_preprocessing(spec.preprocessing, spec.input_size)
    dev = resolve_device(device)
    dtype = next(model.parameters()).dtype
    loader = DataLoader(Subset(dataset.with_preprocessing(pre), indices), batch_size=max(1, int(batch_size)),
                        shuffle=False,
                        num_workers=loader_workers(workers, -(-len(indices) // max(1, int(batch_size))), dev))
    bar = None
    if progress:
        from ..progress import progress_bar

        bar = progress_bar(total=len(indices), unit="img", desc="AUROC forward")
    model = model.eval().to(dev)
    out = []
    with torch.no_grad():
        for x, _, _ in loader:
            out.append(model(x.to(dev, dtype)).float().cpu().numpy())
            if bar is not None:
                bar.update(len(x))
    if bar is not None:
        bar.close()
    return np.concatenate(out) if out else np.zeros((0, len(spec.labels)), dtype=np.float32)


def evaluated_auroc(model: nn.Module, dataset: Any, out_dir: str | os.PathLike[str], *, batch_size: int = 32,
                    device: str = "cpu", workers: Optional[int] = None, n_boot: int = 1000, seed: int = 0,
                    progress: bool = False) -> Optional[Path]:
    """AUROC per finding of ``model`` on the films of ``out_dir``'s ``results.csv`` (those of
    ``dataset``), for the model outputs the dataset labels; writes ``auroc.csv``,
    ``auroc_scores.csv`` and ``auroc.json`` and returns the first's path. None (nothing written)
    when the dataset labels none of the model's findings. Labels: 1 present, 0 absent, NaN unknown
    (left out of that finding)."""
    folder = ResultsFolder(out_dir)
    df = folder.require_results("score with AUROC")
    spec = getattr(model, "cxr_spec", None)
    if spec is None:
        raise CxrExplainError(f"{type(model).__name__} has no .cxr_spec; load it with load_checkpoint")
    findings = [f for f in spec.labels if f in tuple(dataset.findings)]
    if not findings:
        return None
    ids, indices = [], []
    for iid in dict.fromkeys(df["image_id"].astype(str)):
        try:
            indices.append(dataset.index_of(iid))
        except CxrExplainError:  # a row from another dataset evaluated into the same folder
            continue
        ids.append(iid)
    if not ids:
        raise CxrExplainError(f"{folder.path}: none of the evaluated images is in the dataset given; "
                              "pass the dataset the folder was evaluated on")
    key = hashlib.sha256("\n".join(ids).encode()).hexdigest()
    weights = weights_sha256(model)
    cache = {"ids_sha256": key, "weights_sha256": weights, "preprocessing": spec.preprocessing,
             "input_size": int(spec.input_size), "findings": findings, "n_boot": int(n_boot), "seed": int(seed)}
    old = auroc_settings(folder)
    if (folder.path / AUROC_NAME).is_file() and all(old.get(k) == v for k, v in cache.items()):
        return folder.path / AUROC_NAME
    logged = read_logits(folder.path, spec.labels, weights)  # what evaluate's own forward passes gave
    missing = [k for k, iid in enumerate(ids) if iid not in logged]
    logits = np.zeros((len(ids), len(spec.labels)), dtype=np.float64)
    if missing:
        logits[missing] = forward_logits(model, dataset, [indices[k] for k in missing], batch_size, device,
                                         workers, progress)
    for k, iid in enumerate(ids):
        if iid in logged:
            logits[k] = logged[iid]
    cols = [list(spec.labels).index(f) for f in findings]
    lab = [list(dataset.findings).index(f) for f in findings]
    y = np.stack([np.asarray(dataset.samples[i].labels, dtype=np.float64)[lab] for i in indices])
    s = logits[:, cols].astype(np.float64)
    table = auroc_per_class(y, s, findings, n_boot=n_boot, seed=seed)
    scores = pd.DataFrame({"image_id": np.repeat(ids, len(findings)), "finding": findings * len(ids),
                           "label": y.ravel(), "logit": s.ravel()})
    return write_auroc(folder.path, table, scores, {**cache, "images": len(ids)})
