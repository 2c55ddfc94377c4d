"""`cxr-explain evaluate` with the CheXlocalize protocol, end to end on the synthetic stand-in."""
from __future__ import annotations

import json
import shutil
import warnings
from argparse import ArgumentParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxr_explain.attribution import explain
from cxr_explain.cli import main
from cxr_explain.data.chexlocalize import CheXlocalizeDataset
from cxr_explain.data.images import get_preprocessing
from cxr_explain.data.nih import NIHDataset
from cxr_explain.data.phantom import PhantomConfig, generate
from cxr_explain.data.phantom_export import export_chexlocalize
from cxr_explain.commands import add_evaluate_arguments, load_dataset_from_args
from cxr_explain.evaluation.chexlocalize import RECORDS_NAME, collect_records, write_chexlocalize_tables
from cxr_explain.data.layout import detect_layout
from cxr_explain.metrics.chexlocalize import iou_from_counts, score_map, tune_cutoff, tune_threshold
from cxr_explain.models import build_model, load_checkpoint, save_checkpoint
from cxr_explain.models.zoo import BENCHMARK_LABELS
from test_evaluation import tiny_model

CFG = PhantomConfig(split=(0.4, 0.3, 0.3), p_no_finding=0.3)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    base = tmp_path_factory.mktemp("cxl")
    src = generate(base / "bench", n=20, seed=7, size=64, config=CFG, workers=1, progress=False)
    return src, export_chexlocalize(src, base / "copy")


def _records(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / RECORDS_NAME)


