"""Table 1: the AUROC per finding of a checkpoint on a dataset split (``cxr-explain auroc``)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ..data.labels import CHEXNET_FINDINGS, RSNA_FINDINGS
from ..errors import CheckpointError, CxrExplainError
from ..metrics.classification import auroc_per_class, format_table1
from ..models.checkpoints import file_sha256, load_checkpoint
from ..models.zoo import label_index
from ..runtime import resolve_device
from .config import LAYOUTS
from .data import detect_layout, load_split
from .predict import evaluate_auroc

__all__ = ["add_auroc_arguments", "auroc_cli", "checkpoint_identity"]


def add_auroc_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``cxr-explain auroc`` (read back by :func:`auroc_cli`)."""
    p.add_argument("--data", required=True, help="dataset folder (NIH or RSNA layout)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint load_checkpoint understands")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"))
    p.add_argument("--layout", choices=LAYOUTS, default=None, help="default: detected from the files")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% CI (0 = none)")
    p.add_argument("--trust-pickle", action="store_true", help="allow pickled checkpoints (jrzech, xrv objects)")
    p.add_argument("--out", default=None, help="also write table1.md / table1.csv into this folder")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    return p


def checkpoint_identity(path: str | os.PathLike[str]) -> str:
    """``name.pt (sha256 1a2b3c4d5e6f)``: the file name and the first 12 hex digits of its SHA-256."""
    return f"{Path(path).name} (sha256 {file_sha256(path)[:12]})"


def auroc_cli(args: argparse.Namespace) -> str:
    """``cxr-explain auroc``: Table 1 (AUROC per finding, bootstrap 95% CI) of a checkpoint on a split.

    Findings evaluated: the model's outputs that the dataset labels (e.g. Pneumonia for RSNA);
    the checkpoint (file name + SHA-256 prefix) and split are named on every row. Returns the table.
    """
    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        raise CheckpointError(f"{ckpt}: checkpoint not found; pass --checkpoint with a .pt/.pth file")
    layout = getattr(args, "layout", None) or detect_layout(args.data)
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))
    model, spec, report = load_checkpoint(ckpt, trust_pickle=bool(getattr(args, "trust_pickle", False)))
    known = CHEXNET_FINDINGS if layout == "nih" else RSNA_FINDINGS
    names = [lab for lab in spec.labels if lab in known]
    if layout == "rsna" and not names:
        names = [lab for lab in spec.labels if lab.lower() in ("lung opacity", "lung_opacity")][:1]
    if not names:
        raise CxrExplainError(f"{ckpt}: none of the model's outputs ({', '.join(spec.labels[:5])}) is a "
                              f"{layout} finding; pass a checkpoint trained for this dataset")
    split = str(getattr(args, "split", "test"))
    ds = load_split(args.data, layout, None if split == "all" else split, names,  # type: ignore[arg-type]
                    int(getattr(args, "data_seed", 0) or 0))
    if len(ds) == 0:
        raise CxrExplainError(f"{args.data}: the {split} split is empty; choose another --split")
    device = resolve_device(str(getattr(args, "device", "cpu") or "cpu"))
    y, s = evaluate_auroc(model, ds, int(getattr(args, "batch_size", 32) or 32), device,
                          int(getattr(args, "workers", 0) or 0))
    cols = [label_index(spec, n) for n in names]
    df = auroc_per_class(y, s[:, cols], names, n_boot=int(getattr(args, "n_boot", 1000)))
    ident = checkpoint_identity(ckpt)
    split_name = f"{split} ({len(ds)} images, {Path(args.data).name})"
    table = format_table1(df, ident, split_name)
    print(report.summary().splitlines()[0])
    print(table, end="")
    out = getattr(args, "out", None)
    if out:
        o = Path(out)
        o.mkdir(parents=True, exist_ok=True)
        (o / "table1.md").write_text(table)
        df.assign(checkpoint=ident, split=split_name).to_csv(o / "table1.csv", index=False)
    return table
