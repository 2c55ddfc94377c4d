"""End-to-end tests of the evaluation pipeline on a tiny synthetic benchmark and a tiny CNN."""
from __future__ import annotations

import json
import warnings
from argparse import ArgumentParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from cxr_explain.attribution import explain
from cxr_explain.data.images import get_preprocessing
from cxr_explain.data.nih import NIHDataset
from cxr_explain.data.phantom import generate
from cxr_explain.errors import CxrExplainError
from cxr_explain.commands import add_evaluate_arguments, load_dataset_from_args
from cxr_explain.evaluation import evaluate
from cxr_explain.evaluation.faithfulness import cascade_layers
from cxr_explain.results import ROW_KEY, ResultsWriter, load_maps, read_results, results_columns, write_summaries
from cxr_explain.metrics.localization import localization_scores, normalize_map
from cxr_explain.models.zoo import BENCHMARK_LABELS, ModelSpec

METHODS = ("cam", "lrp", "rap")
INPUT = 48  # model resolution; the films are 64 px, so maps are resized to the original space


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, len(BENCHMARK_LABELS)))
    m.cxr_spec = ModelSpec(arch="tiny-cnn", labels=list(BENCHMARK_LABELS), preprocessing="gray", input_size=INPUT)
    return m.eval()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    generate(root, 16, seed=5, size=64, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def dataset(phantom):
    return NIHDataset(phantom, boxed_only=True, findings=BENCHMARK_LABELS)


@pytest.fixture(scope="module")
def full_run(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    evaluate(tiny_model(), dataset, METHODS, out_dir=out, batch_size=4, progress=False)
    return out


def _counts(dataset):
    boxes = sum(len(s.boxes) for s in dataset.samples)
    masks = sum(len(dataset[i].masks) for i in range(len(dataset)))
    return boxes, masks


def _rows(path: Path) -> pd.DataFrame:
    df = read_results(path / "results.csv")
    return df.sort_values(ROW_KEY).reset_index(drop=True)


def test_one_row_per_region_and_method(full_run, dataset):
    boxes, masks = _counts(dataset)
    assert boxes > 5 and masks > 5
    df = read_results(full_run / "results.csv")
    assert len(df) == (boxes + masks) * len(METHODS)
    assert (df["gt"] == "box").sum() == boxes * len(METHODS)
    need = ["image_id", "finding", "method", "gt", "logit", "prob", "n_boxes", "iou@0.1", "iou@0.2", "iou@0.3",
            "iou@0.4", "iou@0.5", "iou_otsu", "hit", "mass", "rank_acc", "auprc", "split", "map_file"]
    assert all(c in df.columns for c in need)
    assert not df.duplicated(ROW_KEY).any()
    for c in ["iou@0.1", "iou@0.5", "iou_otsu", "mass", "rank_acc", "auprc"]:
        assert df[c].between(0, 1).all(), c
    assert set(df["split"]) <= {"train", "val", "test"} and (df["split"] == "test").any()
    # maps: float16, model resolution, one array per finding
    row = df.iloc[0]
    z = np.load(full_run / row["map_file"])
    assert z[row["finding"]].dtype == np.float16 and z[row["finding"]].shape == (INPUT, INPUT)
    assert set(load_maps(full_run / row["map_file"])) == set(df[df["image_id"] == row["image_id"]]["finding"])


def test_scores_follow_the_paper_protocol(full_run, dataset):
    """Recompute one box row independently: the logit of the box's finding, the map in original space."""
    df = read_results(full_run / "results.csv")
    r = df[(df["method"] == "lrp") & (df["gt"] == "box")].iloc[0]
    i = dataset.index_of(r["image_id"])
    s = dataset[i]
    xr = dataset.read_image(i)
    x, _, _ = get_preprocessing("gray", INPUT)(xr)
    model = tiny_model()
    k = list(BENCHMARK_LABELS).index(r["finding"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = explain(model, x[None], "lrp", target=k)
    assert r["logit"] == pytest.approx(float(model(x[None])[0, k].detach()), rel=1e-5, abs=1e-6)
    box = s.boxes[int(r["gt_index"])]
    sc = localization_scores(exp.maps[0], box.to_mask(64, 64), original_size=(64, 64))
    for c in ["iou@0.1", "iou@0.3", "iou@0.5", "mass", "auprc"]:
        assert r[c] == pytest.approx(sc[c], abs=1e-6), c
    saved = load_maps(full_run / r["map_file"])[r["finding"]]
    assert np.allclose(saved, exp.maps[0].numpy(), atol=1e-3 * float(exp.maps[0].abs().max()))


def test_rerun_appends_nothing(full_run, dataset):
    before = (full_run / "results.csv").read_bytes()
    evaluate(tiny_model(), dataset, METHODS, out_dir=full_run, batch_size=4, progress=False)
    assert (full_run / "results.csv").read_bytes() == before


@pytest.mark.parametrize("lag", [0, 100])
def test_scoring_threads_write_the_same_rows(full_run, dataset, tmp_path, monkeypatch, lag):
    """Films of a batch scored in two threads (what two torch threads give), waited for after each
    method (CPU) or left to score behind the engine (``lag``, as on a GPU): the same rows, in the
    same order, as the serial run (whose results.csv ``full_run`` holds). The engine keeps one
    thread so that only the scoring differs."""
    from concurrent.futures import ThreadPoolExecutor

    import cxr_explain.evaluation.runner as runner

    pools = []
    monkeypatch.setattr(runner, "_scoring_pool", lambda n: pools.append(ThreadPoolExecutor(2)) or pools[-1])
    monkeypatch.setattr(runner, "_scoring_lag", lambda *a: lag)
    evaluate(tiny_model(), dataset, METHODS, out_dir=tmp_path, batch_size=4, progress=False, save_maps=False)
    assert pools and pools[0]._shutdown
    got, want = read_results(tmp_path / "results.csv"), read_results(full_run / "results.csv")
    pd.testing.assert_frame_equal(got.drop(columns=["map_file"]), want.drop(columns=["map_file"]))


def test_interrupted_run_resumes_to_the_same_rows(full_run, dataset, tmp_path):
    out = tmp_path / "cut"
    evaluate(tiny_model(), dataset, METHODS, out_dir=out, batch_size=4, progress=False, stop_after_batches=2)
    p = out / "results.csv"
    partial = read_results(p)
    assert 0 < len(partial) < len(read_results(full_run / "results.csv"))
    # a kill -9 mid-write: drop the last two lines and leave half of the next one
    lines = p.read_text().splitlines(keepends=True)
    p.write_text("".join(lines[:-3]) + lines[-3][: len(lines[-3]) // 2])
    evaluate(tiny_model(), dataset, METHODS, out_dir=out, batch_size=4, progress=False)
    got, want = _rows(out), _rows(full_run)
    assert len(got) == len(want)
    pd.testing.assert_frame_equal(got.drop(columns=["map_file"]), want.drop(columns=["map_file"]), check_exact=False,
                                  rtol=1e-5, atol=1e-6)


def test_writer_drops_incomplete_groups(tmp_path):
    cols = results_columns([0.1])
    w = ResultsWriter(tmp_path / "r.csv", cols)
    w.write_group([{"image_id": "a", "method": "lrp", "finding": "Mass", "gt": "box", "gt_index": k} for k in range(2)])
    w.write_group([{"image_id": "b", "method": "lrp", "finding": "Mass", "gt": "box", "gt_index": 0}])
    w.close()
    w2 = ResultsWriter(tmp_path / "r.csv", cols, expected={("a", "lrp"): 2, ("b", "lrp"): 2})
    w2.close()
    assert w2.done == {("a", "lrp")}
    assert list(read_results(tmp_path / "r.csv")["image_id"]) == ["a", "a"]


def test_boxes_only_and_settings_guard(dataset, tmp_path):
    boxes, _ = _counts(dataset)
    out = evaluate(tiny_model(), dataset, ("gradient-x-input",), out_dir=tmp_path, progress=False,
                   use_masks=False, save_maps=False)
    df = read_results(out / "results.csv")
    assert len(df) == boxes and set(df["gt"]) == {"box"} and (df["map_file"] == "").all()
    assert json.loads((out / "run.json").read_text())["resize"] == "bilinear"
    with pytest.raises(CxrExplainError, match="resize"):
        evaluate(tiny_model(), dataset, ("gradient-x-input",), out_dir=tmp_path, progress=False,
                 use_masks=False, resize="nearest")


def test_summaries_table2_layout(full_run):
    written = write_summaries(full_run)
    md = written["table2_all_box"].read_text()
    assert "Protocol: docs/evaluation.md §1" in md and "original pixel space" in md
    assert "| 0.1 | CAM |" in md and "| 0.5 | RAP |" in md
    df = read_results(full_run / "results.csv")
    box = df[(df["gt"] == "box") & (df["method"] == "lrp")]
    n_row = [ln for ln in md.splitlines() if ln.startswith("| n |")][0]
    assert n_row.rstrip(" |").endswith(str(len(box)))
    data = json.loads((full_run / "tables" / "table2_all_box.json").read_text())
    cell = [r for r in data["rows"] if r["metric"] == "iou@0.3" and r["method"] == "lrp" and r["finding"] == "All"][0]
    assert cell["mean"] == pytest.approx(box["iou@0.3"].mean())
    assert cell["ci_low"] <= cell["mean"] <= cell["ci_high"]
    assert "test" in {p.name.split("_")[1] for p in (full_run / "tables").glob("table2_*.md")}
    csv = pd.read_csv(full_run / "tables" / "metrics_all_mask.csv")
    assert {"hit", "mass", "rank_acc", "auprc", "iou_otsu"} <= set(csv["metric"]) and (csv["protocol"].str.len() > 50).all()


def test_split_filter(dataset, tmp_path):
    out = evaluate(tiny_model(), dataset, ("cam",), out_dir=tmp_path, split="test", progress=False)
    df = read_results(out / "results.csv")
    assert len(df) > 0 and (df["split"] == "test").all()


def test_faithfulness_tables(dataset, tmp_path):
    out = evaluate(tiny_model(), dataset, ("lrp", "cam"), out_dir=tmp_path, progress=False,
                   faithfulness=True, faithfulness_images=2, use_masks=False)
    f = pd.read_csv(out / "faithfulness.csv")
    assert len(f) == 4 and np.isfinite(f[["deletion_auc", "insertion_auc"]].to_numpy()).all()
    r = pd.read_csv(out / "randomization.csv")
    layers = cascade_layers(tiny_model())
    assert len(r) == 2 * 2 * (len(layers) + 1) and (r[r["step"] == 0]["spearman_abs"] == 1).all()
    assert "Deletion / insertion AUC" in (out / "tables" / "faithfulness.md").read_text()
    assert "Model-parameter randomisation" in (out / "tables" / "randomization.md").read_text()
    from cxr_explain.report.html import write_report

    page = write_report(out, grids=False).read_text()  # the report redraws the tables and the curves
    assert "Deletion / insertion AUC" in page and "Model-parameter randomisation" in page
    assert (out / "figures" / "randomization.png").stat().st_size > 1000


def test_cascade_layers_top_down():
    from cxr_explain.models.zoo import build_model

    names = cascade_layers(build_model("resnet18", 2))
    assert names[0] == "fc" and names[-1] == "conv1" and "layer4" in names


def test_cli_arguments_and_layout_detection(phantom):
    p = add_evaluate_arguments(ArgumentParser())
    args = p.parse_args(["--data", str(phantom), "--methods", "lrp", "--thresholds", "0.2", "0.4"])
    assert args.methods == ["lrp"] and args.thresholds == [0.2, 0.4] and args.resize == "bilinear"
    ds = load_dataset_from_args(args, list(BENCHMARK_LABELS))
    assert isinstance(ds, NIHDataset) and len(ds) > 0
    args = p.parse_args(["--data", str(phantom / "nope")])
    with pytest.raises(CxrExplainError, match="not found"):
        load_dataset_from_args(args, list(BENCHMARK_LABELS))


def test_demo_with_a_given_model(tmp_path, capsys):
    from cxr_explain.demo import demo

    report = demo(tmp_path, model=tiny_model(), seed=5, size=64, n_generate=16, max_images=2, progress=False, workers=1)
    out = capsys.readouterr().out
    assert report.is_file() and "| 0.1 | CAM |" in out and str(report.resolve()) in out
    df = read_results(tmp_path / "results" / "results.csv")
    assert df["image_id"].nunique() == 2 and (df["split"] == "test").all()


def test_batches_hold_films_with_as_many_targets(dataset, tmp_path, monkeypatch):
    """Films are batched by their number of findings, so no padded target is propagated; the rows
    equal those of batches in dataset order (ragged target lists padded with −1), in float64."""
    from cxr_explain.evaluation import runner
    from cxr_explain.evaluation.runner import batch_plan, findings_of, select_images

    gts = select_images(dataset, list(BENCHMARK_LABELS))
    counts = {i: len(findings_of(g)) for i, g in gts.items()}

    def former(indices, gts, batch_size):
        idx = list(indices)
        return [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)]

    assert any(len({counts[i] for i in b}) > 1 for b in former(sorted(gts), gts, 4))  # the set has ragged batches
    plan = batch_plan(sorted(gts), gts, 4)
    assert sorted(i for b in plan for i in b) == sorted(gts)
    assert all(len(b) <= 4 and len({counts[i] for i in b}) == 1 for b in plan)

    asked = []
    real_explain = runner.explain

    def spy(model, x, method, target, **kw):
        asked.append([len(t) for t in target])
        return real_explain(model, x, method=method, target=target, **kw)

    monkeypatch.setattr(runner, "explain", spy)
    evaluate(tiny_model(), dataset, METHODS, out_dir=tmp_path / "new", batch_size=4, progress=False, dtype="float64")
    assert asked and all(len(set(n)) == 1 for n in asked)  # every batch: as many targets per film
    monkeypatch.setattr(runner, "batch_plan", former)
    evaluate(tiny_model(), dataset, METHODS, out_dir=tmp_path / "old", batch_size=4, progress=False, dtype="float64")
    assert any(len(set(n)) > 1 for n in asked)
    pd.testing.assert_frame_equal(_rows(tmp_path / "new"), _rows(tmp_path / "old"), check_exact=False,
                                  rtol=1e-9, atol=1e-12)


def test_a_film_the_method_refuses_fails_alone(dataset, tmp_path, monkeypatch, capsys):
    """A batch the method refuses is explained film by film: only the film at fault is a failure
    (stage explain), the others of its batch get their rows, as a batch without it would."""
    from cxr_explain.evaluation import runner

    real_explain = runner.explain
    bad = dataset.samples[sorted(runner.select_images(dataset, list(BENCHMARK_LABELS)))[1]]
    poisoned = {}

    def refusing(model, x, method, target, **kw):
        for k in range(len(x)):
            if any(torch.equal(x[k], p) for p in poisoned.values()):
                raise CxrExplainError(f"{method.name}: cannot explain this film")
        return real_explain(model, x, method=method, target=target, **kw)

    gts = runner.select_images(dataset, list(BENCHMARK_LABELS), use_masks=False)
    i_bad = dataset.samples.index(bad)
    assert len(next(b for b in runner.batch_plan(sorted(gts), gts, 4) if i_bad in b)) > 1  # it has company
    pre = get_preprocessing("gray", INPUT)
    poisoned["x"] = pre(dataset.read_image(dataset.samples.index(bad)))[0]
    monkeypatch.setattr(runner, "explain", refusing)
    evaluate(tiny_model(), dataset, ("lrp",), out_dir=tmp_path, batch_size=4, progress=False, use_masks=False)
    failures = pd.read_csv(tmp_path / "failures.csv")
    assert failures[["stage"]].values.ravel().tolist() == ["explain"] and failures["file"][0] == str(bad.path)
    assert "lrp: cannot explain this film" in failures["reason"][0]
    assert f"{bad.path}: explain failed" in capsys.readouterr().err
    got = _rows(tmp_path)
    assert bad.image_id not in set(got["image_id"])
    monkeypatch.setattr(runner, "explain", real_explain)
    evaluate(tiny_model(), dataset, ("lrp",), out_dir=tmp_path / "all", batch_size=4, progress=False, use_masks=False)
    want = _rows(tmp_path / "all")
    want = want[want["image_id"] != bad.image_id].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-5, atol=1e-6)


def test_a_method_the_model_cannot_take_stops_before_any_film(dataset, tmp_path):
    with pytest.raises(CxrExplainError, match="attnlrp") as err:
        evaluate(tiny_model(), dataset, ("cam", "attnlrp"), out_dir=tmp_path, progress=False)
    assert "\n" not in str(err.value)
    assert len(read_results(tmp_path / "results.csv")) == 0
    assert not pd.read_csv(tmp_path / "failures.csv").shape[0]


@pytest.mark.parametrize("threads", [1, 2])
def test_a_film_that_cannot_be_scored_fails_alone(dataset, full_run, tmp_path, monkeypatch, threads):
    """A film whose rows cannot be made (here: scoring raises for it) is one failure of stage
    score; the films scored around it, in the background threads or not, keep their rows."""
    from concurrent.futures import ThreadPoolExecutor

    from cxr_explain.evaluation import runner

    bad = dataset.samples[sorted(runner.select_images(dataset, list(BENCHMARK_LABELS)))[2]]
    real_rows = runner._image_rows

    def rows(it, *a, **k):
        if it["sample"].image_id == bad.image_id:
            raise CxrExplainError(f"{bad.image_id}: the mask is 3x3 but the image is 64x64")
        return real_rows(it, *a, **k)

    monkeypatch.setattr(runner, "_image_rows", rows)
    monkeypatch.setattr(runner, "_scoring_pool", lambda n: ThreadPoolExecutor(threads) if threads > 1 else None)
    evaluate(tiny_model(), dataset, METHODS, out_dir=tmp_path, batch_size=4, progress=False, save_maps=False)
    failures = pd.read_csv(tmp_path / "failures.csv")
    assert set(failures["stage"]) == {"score"} and set(failures["file"]) == {str(bad.path)}
    assert sorted(r.split(":")[0] for r in failures["reason"]) == sorted(METHODS)
    got = read_results(tmp_path / "results.csv")
    want = read_results(full_run / "results.csv")
    want = want[want["image_id"] != bad.image_id].reset_index(drop=True)
    pd.testing.assert_frame_equal(got.drop(columns=["map_file"]), want.drop(columns=["map_file"]))


@pytest.mark.parametrize("prep, resize", [("gray", "bilinear"), ("gray", "bicubic"), ("gray", "area"),
                                          ("xrv", "bilinear")])
def test_maps_resized_together_equal_one_resize_per_map(prep, resize):
    """The runner resizes the maps of a batch with one interpolation per original size (center-
    cropped films one by one): normalised, each equals the one-map-at-a-time path bit for bit."""
    from cxr_explain.evaluation import runner
    from cxr_explain.evaluation.runner import GroundTruth

    torch.manual_seed(0)
    ctx = {"pre": get_preprocessing(prep, 32), "resize": resize, "scaling": "clip"}
    sizes = [(64, 64), (80, 64), (64, 64)]  # two films share a size, one does not (and is cropped by xrv)
    findings = [["Mass", "Nodule"], ["Mass"], ["Effusion", "Mass", "Nodule"]]
    items = [{"index": b, "height": h, "width": w} for b, (h, w) in enumerate(sizes)]
    gts = {b: [GroundTruth(f, "mask", 0) for f in fs] for b, fs in enumerate(findings)}
    src = torch.randn(3, 3, 32, 32)
    got = runner._original_size_maps(items, src, gts, ctx)
    pre = ctx["pre"]
    for b, (h, w) in enumerate(sizes):
        assert len(got[b]) == len(findings[b])
        for k, a in enumerate(got[b]):
            one = src[b, k] if runner._identity_geometry(pre, h, w) else pre.to_original(src[b, k], h, w)
            np.testing.assert_array_equal(normalize_map(a), normalize_map(one, resize_to=(h, w), mode=resize))
    assert not runner._identity_geometry(pre, 80, 64) or prep != "xrv"  # the crop path is taken
