"""Which reader a dataset folder needs: the one rule every command uses (docs/data_formats.md §1).

``nih``: a ``Data_Entry*.csv`` table (ChestX-ray14, or the synthetic benchmark's NIH layout);
``rsna``: ``stage_2_train_labels.csv`` (RSNA Pneumonia, or the benchmark's RSNA layout);
``chexlocalize``: ``gt_segmentations_*.json`` (also under ``CheXlocalize/``); ``mimic``:
``mimic-cxr-2.0.0-chexpert.csv[.gz]``; ``chexpert``: a train / valid / val_labels / test_labels CSV
with a ``Path`` column (also under ``CheXpert/``); ``folder``: anything else (a folder of images,
labels from an optional CSV).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from ..errors import DataError
from .folder import SampleDataset

__all__ = ["LAYOUTS", "detect_layout", "open_dataset"]

LAYOUTS = ("nih", "rsna", "chexlocalize", "chexpert", "mimic", "folder")


def detect_layout(root: str | os.PathLike[str]) -> str:
    """The layout of ``root`` from its files, in the module's order (first match wins), else
    ``"folder"``; DataError when ``root`` is not a folder."""
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"{r}: dataset folder not found; pass --data with an existing folder")
    if any(r.glob("Data_Entry*.csv")):
        return "nih"
    if (r / "stage_2_train_labels.csv").is_file():
        return "rsna"
    if any(r.glob("gt_segmentations_*.json")) or any(r.glob("CheXlocalize/gt_segmentations_*.json")):
        return "chexlocalize"
    if any(r.glob("mimic-cxr-2.0.0-chexpert.csv*")):
        return "mimic"
    from .chexpert import SPLIT_NAMES, find_label_csv

    for sp in SPLIT_NAMES:
        csv = find_label_csv(r, sp)
        if csv is not None:
            with open(csv, encoding="utf-8-sig") as fh:
                if "Path" in [c.strip() for c in fh.readline().split(",")]:
                    return "chexpert"
    return "folder"


def open_dataset(root: str | os.PathLike[str], layout: str = "auto", *, split: Optional[str] = None,
                 findings: Optional[Sequence[str]] = None, boxed_only: bool = False,
                 labels_csv: Optional[str | os.PathLike[str]] = None, seed: int = 0, val_fraction: float = 0.1,
                 image_size: Optional[int] = 1024, uncertain: str = "ones") -> SampleDataset:
    """The reader for ``layout`` (``auto``: :func:`detect_layout`) at ``root``: ``NIHDataset``,
    ``RSNADataset`` (``boxed_only`` does not apply), ``CheXlocalizeDataset``, ``CheXpertDataset``,
    ``MIMICDataset`` (``uncertain``: how their -1 labels are read) or ``FolderDataset``
    (``labels_csv``; no split file). ``findings`` None = the reader's default label set."""
    layout = detect_layout(root) if layout in (None, "auto") else layout
    if layout == "chexlocalize":
        from .chexlocalize import CheXlocalizeDataset

        return CheXlocalizeDataset(root, split=split, uncertain=uncertain)
    if layout == "chexpert":
        from .chexpert import CheXpertDataset

        return CheXpertDataset(root, split=split, uncertain=uncertain)
    if layout == "mimic":
        from .mimic import MIMICDataset

        return MIMICDataset(root, split=split, uncertain=uncertain)
    if layout == "nih":
        from .nih import NIHDataset

        kw = {"findings": tuple(findings)} if findings is not None else {}
        return NIHDataset(root, split=split, boxed_only=boxed_only, seed=seed, val_fraction=val_fraction,
                          image_size=image_size, **kw)
    if layout == "rsna":
        from .rsna import RSNADataset

        kw = {"findings": tuple(findings)} if findings is not None else {}
        return RSNADataset(root, split=split, seed=seed, val_fraction=val_fraction, image_size=image_size, **kw)
    if layout == "folder":
        from .folder import FolderDataset

        if split is not None:
            raise DataError(f"{root}: a folder of images has no split file; drop split={split!r}")
        return FolderDataset(root, labels_csv=labels_csv, findings=findings)
    raise DataError(f"unknown dataset layout {layout!r}; use one of auto, {', '.join(LAYOUTS)}")
