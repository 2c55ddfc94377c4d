"""`cxr-explain demo --chexlocalize` and `cxr-explain export-chexlocalize` on a tiny benchmark."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from cxr_explain.cli import main
from cxr_explain.data.chexlocalize import CheXlocalizeDataset
from cxr_explain.data.phantom import generate
from cxr_explain.data.phantom_export import export_chexlocalize
from cxr_explain.evaluation.chexlocalize import RECORDS_NAME
from cxr_explain.metrics.chexlocalize import iou_from_counts
from cxr_explain.models import build_model, save_checkpoint
from cxr_explain.models.zoo import BENCHMARK_LABELS, get_spec

SEED, SIZE, FILMS = 5, 64, 24


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = build_model("resnet18", labels=list(BENCHMARK_LABELS), in_channels=1, input_size=SIZE)
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "r18.pt", m)


def test_demo_chexlocalize_writes_the_protocol_table_and_report(ckpt, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--chexlocalize", "--checkpoint", str(ckpt), "--out", str(out), "--films", str(FILMS),
               "--size", str(SIZE), "--seed", str(SEED), "--max-images", "4", "--workers", "1", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    res = out / "results_chexlocalize"
    assert "### CheXlocalize protocol — split test" in printed
    for m in ("CAM", "LRP", "RAP"):
        assert f"| mIoU | {m} |" in printed and f"| hit rate | {m} |" in printed
    # the copy is the benchmark's, written where the demo says
    copy = out / "phantom_chexlocalize"
    assert (copy / "CheXlocalize" / "gt_segmentations_test.json").is_file()
    ds = CheXlocalizeDataset(copy, split="test")
    rec = pd.read_csv(res / RECORDS_NAME)
    assert set(rec["method"]) == {"cam", "lrp", "rap"} and set(rec["split"]) == {"test"}
    films = list(dict.fromkeys(rec["image_id"]))
    assert 1 <= len(films) <= 4 and all(ds.index_of(f) is not None for f in films)
    want = sum(len(ds.gt_findings(ds.index_of(f))) for f in films)
    assert len(rec) == 3 * want and (rec["gt_area"] > 0).all()  # true-positive slice: positive findings only
    table = pd.read_csv(res / "tables" / "chexlocalize.csv")
    for (f, m), g in rec.groupby(["finding", "method"]):
        got = table[(table.method == m) & (table.finding == f) & (table.metric == "miou")]
        assert got["mean"].iloc[0] == pytest.approx(np.nanmean(iou_from_counts(g.pred_otsu, g.gt_area, g.inter_otsu)))
    page = (res / "report.html").read_text()
    assert "CheXlocalize protocol: mIoU and hit rate" in page
    assert "synthetic benchmark films" in page and "in the CheXlocalize layout" in page
    assert "r18.pt; SHA-256 " in page and str(tmp_path) not in page
    assert "real radiographs mean nothing" not in page  # the copy is known as synthetic: no warning


def test_export_chexlocalize_cli_equals_the_api_and_checks_its_options(tmp_path, capsys):
    bench = generate(tmp_path / "bench", 8, seed=SEED, size=SIZE, workers=1, progress=False)
    assert main(["export-chexlocalize", "--data", str(bench), "--out", str(tmp_path / "cli"), "--seed", "3"]) == 0
    assert "CheXlocalize-style copy written to" in capsys.readouterr().out
    export_chexlocalize(bench, tmp_path / "api", seed=3)
    files = sorted(p.relative_to(tmp_path / "api") for p in (tmp_path / "api").rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*")
                                     if p.is_file())
    for rel in files:
        if rel.suffix in (".csv", ".png", ".json") and rel.name != "chexlocalize_export.json":
            assert (tmp_path / "cli" / rel).read_bytes() == (tmp_path / "api" / rel).read_bytes(), rel
    bad = [(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x")], "folder not found"),
           (["--data", str(bench), "--out", str(tmp_path / "x"), "--uncertain-fraction", "2"], "uncertain_fraction"),
           (["--data", str(bench), "--out", str(bench)], "another folder")]
    for args, words in bad:
        assert main(["export-chexlocalize", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err


def test_demo_options_are_checked(ckpt, tmp_path, capsys):
    for opt, val in (("--size", "8"), ("--films", "0"), ("--max-images", "0")):
        rc = main(["demo", "--checkpoint", str(ckpt), "--out", str(tmp_path / "d"), opt, val, "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "at least" in err and "\n" not in err, err
    assert not (tmp_path / "d" / "phantom").exists()  # refused before generating anything


def test_synthetic_model_on_other_films_warns_in_the_report(ckpt, tmp_path, capsys):
    """A model trained on the benchmark, evaluated on films outside it: the CLI's warning line is in the report."""
    bench = generate(tmp_path / "bench", 12, seed=SEED, size=SIZE, workers=1, progress=False)
    other = tmp_path / "other"
    shutil.copytree(bench, other)
    (other / "phantom.json").unlink()  # no longer known as the synthetic benchmark
    model = build_model("resnet18", labels=list(BENCHMARK_LABELS), in_channels=1, input_size=SIZE)
    spec = get_spec(model)
    spec = dataclasses.replace(spec, provenance={"phantom": {"seed": 0, "n": 3000, "size": SIZE}})
    synth = save_checkpoint(tmp_path / "synth.pt", model, spec)
    res = tmp_path / "res"
    with pytest.warns(UserWarning, match="not from that benchmark"):
        rc = main(["evaluate", "--data", str(other), "--checkpoint", str(synth), "--methods", "cam", "--out",
                   str(res), "--no-progress", "--no-maps", "--max-images", "2"])
    assert rc == 0
    page = (res / "report.html").read_text()
    head = page[:page.index("<h2>")]
    assert "<td>warning</td><td>this model was trained only on cxr-explain&#39;s synthetic benchmark" in head
    assert "synthetic benchmark films only (cxr-explain phantom, seed 0, 3000 films" in head  # training data
    assert "NIH ChestX-ray14 layout, folder &#39;other&#39;" in head and str(tmp_path) not in page
