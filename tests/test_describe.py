"""The run's description for the report header: films (synthetic or not), checkpoint, notes."""
from __future__ import annotations

import json

import pytest

from cxr_explain.data.nih import NIHDataset
from cxr_explain.data.phantom import benchmark_info, benchmark_root, generate
from cxr_explain.data.phantom_export import export_chexlocalize
from cxr_explain.errors import CxrExplainError
from cxr_explain.evaluation.describe import checkpoint_info, describe_run, films_info
from cxr_explain.models.checkpoints import file_sha256, save_checkpoint
from cxr_explain.models.zoo import build_model
from cxr_explain.results.run import load_run, record_about, record_run


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    generate(root, 6, seed=3, size=64, workers=1, progress=False)
    return root


def test_films_of_the_benchmark_and_of_its_chexlocalize_copy(bench, tmp_path):
    info = films_info(NIHDataset(bench))
    assert info["synthetic"] and info["seed"] == 3 and info["size"] == 64 and not info["export"]
    assert info["reader"] == "NIH dataset" and info["folder"] == bench.name
    copy = export_chexlocalize(bench, tmp_path / "cxl")
    meta = benchmark_info(copy / "CheXpert" / "val_labels.csv")
    assert meta["seed"] == 3 and meta["export"] is True and benchmark_root(copy) == copy.resolve()
    assert str(tmp_path) not in (copy / "chexlocalize_export.json").read_text()  # no machine path in the copy
    from cxr_explain.models.default import synthetic_model_warning

    trained = build_model("resnet18", labels=["Mass"], provenance={"phantom": {"seed": 3}})
    assert synthetic_model_warning(trained, [copy]) is None  # the copy is still the synthetic benchmark
    assert synthetic_model_warning(trained, [tmp_path]) is not None


def test_films_that_are_not_the_benchmark(tmp_path):
    (tmp_path / "phantom.json").write_text(json.dumps({"generator": "someone-else/2", "seed": 1}))

    class Plain:
        name, root = "folder dataset", tmp_path

    info = films_info(Plain())
    assert info == {"reader": "folder dataset", "folder": tmp_path.name, "synthetic": False}


def test_checkpoint_info_names_the_file_not_its_folder(tmp_path):
    model = build_model("resnet18", labels=["a", "b"])
    path = save_checkpoint(tmp_path / "deep" / "m.pt", model)
    assert checkpoint_info(model, path) == {"file": "m.pt", "sha256": file_sha256(path), "shipped": False}
    model.cxr_spec.provenance = {"file": str(path.resolve()), "sha256": "ab" * 32}
    assert checkpoint_info(model) == {"file": "m.pt", "sha256": "ab" * 32, "shipped": False}
    assert checkpoint_info(build_model("resnet18", labels=["a"]))["file"] == ""


def test_record_about_adds_the_description_to_run_json(bench, tmp_path):
    with pytest.raises(CxrExplainError, match="no run record"):
        record_about(tmp_path, {"x": 1})
    record_run(tmp_path, {"methods": ["cam"], "thresholds": [0.1]})
    model = build_model("resnet18", labels=["Mass"], provenance={"phantom": {"seed": 3, "n": 6, "size": 64}})
    about = describe_run(model, NIHDataset(bench), notes=["careful: /home/me/x.png is odd", ""])
    run = record_about(tmp_path, about)
    assert load_run(tmp_path) == run and run["methods"] == ["cam"]
    assert run["about"]["notes"] == ["careful: x.png is odd"]
    assert run["about"]["training_data"].startswith("synthetic benchmark films only (cxr-explain phantom, seed 3")
    assert run["about"]["films"]["synthetic"] is True
