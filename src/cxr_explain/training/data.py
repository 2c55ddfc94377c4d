"""What a training run reads: the layout of its folder, a split as a dataset, the benchmark's
generator settings, and the random augmentation of the training images."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import Dataset

from ..data.folder import SampleDataset
from ..data.layout import detect_layout as detect_dataset_layout
from ..data.layout import open_dataset
from ..errors import CxrExplainError
from .config import LAYOUTS, TrainConfig

__all__ = ["detect_layout", "load_split", "phantom_provenance", "FirstN", "Augmented"]


def detect_layout(root: str | os.PathLike[str]) -> str:
    """The layout of a training folder: :func:`cxr_explain.data.layout.detect_layout`, which must
    be one with labels and a split (``nih`` or ``rsna``)."""
    layout = detect_dataset_layout(root)
    if layout not in LAYOUTS:
        raise CxrExplainError(f"{root}: neither Data_Entry_2017*.csv (NIH) nor stage_2_train_labels.csv "
                              "(RSNA) found; pass --layout or point --data at the dataset root")
    return layout


def load_split(root: str | os.PathLike[str], layout: str, split: str, findings: Sequence[str],
               seed: int = 0, val_fraction: float = 0.1) -> SampleDataset:
    """The ``split`` ("train" / "val" / "test") of an NIH- or RSNA-layout dataset at ``root``."""
    if layout not in LAYOUTS:
        raise CxrExplainError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    return open_dataset(root, layout, split=split, findings=findings, image_size=None, seed=seed,
                        val_fraction=val_fraction)


def phantom_provenance(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The generator settings of a synthetic benchmark (its ``phantom.json``), else {}."""
    p = Path(root) / "phantom.json"
    if not p.is_file():
        return {}
    try:
        d = json.loads(p.read_text())
    except ValueError:
        return {}
    return {k: d[k] for k in ("seed", "n", "size", "layout", "shortcut", "generator") if k in d}


class FirstN(Dataset):
    """The first ``n`` items of a dataset (keeps ``(x, y, index)`` with the original index)."""

    def __init__(self, base: Dataset, n: int):
        self.base, self.n = base, min(n, len(base))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.base[i]


class Augmented(Dataset):
    """Random affine (and optional horizontal flip) on the preprocessed tensor of ``base``."""

    def __init__(self, base: Dataset, cfg: TrainConfig):
        from torchvision.transforms import v2

        self.base = base
        ops: list[Any] = []
        if cfg.affine:
            ops.append(v2.RandomAffine(degrees=cfg.rotate, translate=(cfg.translate, cfg.translate),
                                       scale=(1 - cfg.scale, 1 + cfg.scale),
                                       interpolation=v2.InterpolationMode.BILINEAR))
        if cfg.hflip:
            ops.append(v2.RandomHorizontalFlip())
        self.tf = v2.Compose(ops) if ops else None

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y, idx = self.base[i]
        if self.tf is not None:
            x = self.tf(x)
        return x, y, idx
