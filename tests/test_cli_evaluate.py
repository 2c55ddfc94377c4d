"""``cxr-explain evaluate`` end to end on a tiny synthetic benchmark and a small ResNet-18 checkpoint:
its flags, films that fail, the conservation column, the run record's warning."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr_explain.cli import main
from cxr_explain.data.phantom import generate
from cxr_explain.models import build_model
from cxr_explain.models.checkpoints import save_checkpoint
from cxr_explain.models.default import synthetic_model_warning
from cxr_explain.models.zoo import BENCHMARK_LABELS
from cxr_explain.results import ROW_KEY, read_results

SIZE = 64  # films and model input: the maps need no resize, the run stays cheap


def _checkpoint(path: Path, provenance: dict) -> Path:
    import torch

    torch.manual_seed(0)
    model = build_model("resnet18", labels=list(BENCHMARK_LABELS), in_channels=1, preprocessing="gray",
                        input_size=SIZE, provenance=provenance)
    return save_checkpoint(path, model)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    """One phantom data folder, a copy of it that is not a benchmark (no phantom.json), and two
    checkpoints (random weights; one whose provenance says it was trained on the benchmark)."""
    root = tmp_path_factory.mktemp("cli_eval")
    data = root / "phantom"
    generate(data, 8, seed=3, size=SIZE, workers=1, progress=False)
    other = root / "not_a_benchmark"
    shutil.copytree(data, other)
    (other / "phantom.json").unlink()
    return {"data": data, "other": other,
            "ckpt": _checkpoint(root / "plain.pt", {"weights": "random"}),
            "synthetic": _checkpoint(root / "synthetic.pt", {"phantom": {"seed": 3, "n": 8}})}


def _evaluate(bench: dict, out: Path, *extra: str, data: Path | None = None, ckpt: str = "ckpt",
              methods: tuple[str, ...] = ("cam", "lrp")) -> int:
    return main(["evaluate", "--data", str(data or bench["data"]), "--checkpoint", str(bench[ckpt]),
                 "--methods", *methods, "--out", str(out), "--max-images", "3", "--batch-size", "2",
                 "--no-progress", "--threads", "1", *extra])


@pytest.mark.parametrize("flags", [(), ("--no-masks",), ("--no-report",), ("--no-maps",),
                                   ("--no-masks", "--no-report"), ("--no-report", "--no-maps"),
                                   ("--no-masks", "--no-maps"), ("--no-masks", "--no-report", "--no-maps")],
                         ids=lambda f: "+".join(f) or "defaults")
def test_flags_and_their_combinations_exit_0(bench, tmp_path, flags, capsys):
    out = tmp_path / "out"
    assert _evaluate(bench, out, *flags) == 0
    df = read_results(out / "results.csv")
    assert len(df) > 0 and set(df["method"]) == {"cam", "lrp"}
    assert ("mask" in set(df["gt"])) != ("--no-masks" in flags)
    assert (out / "report.html").is_file() != ("--no-report" in flags)
    assert (out / "tables" / "table2_all_box.md").is_file()
    assert bool(list(out.glob("maps/*/*.npz"))) != ("--no-maps" in flags)
    assert (df["map_file"] == "").all() == ("--no-maps" in flags)
    assert "Table 2" in capsys.readouterr().out


def _corrupt_copy(bench: dict, where: Path) -> tuple[Path, Path]:
    """A copy of the data whose first boxed film is not a PNG any more."""
    from cxr_explain.data.nih import NIHDataset

    data = where / "data"
    shutil.copytree(bench["data"], data)
    ds = NIHDataset(data, boxed_only=True, findings=list(BENCHMARK_LABELS))
    bad = Path(ds.samples[0].path)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this film was cut short")
    return data, bad


def test_unreadable_film_is_recorded_and_the_run_goes_on(bench, tmp_path, capsys):
    data, bad = _corrupt_copy(bench, tmp_path)
    out = tmp_path / "out"
    assert _evaluate(bench, out, "--no-report", "--chexlocalize", "--intention", "Nodule", data=data) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if bad.name in ln and "read failed" in ln]
    assert len(lines) == 1
    failures = pd.read_csv(out / "failures.csv")
    assert list(failures.columns) == ["file", "stage", "reason"]
    assert len(failures) == 1 and failures["stage"][0] == "read" and Path(failures["file"][0]).name == bad.name
    assert "\n" not in failures["reason"][0] and failures["reason"][0]
    df = read_results(out / "results.csv")
    assert len(df) > 0 and bad.stem not in set(df["image_id"])  # the other films were scored
    assert df["image_id"].nunique() == 2  # --max-images 3 counts the failed film
    records = pd.read_csv(out / "chexlocalize_records.csv")  # the whole-set protocol leaves it out too
    assert len(records) and bad.name not in set(records["image_id"]) and (out / "tables" / "chexlocalize.md").is_file()
    shares = pd.read_csv(out / "intention.csv")
    assert len(shares) and bad.name not in set(shares["image_id"])

    # fail-fast: the same film stops the run with one line and exit status 2
    out2 = tmp_path / "out2"
    assert _evaluate(bench, out2, "--no-report", "--stop-on-error", data=data) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and bad.name in err and len(err.strip().splitlines()) == 1
    assert not len(read_results(out2 / "results.csv"))


def test_conservation_error_column_and_its_summary(bench, tmp_path):
    out = tmp_path / "eval"
    assert _evaluate(bench, out, "--no-masks", "--no-maps", methods=("cam", "lrp", "rap")) == 0
    df = read_results(out / "results.csv")
    cam, lrp = df[df["method"] == "cam"], df[df["method"] == "lrp"]
    assert cam["conservation_error"].isna().all()  # CAM promises nothing: empty
    assert np.isfinite(lrp["conservation_error"]).all() and (lrp["conservation_error"] < 1e-5).all()
    # the summary: the distribution per method (median, max over explained maps), none for CAM
    table = pd.read_csv(out / "tables" / "conservation.csv")  # full precision (the JSON keeps 10 decimals)
    got = {r["method"]: r for r in table.to_dict("records")}
    assert set(got) == {"lrp", "rap"}
    per_map = lrp.drop_duplicates(["image_id", "finding"])["conservation_error"].to_numpy()
    assert got["lrp"]["n"] == len(per_map)
    np.testing.assert_allclose([got["lrp"]["median"], got["lrp"]["max"]], [np.median(per_map), per_map.max()])
    assert "Conservation error per method" in (out / "report.html").read_text()


def _tiny_vit():
    """torchvision's ViT at 32 px with a non-zero head: AttnLRP's ε-rule lets biases absorb
    relevance, so each map has a real conservation error (CNN methods conserve to rounding)."""
    import torch
    from torchvision.models.vision_transformer import VisionTransformer

    from cxr_explain.models.zoo import ModelSpec

    torch.manual_seed(0)
    m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                          num_classes=len(BENCHMARK_LABELS))
    with torch.no_grad():
        m.heads.head.weight.normal_(0, 0.5)
        m.heads.head.bias.normal_(0, 0.1)
    m.cxr_spec = ModelSpec(arch="tiny-vit", labels=list(BENCHMARK_LABELS), preprocessing="imagenet-rgb", input_size=32)
    return m.eval()


def test_conservation_error_column_matches_explain(bench, tmp_path):
    """The column holds what ``explain`` reports for the same film and finding, explained alone."""
    from cxr_explain import explain
    from cxr_explain.data.images import get_preprocessing
    from cxr_explain.data.nih import NIHDataset
    from cxr_explain.evaluation import evaluate

    ds = NIHDataset(bench["data"], boxed_only=True, findings=list(BENCHMARK_LABELS))
    evaluate(_tiny_vit(), ds, ("attnlrp",), out_dir=tmp_path, batch_size=4, progress=False, use_masks=False,
             save_maps=False, max_images=4)
    df = read_results(tmp_path / "results.csv").drop_duplicates(["image_id", "finding"])
    assert len(df) >= 4 and (df["conservation_error"] > 1e-3).all()
    pre = get_preprocessing("imagenet-rgb", 32)
    model = _tiny_vit()
    for _, row in df.iterrows():
        i = next(k for k, s in enumerate(ds.samples) if s.image_id == row["image_id"])
        e = explain(model, pre(ds.read_image(i))[0][None], "attnlrp", target=row["finding"], check_conservation=False)
        np.testing.assert_allclose(row["conservation_error"], float(e.conservation_error[0]), rtol=1e-4)


def test_run_record_keeps_the_synthetic_model_warning(bench, tmp_path):
    import torch

    out = tmp_path / "other"
    with pytest.warns(UserWarning) as caught:
        assert _evaluate(bench, out, "--no-report", "--no-maps", data=bench["other"], ckpt="synthetic",
                         methods=("cam",)) == 0
    model = build_model("resnet18", labels=list(BENCHMARK_LABELS), in_channels=1, preprocessing="gray",
                        input_size=SIZE, provenance=torch.load(bench["synthetic"], weights_only=True)["provenance"])
    line = synthetic_model_warning(model, [bench["other"]], shipped=False)
    assert line and json.loads((out / "run.json").read_text())["warnings"] == [line]
    assert line in [str(w.message) for w in caught]
    film = next((bench["other"] / "images").glob("*.png"))  # explain records the same line
    assert main(["explain", str(film), "--checkpoint", str(bench["synthetic"]), "--method", "cam",
                 "--out", str(tmp_path / "explain"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "explain" / "run.json").read_text())["warnings"] == [line]

    out = tmp_path / "bench"  # on its own benchmark the model warns about nothing
    assert _evaluate(bench, out, "--no-report", "--no-maps", ckpt="synthetic", methods=("cam",)) == 0
    assert json.loads((out / "run.json").read_text())["warnings"] == []


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_give_one_process_rows(bench, tmp_path):
    """``torchrun --nproc_per_node 2`` (gloo, CPU) over the CLI, with the whole-set CheXlocalize
    analysis: exit 0, rank 0 alone writes the tables and the report, rows equal to one process's
    (float64)."""
    import os
    import subprocess
    import sys


    args = ["evaluate", "--data", str(bench["data"]), "--checkpoint", str(bench["ckpt"]), "--methods", "cam", "lrp",
            "--max-images", "4", "--batch-size", "2", "--no-progress", "--dtype", "float64", "--chexlocalize",
            "--threads", "1", "--no-report"]  # the tables are what two writers raced on; the report is rank 0's too
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", "-m", "cxr_explain.cli", *args, "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("### Table 2 —") == 1  # rank 0 only
    two = tmp_path / "two"
    assert not list(two.glob("*.rank*.csv")) and not list(two.glob("**/*.tmp"))
    assert (two / "tables" / "chexlocalize.md").is_file() and (two / "tables" / "table2_all_box.md").is_file()
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    got, want = (read_results(p / "results.csv").sort_values(ROW_KEY).reset_index(drop=True)
                 for p in (two, tmp_path / "one"))
    assert got["image_id"].nunique() >= 2  # both ranks had films
    records = [pd.read_csv(p / "chexlocalize_records.csv") for p in (two, tmp_path / "one")]
    assert len(records[0]) == len(records[1]) and not records[0].duplicated(ROW_KEY).any()  # one writer
    pd.testing.assert_frame_equal(got.drop(columns=["map_file"]), want.drop(columns=["map_file"]),
                                  check_exact=False, rtol=1e-9, atol=1e-12)
    # every film's outputs logged once (the ranks' logs merged), as one process logs them
    logits = [pd.read_csv(p / "logits.csv").sort_values("image_id").reset_index(drop=True) for p in (two, tmp_path / "one")]
    assert len(logits[0]) == got["image_id"].nunique()
    pd.testing.assert_frame_equal(logits[0], logits[1], check_exact=False, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bad, says", [(["--methods", "lrpp"], "lrpp"), (["--thresholds", "1.5"], "[0, 1)"),
                                       (["--batch-size", "0"], "--batch-size"), (["--out", "FILE"], "is a file"),
                                       (["--checkpoint", "NOTCKPT"], "NOTCKPT"), (["--device", "cuda:7"], "cuda"),
                                       (["--workers", "-1"], "--workers -1")])
def test_bad_options_stop_before_the_model_loads(bench, tmp_path, monkeypatch, capsys, bad, says):
    import cxr_explain.commands as commands

    def no_loading(args):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(commands, "load_model_from_args", no_loading)
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "NOTCKPT").write_text("not a checkpoint")
    bad = [str(tmp_path / b) if b in ("FILE", "NOTCKPT") else b for b in bad]
    argv = ["evaluate", "--data", str(bench["data"]), "--out", str(tmp_path / "out"), "--no-progress", *bad]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and says in err, err


def test_a_rerun_with_other_scoring_settings_stops_before_the_model_loads(bench, tmp_path, monkeypatch, capsys):
    import cxr_explain.commands as commands

    out = tmp_path / "out"
    assert _evaluate(bench, out, "--no-report", "--no-maps", "--thresholds", "0.2", methods=("cam",)) == 0
    monkeypatch.setattr(commands, "load_model_from_args", lambda args: pytest.fail("model loaded"))
    capsys.readouterr()
    assert _evaluate(bench, out, "--no-report", "--thresholds", "0.3", methods=("cam",)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "another thresholds" in err and "[0.2]" in err


def test_metrics_option_computes_only_the_scores_asked_for_and_a_rerun_must_keep_them(bench, tmp_path, monkeypatch,
                                                                                      capsys):
    """``--metrics hit mass``: IoU at every T as always, hit and mass, the other columns empty and
    left out of the tables; the same films with every metric give the same IoU, hit and mass."""
    import cxr_explain.commands as commands

    part, full = tmp_path / "part", tmp_path / "full"
    assert _evaluate(bench, part, "--no-report", "--no-maps", "--metrics", "hit", "mass", methods=("cam",)) == 0
    assert _evaluate(bench, full, "--no-report", "--no-maps", methods=("cam",)) == 0
    got, want = (read_results(p / "results.csv").sort_values(ROW_KEY).reset_index(drop=True) for p in (part, full))
    assert got[["otsu_t", "iou_otsu", "rank_acc", "auprc"]].isna().all().all()
    assert want[["otsu_t", "iou_otsu", "rank_acc", "auprc"]].notna().all().all()
    same = [c for c in got.columns if c.startswith("iou@")] + ["hit"]
    pd.testing.assert_frame_equal(got[same], want[same])
    np.testing.assert_allclose(got["mass"], want["mass"], rtol=1e-12)
    table = (part / "tables" / "metrics_all_mask.md").read_text()
    assert "| mass |" in table and "| AUPRC |" not in table and "| rank acc. |" not in table
    assert "| AUPRC |" in (full / "tables" / "metrics_all_mask.md").read_text()
    monkeypatch.setattr(commands, "load_model_from_args", lambda args: pytest.fail("model loaded"))
    capsys.readouterr()
    assert _evaluate(bench, part, "--no-report", methods=("cam",)) == 2  # every metric now: not the recorded ones
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "another metrics" in err, err
    assert _evaluate(bench, part, "--no-report", "--metrics", "auprc2", methods=("cam",)) == 2
    assert "unknown metric 'auprc2'" in capsys.readouterr().err
