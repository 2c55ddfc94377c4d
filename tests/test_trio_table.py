"""scripts/collect_trio_table.py: one Table 1 row per trained model, in the paper's order."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import pandas as pd

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "collect_trio_table.py"


def _run(work: Path, arch: str, data: str, test_auc: float | None, epochs: int = 3) -> None:
    run = work / f"pneu_{arch}_{data}"
    run.mkdir(parents=True)
    hist = [{"epoch": e + 1, "mean_val_auroc": 0.5 + 0.1 * e, "seconds": 30.0} for e in range(epochs)]
    (run / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist))
    cols = ["finding", "auroc", "ci_low", "ci_high", "n_pos", "n_neg", "note"]
    if test_auc is not None:
        (run / "test_split").mkdir()
        pd.DataFrame([["Pneumonia", test_auc, test_auc - 0.05, test_auc + 0.05, 10, 90, ""]], columns=cols).to_csv(
            run / "test_split" / "table1.csv", index=False)


def test_rows_follow_the_paper_order_and_missing_parts_say_na(tmp_path):
    _run(tmp_path, "densenet121", "bench_rsna_s1_224_n5000_marker", 0.612)
    _run(tmp_path, "densenet121", "bench_rsna_s1_224_n5000", 0.9)
    _run(tmp_path, "vgg16", "bench_rsna_s1_224_n5000", None, epochs=2)
    (tmp_path / "bench_rsna_s1_224_n5000").mkdir()  # a dataset folder is not a run
    collect = runpy.run_path(str(SCRIPT))["collect"]
    lines = collect(tmp_path).strip().splitlines()
    assert len(lines) == 2 + 3
    vgg, clean, marker = lines[2:]
    assert vgg.startswith("| VGG-16 | clean | 2 of 2 | 0.600 | n/a | n/a |")
    assert clean.startswith("| DenseNet-121 | clean | 3 of 3 | 0.700 |") and "**0.900** (0.850–0.950)" in clean
    assert marker.startswith("| DenseNet-121 | marker shortcut |") and "**0.612**" in marker and "| 1.5 |" in marker
