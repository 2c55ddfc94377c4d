"""Training loop, resume, 2-rank DDP (gloo), the AUROC command and the shipped default model.

Tiny setting: a 60-film phantom at 64 px, ResNet-18 at 32 px, one torch thread.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from cxr_explain.data.images import get_preprocessing
from cxr_explain.data.phantom import generate
from cxr_explain.errors import CheckpointError, CxrExplainError
from cxr_explain.models.checkpoints import load_checkpoint
from cxr_explain.models.zoo import BENCHMARK_LABELS
from cxr_explain.training import (TrainConfig, add_auroc_arguments, add_train_arguments, auroc_cli,
                                  evaluate_auroc, fit, load_split, train)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("ph") / "nih", n=60, seed=3, size=64, workers=1, progress=False)


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), arch="resnet18", size=32, epochs=1, batch_size=8, workers=0,
                device="cpu", threads=1, progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def one_epoch(phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return fit(_cfg(phantom, out, command="pytest one epoch")), out


def test_one_epoch_writes_best_and_last_with_provenance(one_epoch, phantom):
    res, out = one_epoch
    assert res.best == out / "best.pt" and res.best.is_file() and (out / "last.pt").is_file()
    model, spec, report = load_checkpoint(res.best)
    assert report.format == "cxr-explain/1"
    assert spec.arch == "resnet18" and spec.labels == list(BENCHMARK_LABELS) and spec.input_size == 32
    prov = spec.provenance
    assert prov["data"] == str(phantom.resolve()) and prov["command"] == "pytest one epoch"
    assert prov["epochs"] == 1 and prov["best_epoch"] == 1
    assert prov["phantom"]["seed"] == 3 and prov["phantom"]["size"] == 64
    assert set(prov["val_auroc"]) == set(BENCHMARK_LABELS)
    hist = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1] and np.isfinite(hist[0]["train_loss"])
    # the saved weights are the returned model's
    for k, v in res.model.state_dict().items():
        assert torch.equal(v.cpu(), model.state_dict()[k]), k


def test_evaluate_auroc_keeps_dataset_order(one_epoch, phantom):
    res, _ = one_epoch
    ds = load_split(phantom, "nih", "train", BENCHMARK_LABELS)
    y, s = evaluate_auroc(res.model, ds, batch_size=7, device="cpu")
    assert y.shape == s.shape == (len(ds), 8)
    np.testing.assert_array_equal(y, ds.label_matrix())
    assert ((s > 0) & (s < 1)).all()
    # the same scores image by image (batching and order do not matter)
    pre = ds.with_preprocessing(get_preprocessing("imagenet-rgb", 32))
    x = torch.stack([pre[i][0] for i in (0, 5)])
    with torch.no_grad():
        z = torch.sigmoid(res.model.eval()(x)).numpy()
    np.testing.assert_allclose(s[[0, 5]], z, atol=1e-5)


def test_resume_continues_from_saved_epoch(phantom, tmp_path, capsys):
    out = tmp_path / "r"
    fit(_cfg(phantom, out, epochs=1))
    st1 = torch.load(out / "last.pt", weights_only=True)
    steps1 = max(int(s["step"]) for s in st1["optimizer"]["state"].values())
    assert st1["epoch"] == 1 and steps1 > 0
    res = fit(_cfg(phantom, out, epochs=2, resume=True))
    assert "resuming from" in capsys.readouterr().out
    st2 = torch.load(out / "last.pt", weights_only=True)
    steps2 = max(int(s["step"]) for s in st2["optimizer"]["state"].values())
    assert st2["epoch"] == 2 and [h["epoch"] for h in st2["history"]] == [1, 2]
    assert steps2 == 2 * steps1  # Adam's step counters were restored, not restarted
    assert [h["epoch"] for h in res.history] == [1, 2]
    # a run that is already complete does no more epochs
    again = fit(_cfg(phantom, out, epochs=2, resume=True))
    assert len(again.history) == 2
    with pytest.raises(CheckpointError, match="last.pt not found"):
        fit(_cfg(phantom, tmp_path / "empty", resume=True))


def test_bad_config_is_a_one_line_error(phantom, tmp_path):
    with pytest.raises(CxrExplainError, match="arch"):
        train(_cfg(phantom, tmp_path, arch="alexnet"))
    with pytest.raises(CxrExplainError, match="Lung Opacity"):
        train(_cfg(phantom, tmp_path, findings=["Lung Opacity"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, data: str, out: str, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    res = fit(_cfg(Path(data), Path(out), epochs=1, batch_size=4))
    torch.save({"state": res.model.state_dict(), "history": res.history},
               Path(result_dir) / f"rank{rank}.pt")


def test_ddp_two_ranks_gloo_end_with_equal_weights(phantom, tmp_path):
    out, res_dir = tmp_path / "ddp", tmp_path / "res"
    res_dir.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(phantom), str(out), str(res_dir)), nprocs=2, join=True)
    r0 = torch.load(res_dir / "rank0.pt", weights_only=True)
    r1 = torch.load(res_dir / "rank1.pt", weights_only=True)
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # both ranks saw the same (gathered) validation AUROC; only rank 0 wrote files
    assert r0["history"][0]["val_auroc"] == r1["history"][0]["val_auroc"]
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    model, spec, _ = load_checkpoint(out / "best.pt")
    assert spec.provenance["device"] == "cpu x2" and spec.provenance["batch_size"] == 8
    for k, v in model.state_dict().items():
        assert torch.equal(v, r0["state"][k]), k
    # one shard per rank: 2 ranks * ceil(n/2/4) optimizer steps cover the training set once
    n_train = len(load_split(phantom, "nih", "train", BENCHMARK_LABELS))
    st = torch.load(out / "last.pt", weights_only=True)
    assert max(int(s["step"]) for s in st["optimizer"]["state"].values()) == -(-((n_train + 1) // 2) // 4)


def test_auroc_cli_names_checkpoint_and_split(one_epoch, phantom, capsys, tmp_path):
    res, _ = one_epoch
    p = add_auroc_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--data", str(phantom), "--checkpoint", str(res.best), "--split", "test",
                         "--n-boot", "50", "--out", str(tmp_path / "t1")])
    table = auroc_cli(args)
    out = capsys.readouterr().out
    assert table in out
    sha = hashlib.sha256(res.best.read_bytes()).hexdigest()[:12]
    n_test = len(load_split(phantom, "nih", "test", BENCHMARK_LABELS))
    rows = [line for line in out.splitlines() if line.startswith("| best.pt")]
    assert len(rows) == 8 + 1  # 8 findings + mean (or n/a rows), each naming checkpoint and split
    assert all(f"best.pt (sha256 {sha})" in r and f"test ({n_test} images" in r for r in rows)
    assert (tmp_path / "t1" / "table1.csv").is_file()


def test_train_arguments_round_trip(phantom, tmp_path):
    p = add_train_arguments(argparse.ArgumentParser())
    a = p.parse_args(["--data", str(phantom), "--out", str(tmp_path), "--epochs", "3", "--size", "96",
                      "--batch-size", "4", "--lr", "1e-4", "--resume", "--shortcut-note", "marker 0.9/0.1"])
    assert (a.epochs, a.size, a.batch_size, a.lr, a.resume, a.arch) == (3, 96, 4, 1e-4, True, "densenet121")
    assert a.shortcut_note == "marker 0.9/0.1" and a.layout is None and a.hflip is False


def test_every_config_field_is_an_option_with_its_default(tmp_path):
    import dataclasses

    from cxr_explain.training import config_from_args

    p = add_train_arguments(argparse.ArgumentParser())
    dests = {a.dest for a in p._actions} - {"help"}
    assert dests == {f.name for f in dataclasses.fields(TrainConfig)} - {"command"}
    a = p.parse_args(["--data", "d", "--out", "o"])
    a.command_line = "cmd"
    assert config_from_args(a, layout="nih") == TrainConfig(data="d", out="o", command="cmd")
    a = p.parse_args(["--data", "d", "--out", "o", "--layout", "rsna", "--no-augment", "--no-amp", "--no-progress",
                      "--findings", "Pneumonia|Lung Opacity", "--betas", "0.5", "0.9", "--max-val-images", "7"])
    cfg = config_from_args(a)
    assert (cfg.layout, cfg.affine, cfg.amp, cfg.progress, cfg.betas, cfg.max_val_images) == \
        ("rsna", False, False, False, (0.5, 0.9), 7)
    assert cfg.findings == ["Pneumonia", "Lung Opacity"]


def test_help_does_not_load_the_trainer():
    import subprocess
    import sys

    code = ("import sys; from cxr_explain.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('cxr_explain.training') or m == 'torch'))")
    src = str(Path(__file__).resolve().parents[1] / "src")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": src})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    assert "train" in r.stdout and "auroc" in r.stdout  # still listed


# ----------------------------------------------------------------------------- the shipped model
def test_default_model_loads_fast_and_reproduces_its_card():
    from cxr_explain.models.default import default_model_info, load_default_model, reference_check

    t0 = time.perf_counter()
    model = load_default_model()
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"load took {elapsed:.2f} s"  # ~0.5 s on an idle core; slack for a busy CI
    assert not model.training
    spec = model.cxr_spec
    assert spec.arch == "densenet121" and spec.labels == list(BENCHMARK_LABELS)
    info = default_model_info()
    card = info["card"]
    assert set(card["test_auroc"]) == set(BENCHMARK_LABELS) and card["benchmark"]["seed"] == info["reference"]["seed"]
    assert len(info["reference"]["indices"]) >= 16
    # the stored reference test films give the stored logits (fp16 weights loaded into fp32)
    assert reference_check(model, regenerate=False)["max_logit_diff"] < 1e-3
    ref = info["reference"]
    assert ref["films"].shape == (len(ref["indices"]), ref["size"], ref["size"])
    # the card in the docs quotes the numbers stored in the asset
    card_md = (Path(__file__).resolve().parents[1] / "docs" / "MODEL_CARD.md").read_text()
    assert f"{card['mean_test_auroc']:.3f}" in card_md


def test_rsna_layout_trains_one_pneumonia_logit(tmp_path, capsys):
    data = generate(tmp_path / "rsna", n=24, seed=5, size=64, layout="rsna", workers=1, progress=False)
    res = fit(_cfg(data, tmp_path / "run", layout="rsna", shortcut_note="none planted"))
    spec = res.model.cxr_spec
    assert spec.labels == ["Pneumonia"] and spec.provenance["shortcut_note"] == "none planted"
    ds = load_split(data, "rsna", "train", ["Pneumonia"])
    y, s = evaluate_auroc(res.model, ds, batch_size=5)
    assert y.shape == s.shape == (len(ds), 1) and set(np.unique(y)) <= {0.0, 1.0}
    args = add_auroc_arguments(argparse.ArgumentParser()).parse_args(
        ["--data", str(data), "--checkpoint", str(res.best), "--split", "all", "--n-boot", "20"])
    auroc_cli(args)  # layout detected from stage_2_train_labels.csv
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| best.pt")]
    assert len(rows) == 2 and "| Pneumonia |" in rows[0] and "all (24 images" in rows[0]