def test_cli_evaluate_writes_the_chexlocalize_table(bench, tmp_path, capsys):
    _, data = bench
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "r18.pt", build_model("resnet18", labels=list(BENCHMARK_LABELS), in_channels=1,
                                                             input_size=64))
    res = tmp_path / "res"
    rc = main(["evaluate", "--data", str(data), "--checkpoint", str(ckpt), "--methods", "gradcam", "lrp", "rap",
               "--out", str(res), "--no-progress", "--batch-size", "4", "--no-maps"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "### CheXlocalize protocol — split val" in out and "### CheXlocalize protocol — split test" in out
    for m in ("GRADCAM", "LRP", "RAP"):
        assert f"| mIoU | {m} |" in out and f"| hit rate | {m} |" in out
    assert "CheXlocalize protocol: mIoU and hit rate" in (res / "report.html").read_text()
    rec = _records(res)
    ds = CheXlocalizeDataset(data)
    # one record per positive (image, finding) and method; the paper protocol ran on the same masks
    want = sum(len(ds.gt_findings(i)) for i in range(len(ds)))
    assert len(rec) == 3 * want and set(rec["method"]) == {"gradcam", "lrp", "rap"}
    assert (rec["gt_area"] > 0).all() and set(rec["split"]) == {"val", "test"}
    paper = pd.read_csv(res / "results.csv")
    assert set(paper["gt"]) == {"mask"} and len(paper) == 3 * want
    # a record equals the map scored directly
    r = rec[rec["method"] == "lrp"].iloc[0]
    i = ds.index_of(r["image_id"])
    model = load_checkpoint(ckpt)[0]
    pre = get_preprocessing("gray", 64)
    xr = ds.read_image(i)
    x, _, _ = pre(xr)
    fs = ds.gt_findings(i)
    e = explain(model, x[None], "lrp", target=[[BENCHMARK_LABELS.index(f) for f in fs]])
    k = fs.index(r["finding"])
    direct = score_map(pre.to_original(e.maps[0, k], xr.height, xr.width), ds[i].masks[r["finding"]])
    for c, v in direct.items():
        assert r[c] == pytest.approx(v, nan_ok=True), c
    # the table's test mIoU is the mean of the test records' true-positive IoUs
    summary = pd.read_csv(res / "tables" / "chexlocalize.csv")
    t = rec[(rec["split"] == "test") & (rec["method"] == "rap")]
    for f, g in t.groupby("finding"):
        got = summary[(summary.subset == "test") & (summary.method == "rap") & (summary.finding == f)
                      & (summary.metric == "miou")]
        assert got["mean"].iloc[0] == pytest.approx(np.nanmean(iou_from_counts(g.pred_otsu, g.gt_area, g.inter_otsu)))


def test_tuned_threshold_and_cutoffs_on_val_reported_on_test(bench, tmp_path):
    _, data = bench
    ds = CheXlocalizeDataset(data)
    out = tmp_path / "t"
    rec = collect_records(tiny_model(), ds, ["gradcam"], out, all_pairs=True, batch_size=8, progress=False)
    assert len(rec) == len(ds) * len(ds.findings)  # every finding of every image
    assert (rec["gt_area"] == 0).any() and rec["prob"].between(0, 1).all()
    md = write_chexlocalize_tables(out, segmentation="tuned", cutoffs="tune")
    text = md.read_text()
    assert "protocol — split test" in text and "protocol — split val" not in text and "tuned on split val" in text and "| method | pathology | threshold | cut-off |" in text
    choices = pd.DataFrame(json.loads((out / "tables" / "chexlocalize.json").read_text())["choices"])
    val = rec[rec["split"] == "val"]
    for r in choices.itertuples():
        g = val[(val["method"] == r.method) & (val["finding"] == r.finding)]
        thr = tune_threshold(g)[0]
        assert r.threshold == thr and r.cutoff == tune_cutoff(g, thr)[0]


def test_same_protocol_on_nih_boxes_and_masks(bench, tmp_path):
    src, _ = bench
    ds = NIHDataset(src, boxed_only=True, findings=BENCHMARK_LABELS)
    rec = collect_records(tiny_model(), ds, ["cam"], tmp_path, splits=["test"], progress=False)
    assert set(rec["split"]) == {"test"}
    for r in rec.itertuples():  # ground truth = the finding's exact mask OR its box
        s = ds[ds.index_of(r.image_id)]
        want = s.masks[r.finding].copy()
        for b in s.boxes:
            if b.finding == r.finding:
                want |= b.to_mask(64, 64)
        assert r.gt_area == want.sum()
    md = write_chexlocalize_tables(tmp_path)
    assert "| mIoU | CAM |" in md.read_text()


def test_layouts_are_detected(bench, tmp_path):
    src, data = bench
    assert detect_layout(data) == "chexlocalize" and detect_layout(src) == "nih"
    (data / "CheXlocalize" / "gt_segmentations_val.json").rename(tmp_path / "v.json")
    (data / "CheXlocalize" / "gt_segmentations_test.json").rename(tmp_path / "t.json")
    try:
        assert detect_layout(data) == "chexpert"
        p = add_evaluate_arguments(ArgumentParser())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = load_dataset_from_args(p.parse_args(["--data", str(data), "--uncertain", "zeros"]), BENCHMARK_LABELS)
        assert type(ds).__name__ == "CheXpertDataset" and ds.uncertain == "zeros" and len(ds) == 20
        assert main(["evaluate", "--data", str(data), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    finally:
        (tmp_path / "v.json").rename(data / "CheXlocalize" / "gt_segmentations_val.json")
        (tmp_path / "t.json").rename(data / "CheXlocalize" / "gt_segmentations_test.json")
    mimic = tmp_path / "mimic"
    mimic.mkdir()
    (mimic / "mimic-cxr-2.0.0-chexpert.csv.gz").write_bytes(b"")
    assert detect_layout(mimic) == "mimic" and detect_layout(tmp_path) == "folder"


def test_bad_ground_truth_is_a_one_line_cli_error(bench, tmp_path, capsys):
    _, data = bench
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    gpath = copy / "CheXlocalize" / "gt_segmentations_val.json"
    gt = json.loads(gpath.read_text())
    iid = next(iter(gt))
    gt[iid]["Effusion"]["counts"] = gt[iid]["Effusion"]["counts"][:-2]
    gpath.write_text(json.dumps(gt))
    rc = main(["evaluate", "--data", str(copy), "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and str(gpath) in err and iid in err and "Effusion" in err
