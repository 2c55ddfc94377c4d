"""`cxr-explain explain` end to end on real files, and its one-line errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_explain.cli import main
from cxr_explain.models import build_model, save_checkpoint

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = build_model("resnet18", labels="chexnet", input_size=64)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model, model.cxr_spec)
    return path


def test_explain_writes_maps_and_overlays_for_png_and_dicom(tmp_path, checkpoint, capsys):
    png = next(DATA.glob("**/00001369_000.png"))  # an RGBA NIH image
    dcm = next(DATA.glob("**/Fake_MONOHR1.dcm"))
    rc = main(["explain", str(png), str(dcm), "--checkpoint", str(checkpoint), "--method", "lrp,rap,cam",
               "--target", "Cardiomegaly,Effusion", "--out", str(tmp_path), "--size", "64"])
    assert rc == 0
    for stem in ("00001369_000", "Fake_MONOHR1"):
        for label in ("Cardiomegaly", "Effusion"):
            for method in ("lrp", "rap", "cam"):
                h = np.load(tmp_path / f"{stem}_{label}_{method}.npy")
                assert h.shape == (64, 64) and np.isfinite(h).all()
                png_out = Image.open(tmp_path / f"{stem}_{label}_{method}.png")
                # the original film (1024 px) with a header above and a colour bar to its right
                assert png_out.size[0] > 1024 and png_out.size[1] > 1024 and png_out.mode == "RGB"
    # a rerun keeps what is there and computes nothing
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.suffix in (".npy", ".png")}
    assert main(["explain", str(png), str(dcm), "--checkpoint", str(checkpoint), "--method", "lrp,rap,cam",
                 "--target", "Cardiomegaly,Effusion", "--out", str(tmp_path), "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "2 images already done" in out
    assert out.count("cam: feature map of layer layer4 (channels-first)") == 1  # stated once
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.suffix in (".npy", ".png")} == before


@pytest.mark.parametrize("argv, message", [
    (["explain", "{png}", "--arch", "resnet18", "--method", "rapp"], "did you mean rap"),
    (["explain", "{png}", "--arch", "resnet18", "--target", "99"], "out of range"),
    (["explain", "{png}", "--arch", "densenet121", "--method", "rsp"], "RSP is defined for plain"),
])
def test_explain_errors_are_one_line_with_exit_code_2(tmp_path, capsys, argv, message):
    png = next(DATA.glob("**/00001369_000.png"))
    argv = [a.replace("{png}", str(png)) for a in argv] + ["--out", str(tmp_path), "--size", "32"]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and message in errors[0], err
    assert not any("Traceback" in line for line in err)


def test_truncated_or_missing_image_is_a_one_line_failure(tmp_path, capsys):
    png = next(DATA.glob("**/00001369_000.png"))
    bad = tmp_path / "broken.png"
    bad.write_bytes(png.read_bytes()[:2000])
    argv = ["explain", str(bad), "missing.png", "--arch", "resnet18", "--out", str(tmp_path), "--size", "32"]
    assert main(argv) == 1  # the run went through; some inputs failed
    err = capsys.readouterr().err.splitlines()
    assert len([e for e in err if "broken.png" in e]) == 1 and len([e for e in err if "missing.png" in e]) == 1
    assert not any("Traceback" in e for e in err)
