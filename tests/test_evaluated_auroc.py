"""The model's AUROC on the evaluated films: a forward pass over them, labels from the dataset."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from sklearn.metrics import roc_auc_score

from cxr_explain.data.images import get_preprocessing
from cxr_explain.data.nih import NIHDataset
from cxr_explain.data.phantom import generate
from cxr_explain.evaluation import evaluate
from cxr_explain.evaluation import auroc as auroc_mod
from cxr_explain.evaluation.auroc import evaluated_auroc
from cxr_explain.models.zoo import BENCHMARK_LABELS, ModelSpec
from cxr_explain.results import read_results
from cxr_explain.results.auroc import auroc_table, read_auroc


def _model() -> nn.Module:
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(6, len(BENCHMARK_LABELS)))
    m.cxr_spec = ModelSpec(arch="tiny-cnn", labels=list(BENCHMARK_LABELS), preprocessing="gray", input_size=64)
    return m.eval()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("ph")
    generate(root, 16, seed=5, size=64, workers=1, progress=False)
    ds = NIHDataset(root, boxed_only=True, findings=BENCHMARK_LABELS)
    out = tmp_path_factory.mktemp("res")
    model = _model()
    evaluate(model, ds, ("cam",), out_dir=out, progress=False, save_maps=False, use_masks=False)
    return model, ds, out


def test_auroc_equals_sklearn_on_the_evaluated_films(evaluated):
    model, ds, out = evaluated
    path = evaluated_auroc(model, ds, out, batch_size=5, n_boot=200)
    assert path == out / "auroc.csv"
    df = read_results(out / "results.csv")
    ids = list(dict.fromkeys(df["image_id"]))
    idx = [ds.index_of(i) for i in ids]
    pre = get_preprocessing("gray", 64)
    with torch.no_grad():
        z = model(torch.stack([pre(ds.read_image(i))[0] for i in idx])).numpy()
    y = np.stack([ds[i].labels for i in idx])
    table = read_auroc(out).set_index("finding")
    scores = pd.read_csv(out / "auroc_scores.csv")
    assert len(scores) == len(ids) * len(BENCHMARK_LABELS)
    checked = 0
    for j, f in enumerate(BENCHMARK_LABELS):
        r = table.loc[f]
        assert r.n_pos == int((y[:, j] == 1).sum()) and r.n_neg == int((y[:, j] == 0).sum())
        if r.n_pos and r.n_neg:
            assert r.auroc == pytest.approx(roc_auc_score(y[:, j], z[:, j]), abs=1e-6)
            assert r.ci_low <= r.auroc <= r.ci_high
            checked += 1
        else:
            assert np.isnan(r.auroc) and "undefined" in r.note
    assert checked >= 2
    # the forward pass gives the logits the evaluation saw for each boxed finding
    seen = df[["image_id", "finding", "logit"]].merge(scores, on=["image_id", "finding"], suffixes=("", "_fwd"))
    assert len(seen) == len(df) and np.allclose(seen["logit"], seen["logit_fwd"], atol=1e-4)
    assert (seen["label"] == 1).all()  # boxed findings are labelled present


def test_rerun_with_the_same_films_and_weights_reuses_the_files(evaluated, monkeypatch):
    model, ds, out = evaluated
    evaluated_auroc(model, ds, out, n_boot=200)
    monkeypatch.setattr(auroc_mod, "forward_logits", lambda *a, **k: (_ for _ in ()).throw(AssertionError("reran")))
    evaluated_auroc(model, ds, out, n_boot=200)  # cached
    other = _model()
    with torch.no_grad():
        other[0].weight.mul_(2)
    with pytest.raises(AssertionError, match="reran"):
        evaluated_auroc(other, ds, out, n_boot=200)  # other weights: recomputed


def test_table_and_no_labels(evaluated, tmp_path):
    model, ds, out = evaluated
    evaluated_auroc(model, ds, out, n_boot=200)
    t = auroc_table(out)
    assert list(t.frame.columns) == ["finding", "AUROC [95% CI]", "positives", "negatives", "note"]
    assert t.frame.iloc[-1, 0].startswith("mean (") and "evaluated films" in t.protocol
    other = _model()
    other.cxr_spec = ModelSpec(arch="tiny-cnn", labels=[f"out{i}" for i in range(8)], preprocessing="gray",
                               input_size=64)
    assert evaluated_auroc(other, ds, out) is None  # the dataset labels none of these outputs
    assert auroc_table(tmp_path) is None


def test_table_cells_with_one_positive_or_none(tmp_path):
    pd.DataFrame({"finding": ["A", "B", "C"], "auroc": [0.75, float("nan"), 0.6], "ci_low": [0.75, float("nan"), 0.4],
                  "ci_high": [0.75, float("nan"), 0.8], "n_pos": [1, 0, 5], "n_neg": [4, 5, 5],
                  "note": ["", "undefined: no positive film", "3 of 200 resamples had one class and were skipped"]}
                 ).to_csv(tmp_path / "auroc.csv", index=False)
    rows = auroc_table(tmp_path).frame.set_index("finding")
    assert rows.loc["A", "AUROC [95% CI]"] == "0.750 (n = 1 positive)"  # no zero-width interval
    assert rows.loc["B", "AUROC [95% CI]"] == "–"
    assert rows.loc["C", "AUROC [95% CI]"] == "0.600 [0.400, 0.800]"
    assert rows.loc["C", "note"] == "CI over the 197 resamples with both classes"
    assert rows.loc["mean (2 findings)", "AUROC [95% CI]"] == "0.675"


def test_evaluate_logs_every_output_and_auroc_reads_them(evaluated, tmp_path, monkeypatch):
    """evaluate logs each film's outputs from its own forward pass (logits.csv); the AUROC step
    reads them and runs the model only on films the log lacks."""
    import shutil

    from cxr_explain.models.checkpoints import weights_sha256
    from cxr_explain.results.logits import LOGITS_NAME, read_logits

    model, ds, out = evaluated
    ids = list(dict.fromkeys(read_results(out / "results.csv")["image_id"]))
    logged = read_logits(out, BENCHMARK_LABELS, weights_sha256(model))
    assert sorted(logged) == sorted(ids)
    pre = get_preprocessing("gray", 64)
    with torch.no_grad():
        z = model(torch.stack([pre(ds.read_image(ds.index_of(i)))[0] for i in ids])).double().numpy()
    np.testing.assert_allclose(np.stack([logged[i] for i in ids]), z, rtol=1e-5, atol=1e-6)

    folder = tmp_path / "copy"
    shutil.copytree(out, folder)
    for f in ("auroc.csv", "auroc.json", "auroc_scores.csv"):
        (folder / f).unlink(missing_ok=True)
    lines = (folder / LOGITS_NAME).read_text().splitlines(keepends=True)
    dropped = lines.pop(1).split(",")[0]  # one film's row lost: only that film is run again
    (folder / LOGITS_NAME).write_text("".join(lines))
    calls = []
    real = auroc_mod.forward_logits
    monkeypatch.setattr(auroc_mod, "forward_logits", lambda m, d, idx, *a, **k: calls.append(idx) or real(m, d, idx, *a, **k))
    evaluated_auroc(model, ds, folder, n_boot=200)
    assert calls == [[ds.index_of(dropped)]]
    evaluated_auroc(model, ds, out, n_boot=200)
    pd.testing.assert_frame_equal(read_auroc(folder), read_auroc(out), rtol=1e-6)


def test_logits_log_keeps_films_and_restarts_for_other_outputs(tmp_path):
    from cxr_explain.results.logits import LOGITS_NAME, LogitsLog, read_logits

    log = LogitsLog(tmp_path / LOGITS_NAME, ["A", "B"], "ab" * 32)
    log.append(["f1", "f2"], np.array([[0.5, -1.25], [2.0, 3.0]], dtype=np.float32))
    LogitsLog(tmp_path / LOGITS_NAME, ["A", "B"], "ab" * 32).append(["f1"], np.array([[7.0, 8.0]]))  # f1 again: last counts
    got = read_logits(tmp_path, ["A", "B"], "ab" * 32)
    assert sorted(got) == ["f1", "f2"] and got["f1"].tolist() == [7.0, 8.0] and got["f2"].tolist() == [2.0, 3.0]
    assert read_logits(tmp_path, ["A", "B"], "cd" * 32) == {}  # other weights: nothing
    LogitsLog(tmp_path / LOGITS_NAME, ["A", "B", "C"], "ab" * 32)  # a model with other outputs starts afresh
    assert read_logits(tmp_path, ["A", "B"], "ab" * 32) == {} and read_logits(tmp_path, ["A", "B", "C"], "ab" * 32) == {}
