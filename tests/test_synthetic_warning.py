"""The one warning a synthetic-benchmark model gives when it is run on other films."""
from __future__ import annotations

import json

from cxr_explain.models import build_model
from cxr_explain.models.default import synthetic_model_warning, trained_on_benchmark


def _bench(root):
    (root / "images").mkdir(parents=True)
    (root / "phantom.json").write_text(json.dumps({"generator": "cxr_explain.phantom/1", "seed": 0, "n": 10}))
    film = root / "images" / "x.png"
    film.write_bytes(b"")
    return film


def test_warns_only_for_a_benchmark_model_outside_its_benchmark(tmp_path):
    synthetic = build_model("resnet18", labels="benchmark", provenance={"phantom": {"seed": 0, "n": 3000}})
    real = build_model("resnet18", labels="chexnet", provenance={"sha256": "ab" * 32})
    film = _bench(tmp_path / "bench")
    other = tmp_path / "nih" / "00000001_000.png"
    assert trained_on_benchmark(synthetic) and not trained_on_benchmark(real)
    assert synthetic_model_warning(synthetic, [film]) is None  # a film of the benchmark
    assert synthetic_model_warning(synthetic, [tmp_path / "bench"]) is None  # the benchmark folder
    line = synthetic_model_warning(synthetic, [film, other])  # one film that is not
    assert line and "\n" not in line and "mean nothing" in line and "--checkpoint" in line
    assert "shipped default" in synthetic_model_warning(synthetic, [other], shipped=True)
    assert synthetic_model_warning(real, [other]) is None
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "phantom.json").write_text(json.dumps({"generator": "someone-else/2"}))
    assert synthetic_model_warning(synthetic, [fake]) is not None  # not our generator's benchmark
