"""The trainer's command line: ``cxr-explain train`` / ``auroc`` and
``python -m cxr_explain.training {train,auroc}`` (the same options)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..errors import CxrExplainError
from .auroc import add_auroc_arguments, auroc_cli
from .config import add_train_arguments, config_from_args
from .data import detect_layout
from .loop import train

__all__ = ["train_cli", "main"]


def train_cli(args: argparse.Namespace) -> Path:
    """``cxr-explain train``: the :class:`~.config.TrainConfig` of the parsed options, then :func:`~.loop.train`."""
    layout = getattr(args, "layout", None) or detect_layout(args.data)
    path = train(config_from_args(args, layout=layout))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"best checkpoint: {path}")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cxr_explain.training {train,auroc} ...`` (the same arguments as the CLI)."""
    parser = argparse.ArgumentParser(prog="python -m cxr_explain.training")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_train_arguments(sub.add_parser("train", help="train a classifier"))
    add_auroc_arguments(sub.add_parser("auroc", help="Table 1 of a checkpoint on a split"))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = "python -m cxr_explain.training " + " ".join(shlex.quote(a) for a in argv)
    try:
        if args.cmd == "train":
            train_cli(args)
        else:
            auroc_cli(args)
    except CxrExplainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
