"""No training-machine paths in what ships or what a report shows; training data said in words."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cxr_explain.models.provenance import strip_machine_paths, training_data_text

ROOT = Path(__file__).resolve().parents[1]
MACHINE_PATH = re.compile(r"(?<![\w.:/~-])(/(work|tmp|home|Users|root|mnt|data|scratch)/|[A-Za-z]:\\\\Users)")


def test_strip_machine_paths_keeps_the_last_component_only():
    cmd = "train --data /work/runs_v2/bench_nih_s0_128 --layout nih --out /tmp/x/default_densenet121/"
    assert strip_machine_paths(cmd) == "train --data bench_nih_s0_128 --layout nih --out default_densenet121"
    assert strip_machine_paths("C:\\Users\\me\\best.pt") == "best.pt"
    assert strip_machine_paths({"a": ["'/home/u/m.pt'", 3], "b": ("x=/a/b",)}) == {"a": ["'m.pt'", 3], "b": ("x=b",)}
    for keep in ("https://example.org/a/b", "docs/evaluation.md §1", "cpu x2", "1/3", "runs/bench"):
        assert strip_machine_paths(keep) == keep


def test_training_data_text():
    prov = {"phantom": {"seed": 0, "n": 3000, "size": 128, "shortcut": None}, "n_train": 2132, "n_val": 316,
            "data": "/work/runs/bench"}
    assert training_data_text(prov) == ("synthetic benchmark films only (cxr-explain phantom, seed 0, 3000 films, "
                                        "128 px); 2132 training / 316 validation films; no real radiograph")
    assert "planted 'marker' shortcut" in training_data_text({"phantom": {"seed": 1, "shortcut": "marker"}})
    assert training_data_text({"data": "/home/me/nih", "layout": "nih"}) == "'nih', nih layout"
    assert training_data_text({"source": "torchxrayvision densenet", "weights": "densenet121-res224-nih"}) == \
        "torchxrayvision densenet (densenet121-res224-nih)"
    assert training_data_text({"sha256": "ab"}) == "not recorded in the checkpoint"


def test_shipped_model_and_its_card_hold_no_machine_path():
    from cxr_explain.models.default import default_model_info, load_default_model

    prov = load_default_model().cxr_spec.provenance
    text = json.dumps(prov)
    assert prov.get("command") and not MACHINE_PATH.search(text), text
    info = default_model_info()
    assert not MACHINE_PATH.search(json.dumps({k: info[k] for k in ("card", "provenance")}))
    assert training_data_text(prov).startswith("synthetic benchmark films only (cxr-explain phantom, seed 0, 3000 films")


@pytest.mark.skipif(not (ROOT / "docs").is_dir(), reason="needs the source tree (docs/, scripts/)")
def test_no_machine_paths_in_shipped_text_files():
    files = [ROOT / n for n in ("README.md", "BENCHMARKS.md", "pyproject.toml") if (ROOT / n).is_file()]
    for d in ("src", "docs", "scripts", "benchmarks"):
        files += [p for p in (ROOT / d).rglob("*") if p.suffix in {".py", ".md", ".sh", ".j2", ".toml", ".txt", ".json"}]
    assert len(files) > 20
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in files
           for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
           if MACHINE_PATH.search(line) and p.name != "test_provenance.py"]
    assert bad == []


def test_the_shipped_checkpoint_file_holds_no_machine_path():
    """Not only its loaded provenance: the bytes a user downloads (pickled strings included)."""
    from cxr_explain.models.default import DEFAULT_ASSET

    data = (ROOT / "src" / "cxr_explain" / "assets" / DEFAULT_ASSET).read_bytes()
    assert not re.search(rb"/(work|home|root|tmp|Users)/[A-Za-z_]", data)
