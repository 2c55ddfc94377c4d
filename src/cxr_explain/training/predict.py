"""Scores of a classifier on a dataset, in dataset order, under one or several processes.

:func:`predict` runs a model over a loader of ``(x, y, index)``; :func:`evaluate_auroc` scores a
dataset with the model's own preprocessing and, under ``torchrun``, gathers the ranks' shards
back into dataset order (:func:`merge_shards`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..data.folder import SampleDataset
from ..data.images import get_preprocessing
from ..errors import CxrExplainError
from ..models.zoo import ModelSpec, get_spec
from ..runtime import current_dist, resolve_device

__all__ = ["predict", "evaluate_auroc", "merge_shards"]


def _scores(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Per-class probability: σ(z) for multi-label / single-logit heads, softmax(z) otherwise."""
    logits = logits.float()
    return torch.sigmoid(logits) if multilabel or logits.shape[1] == 1 else torch.softmax(logits, dim=1)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, multilabel: bool = True,
            amp: bool = False, progress: bool = False, desc: str = "predict"
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Run ``model`` over ``loader`` of ``(x, y, index)``: (indices, y_true, scores, mean BCE loss)."""
    model.eval()
    idx_all, y_all, s_all = [], [], []
    loss_sum, n = 0.0, 0
    it = loader
    if progress:
        from ..progress import progress_bar
        it = progress_bar(loader, desc=desc, leave=False)
    for x, y, idx in it:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
            z = model(x)
        z = z.float()
        if z.shape == y.shape:
            loss_sum += float(nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum"))
            n += y.numel()
        idx_all.append(idx.cpu().numpy())
        y_all.append(y.cpu().numpy())
        s_all.append(_scores(z, multilabel).cpu().numpy())
    if not idx_all:
        return np.zeros(0, np.int64), np.zeros((0, 0)), np.zeros((0, 0)), float("nan")
    return (np.concatenate(idx_all), np.concatenate(y_all), np.concatenate(s_all),
            loss_sum / n if n else float("nan"))


def _as_torch_dataset(dataset: Any, spec: ModelSpec) -> Dataset:
    if isinstance(dataset, SampleDataset):
        return dataset.with_preprocessing(get_preprocessing(spec.preprocessing, spec.input_size))
    return dataset


def evaluate_auroc(model: nn.Module, dataset: Any, batch_size: int = 16, device: str | torch.device = "cpu",
                   workers: int = 0, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(y_true N×C, scores N×C) of ``model`` on ``dataset``, rows in dataset order.

    ``dataset`` is a :class:`SampleDataset` (preprocessed with the model's own spec) or a torch
    Dataset of ``(x, y, index)``. Scores are σ(logit) per class (softmax for a two-logit head);
    AUROC only needs their order. Under an initialised process group each rank scores one shard
    and the results are gathered, so every rank returns the full arrays.
    """
    spec = get_spec(model)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CxrExplainError(f"--device {dev} requested but CUDA is not available; use --device cpu")
    ds = _as_torch_dataset(dataset, spec)
    d = current_dist()
    sampler = DistributedSampler(ds, d.world, d.rank, shuffle=False) if d.world > 1 else None
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=workers,
                        pin_memory=dev.type == "cuda")
    model = model.to(dev)
    idx, y, s, _ = predict(model, loader, dev, spec.multilabel, progress=progress and d.main, desc="auroc")
    parts = d.gather((idx, y, s))
    return merge_shards(parts, len(ds))  # type: ignore[arg-type]


def merge_shards(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Put gathered (index, y, score) shards back in dataset order, dropping sampler padding."""
    parts = [p for p in parts if p[0].size]
    if not parts:
        return np.zeros((0, 0)), np.zeros((0, 0))
    idx = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    s = np.concatenate([p[2] for p in parts])
    _, first = np.unique(idx, return_index=True)
    order = first[np.argsort(idx[first])]
    if order.size != n:
        raise CxrExplainError(f"gathered predictions cover {order.size} of {n} images")
    return y[order], s[order]
