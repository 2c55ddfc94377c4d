"""Collect the pneumonia trio's results (``scripts/train_pneumonia_trio.sh``) into one Table 1.

Reads every ``WORK/pneu_<arch>_<data>/`` folder: ``test_split/table1.csv`` (test AUROC with bootstrap
95 % CI), ``train_split/table1.csv`` (train-split AUROC: how well the model fits the data it saw, the
tell-tale of a shortcut) and ``history.jsonl`` (best epoch, its validation AUROC, training time).
Prints a Markdown table and writes it to ``--out``.

    python scripts/collect_trio_table.py runs --out runs/table1_trio.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

ARCH_ORDER = ("vgg16", "resnet50", "densenet121")
ARCH_NAMES = {"vgg16": "VGG-16", "resnet50": "ResNet-50", "densenet121": "DenseNet-121"}


def _auroc_row(csv: Path) -> pd.Series | None:
    if not csv.is_file():
        return None
    df = pd.read_csv(csv)
    return df.iloc[0] if len(df) else None


def collect(work: Path) -> str:
    """One row per trained model: arch, data, best epoch, val / train-split / test AUROC (95 % CI)."""
    rows = []
    for run in sorted(work.glob("pneu_*")):
        if not run.is_dir():
            continue
        arch = next((a for a in ARCH_ORDER if run.name.startswith(f"pneu_{a}_")), None)
        if arch is None:
            continue
        data = run.name[len(f"pneu_{arch}_"):]
        hist = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line.strip()] \
            if (run / "history.jsonl").is_file() else []
        best = max(hist, key=lambda r: r.get("mean_val_auroc") or -1.0) if hist else None
        test, train = _auroc_row(run / "test_split" / "table1.csv"), _auroc_row(run / "train_split" / "table1.csv")
        rows.append({
            "order": (ARCH_ORDER.index(arch), data.endswith("_marker")),
            "model": ARCH_NAMES[arch],
            "data": "marker shortcut" if data.endswith("_marker") else "clean",
            "epochs": f"{best['epoch']} of {len(hist)}" if best else "n/a",
            "val": f"{best['mean_val_auroc']:.3f}" if best else "n/a",
            "train": f"{train['auroc']:.3f}" if train is not None else "n/a",
            "test": (f"**{test['auroc']:.3f}** ({test['ci_low']:.3f}–{test['ci_high']:.3f})"
                     if test is not None else "n/a"),
            "n": f"{int(test['n_pos'])} / {int(test['n_neg'])}" if test is not None else "n/a",
            "minutes": f"{sum(r.get('seconds', 0) for r in hist) / 60:.1f}" if hist else "n/a",
        })
    rows.sort(key=lambda r: r["order"])
    lines = ["| model | training data | best epoch | val AUROC | train-split AUROC | test AUROC (95 % CI) "
             "| test pos / neg | training min |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['data']} | {r['epochs']} | {r['val']} | {r['train']} | {r['test']} "
              f"| {r['n']} | {r['minutes']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path, help="folder holding the pneu_<arch>_<data> runs")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    table = collect(args.work)
    print(table, end="")
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
