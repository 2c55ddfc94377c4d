"""What the two ``evaluate`` benchmarks share: their common options, the random-weight checkpoint,
the CLI arguments of the evaluated run, the load average line."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def add_common_arguments(p: argparse.ArgumentParser, n: int, methods: list[str], methods_help: str = "") -> None:
    """The options both benchmarks take (``--n`` and ``--methods`` with the given defaults)."""
    p.add_argument("--cache", required=True, help="folder for the synthetic films, the model and the outputs")
    p.add_argument("--n", type=int, default=n, help="films to evaluate (the first N with a box)")
    p.add_argument("--size", type=int, default=1024, help="film size in pixels (default 1024, NIH's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", default="densenet121")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--checkpoint", default=None, help="a checkpoint instead of random weights")
    p.add_argument("--methods", nargs="+", default=methods, help=methods_help or None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=None,
                   help="evaluate --workers (DataLoader processes; default: evaluate's own default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gen-workers", type=int, default=2, help="processes generating the films")
    p.add_argument("--no-masks", dest="masks", action="store_false", help="boxes only (as NIH)")


def checkpoint(args) -> Path:
    """``--checkpoint``, or a ``--arch`` with random weights (seed 0) at ``--input-size`` and the 14
    NIH labels, saved once into the cache folder (random weights explain and score the same amount
    of data as trained ones)."""
    if args.checkpoint:
        return Path(args.checkpoint)
    import torch

    from cxr_explain.models.checkpoints import save_checkpoint
    from cxr_explain.models.zoo import build_model

    ckpt = Path(args.cache) / f"{args.arch}_{args.input_size}_random.pt"
    if not ckpt.is_file():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        save_checkpoint(ckpt, build_model(args.arch, labels="chexnet", input_size=args.input_size))
    return ckpt


def evaluate_argv(args, data: Path, ckpt: Path, out: Path) -> list[str]:
    """``cxr-explain evaluate`` arguments of the measured run (``--no-report``, no progress bar)."""
    argv = ["evaluate", "--data", str(data), "--checkpoint", str(ckpt), "--methods", *args.methods,
            "--out", str(out), "--batch-size", str(args.batch_size),
            *(["--workers", str(args.workers)] if args.workers is not None else []), "--max-images", str(args.n), "--no-report", "--no-progress", "--threads", str(args.threads)]
    if not args.masks:
        argv.append("--no-masks")
    return argv + list(args.extra)
