"""`cxr-explain explain` as a batch: bad files are recorded and skipped, bad options refused before
the model loads, reruns resume only with the same settings, output names never collide."""
from __future__ import annotations

import csv
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

import cxr_explain.api as api
from cxr_explain.cli import main
from cxr_explain.models import build_model, save_checkpoint

DATA = Path(__file__).parent / "data"
NIH_PNG = DATA / "nih_png" / "00001369_000.png"  # RGBA, 1024 px
DICOM = DATA / "dicom" / "Fake_MONOHR1.dcm"


def _checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_model("resnet18", labels="chexnet", input_size=32)
    save_checkpoint(path, model, model.cxr_spec)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", seed=0)


def _film(path: Path, size: int = 64, seed: int = 0, **save) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = (120 + 60 * np.sin(xx / 7.0) * np.cos(yy / 9.0) + rng.normal(0, 8, (size, size))).clip(0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.astype(np.uint8)).save(path, **save)
    return path


def _dicom(path: Path, arr=None, **attrs) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    if arr is not None:
        ds.Rows, ds.Columns = arr.shape[:2]
        ds.SamplesPerPixel = 1 if arr.ndim == 2 else arr.shape[2]
        ds.PhotometricInterpretation = "MONOCHROME2" if arr.ndim == 2 else "RGB"
        if arr.ndim == 3:
            ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = arr.tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bad_corpus(folder: Path, extra: Path) -> dict[str, tuple[str, str]]:
    """Bad inputs: inside ``folder`` (found by the walk) and in ``extra`` (passed by name).
    Returns file -> (stage, a fragment of the reason)."""
    folder.mkdir(parents=True, exist_ok=True)
    extra.mkdir(parents=True, exist_ok=True)
    png = NIH_PNG.read_bytes()
    bad: dict[Path, tuple[str, str]] = {}

    def put(p: Path, data: bytes, stage: str, why: str) -> None:
        p.write_bytes(data)
        bad[p] = (stage, why)

    put(folder / "truncated.png", png[:3000], "read", "truncated or corrupt")
    put(folder / "zero_bytes.png", b"", "read", "cannot decode")
    put(folder / "notes.png", b"this is a text file, not an image\n", "read", "cannot decode")
    put(folder / "page.jpg", b"<html><body>not a jpeg</body></html>", "read", "cannot decode")
    put(folder / "corrupt.jpeg", b"\xff\xd8\xff\xe0" + os.urandom(600), "read", "cannot decode")
    tiny = io.BytesIO()
    Image.fromarray(np.full((2, 2), 128, np.uint8)).save(tiny, format="PNG")
    put(folder / "two_by_two.png", tiny.getvalue(), "read", "2×2 px")
    thin = io.BytesIO()
    Image.fromarray(np.full((500, 31), 128, np.uint8)).save(thin, format="PNG")
    put(folder / "thin.png", thin.getvalue(), "read", "at least 32 px")
    bomb = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))
    put(folder / "bomb.png", bomb, "read", "cannot decode")
    sub = folder / "dicoms"
    sub.mkdir()
    bad[_dicom(sub / "no_pixels.dcm")] = ("read", "no pixel data")
    bad[_dicom(sub / "report.dcm", Modality="SR")] = ("read", "no pixel data")
    bad[_dicom(sub / "ultrasound.dcm", np.zeros((64, 64, 3), np.uint8), Modality="US")] = ("read", "colour DICOM")
    bad[_dicom(sub / "cine.dcm", np.zeros((2, 64, 64), np.uint8).reshape(128, 64), NumberOfFrames=2)] = (
        "read", "multi-frame")
    put(sub / "truncated.dcm", DICOM.read_bytes()[: len(DICOM.read_bytes()) // 2], "read", "DICOM")
    put(sub / "garbage.dcm", b"\x00" * 128 + b"DICM" + os.urandom(300), "read", "DICOM")
    put(sub / "png_inside.dcm", png[:5000], "read", "DICOM")
    # passed by name
    put(extra / "scan.bmp", b"BM" + os.urandom(100), "read", "unknown image type")
    put(extra / "README", b"no extension, not DICOM\n", "read", "unknown image type")
    folder_png = extra / "folder.png"
    folder_png.mkdir()
    bad[folder_png] = ("input", "holds no image files")
    bad[extra / "missing.png"] = ("input", "not found")
    dangling = extra / "dangling.png"
    dangling.symlink_to(extra / "nowhere.png")
    bad[dangling] = ("read", "not found")
    if os.geteuid() != 0:  # root reads files whatever their mode: the case cannot be made there
        locked = _film(folder / "locked.png", seed=9)
        locked.chmod(0)
        bad[locked] = ("read", "ermission")
    return {str(p): v for p, v in bad.items()}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_corpus_every_good_file_written_every_bad_file_named_once(tmp_path, ckpt, capsys):
    folder, extra, out = tmp_path / "mixed", tmp_path / "extra", tmp_path / "out"
    bad = _bad_corpus(folder, extra)
    good = [_film(folder / "good_a.png", seed=1), _film(folder / "nested" / "good_b.jpg", seed=2, quality=90)]
    (folder / "nested" / "NIH.png").write_bytes(NIH_PNG.read_bytes())
    (folder / "nested" / "mono1.dcm").write_bytes(DICOM.read_bytes())
    good += [folder / "nested" / "NIH.png", folder / "nested" / "mono1.dcm"]
    by_name = [str(extra / n) for n in ("scan.bmp", "README", "folder.png", "missing.png", "dangling.png")]
    rc = main(["explain", str(folder), *by_name, "--checkpoint", str(ckpt), "--method", "cam,lrp",
               "--target", "Cardiomegaly", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 1
    assert "Traceback" not in cap.err + cap.out
    failures = _rows(out / "failures.csv")
    named = [f["file"] for f in failures]
    assert sorted(named) == sorted(bad), (sorted(set(named) ^ set(bad)))
    for f in failures:
        stage, why = bad[f["file"]]
        assert f["stage"] == stage and why in f["reason"], f
        assert sum(f["file"] in line for line in cap.err.splitlines()) == 1  # one stderr line each
    maps = _rows(out / "maps.csv")
    preds = _rows(out / "predictions.csv")
    for g in good:
        key = os.path.realpath(g)
        mine = [r for r in maps if r["file"] == key]
        assert sorted(r["method"] for r in mine) == ["cam", "lrp"] and {r["target"] for r in mine} == {"Cardiomegaly"}
        for r in mine:
            assert (out / r["map"]).is_file() and (out / r["overlay"]).is_file()
        assert len([r for r in preds if r["file"] == key]) == 14  # every output of the model
    assert {r["image"] for r in maps} == {"good_a", "nested/good_b", "nested/NIH", "nested/mono1"}
    assert f"{len(bad)} failed" in cap.out


def test_stop_on_error_restores_fail_fast(tmp_path, ckpt, capsys):
    a, b = _film(tmp_path / "in" / "a.png", seed=1), _film(tmp_path / "in" / "c.png", seed=2)
    broken = tmp_path / "in" / "b.png"
    broken.write_bytes(NIH_PNG.read_bytes()[:2000])
    rc = main(["explain", str(a), str(broken), str(b), "--checkpoint", str(ckpt), "--method", "cam",
               "--out", str(tmp_path / "out"), "--stop-on-error"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len([e for e in err if "error:" in e]) == 1 and "b.png" in err[-1]
    names = {r["image"] for r in _rows(tmp_path / "out" / "maps.csv")}
    assert names == {"a"}  # c.png, after the bad file, was not reached


# --------------------------------------------------------------------------- options
@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded although an option was bad")

    monkeypatch.setattr(api, "load_model", refuse)


def _bad_option_cases(tmp_path: Path, ckpt: Path) -> list[tuple[list[str], str]]:
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(2048))
    cases = [
        (["--out", str(a_file)], "is a file"),
        (["--device", "gpu0"], "not a device name"),
        (["--size", "0"], "at least 32 px"),
        (["--size", "7"], "at least 32 px"),
        (["--size", "-3"], "at least 32 px"),
        (["--target", "-1"], "negative"),
        (["--target", "Cardiomegaly,-2"], "negative"),
        (["--target", ""], "empty"),
        (["--checkpoint", str(junk)], "not a PyTorch checkpoint"),
        (["--checkpoint", str(tmp_path / "absent.pt")], "not found"),
        (["--method", "rapp"], "did you mean"),
        (["--method", "lrp-epsilon", "--method-option", "epsilon=abc"], "expected a float"),
        (["--method", "cam", "--method-option", "nosuch=1"], "no method run here has an option"),
        (["--preprocessing", "rgb"], "unknown preprocessing"),
        (["--threads", "0"], "1 or more"),
        (["--boxes", str(tmp_path / "absent.csv")], "box list not found"),
        (["--num-classes", "0"], "at least 1 output"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available"))
    return cases


def test_each_bad_option_is_one_line_exit_2_before_the_model_loads(tmp_path, ckpt, capsys, no_model):
    film = _film(tmp_path / "film.png")
    for extra, message in _bad_option_cases(tmp_path, ckpt):
        argv = ["explain", str(film), "--arch", "resnet18", "--out", str(tmp_path / "out"), *extra]
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if "error:" in line]
        assert rc == 2 and len(errors) == 1 and message in errors[0], (extra, err)
        assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "out" / "maps.csv").exists()


@pytest.mark.parametrize("extra, message", [
    (["--target", "99"], "out of range"),
    (["--target", "Cardiomegally"], "Cardiomegaly"),
    (["--method", "rsp"], "RSP is defined for plain"),
    (["--method", "lrp", "--target", "prob:Effusion"], "linear targets"),
    (["--method", "gradcam", "--layer", "layer9"], "layer9"),
    (["--preprocessing", "gray"], "1-channel inputs"),
])
def test_settings_the_model_refuses_stop_before_any_image(tmp_path, ckpt, capsys, extra, message):
    film = _film(tmp_path / "film.png")
    rc = main(["explain", str(film), "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert rc == 2 and len(errors) == 1 and message in errors[0], err
    assert not list((tmp_path / "out").glob("*.npy"))


def test_threads_option_sets_torch_threads(tmp_path, ckpt):
    before = torch.get_num_threads()
    try:
        assert main(["explain", str(_film(tmp_path / "f.png")), "--checkpoint", str(ckpt), "--method", "cam",
                     "--out", str(tmp_path / "out"), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- reruns
def _mtimes(folder: Path) -> dict[str, int]:
    """Modification times of the maps, overlays and tables (failures.csv is rewritten by every run)."""
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()
            if p.suffix in (".npy", ".png", ".csv") and p.name != "failures.csv"}


def test_rerun_resumes_with_same_settings_and_refuses_other_settings(tmp_path, ckpt, capsys):
    films = [_film(tmp_path / "in" / f"f{i}.png", seed=i) for i in range(2)]
    out = tmp_path / "out"
    base = ["explain", *map(str, films), "--checkpoint", str(ckpt), "--out", str(out), "--method", "cam,lrp-epsilon"]
    assert main(base) == 0  # target 'predicted': resolved per image, recorded in maps.csv
    first = _mtimes(out)
    capsys.readouterr()
    assert main(base) == 0
    assert "2 images already done" in capsys.readouterr().out
    assert _mtimes(out) == first  # nothing recomputed, nothing rewritten
    other_ckpt = _checkpoint(tmp_path / "other.pt", seed=1)
    for extra, message in [
        (["--dtype", "float64"], "dtype: 'float32' there, 'float64' now"),
        (["--method-option", "lrp-epsilon.epsilon=0.5"], "lrp-epsilon options epsilon: 0.25 there, 0.5 now"),
        (["--size", "64"], "size: 32 there, 64 now"),
        (["--target", "Effusion"], "targets"),
    ]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "--overwrite" in err and "another --out" in err, err
    argv = base[:]
    argv[argv.index(str(ckpt))] = str(other_ckpt)
    assert main(argv) == 2
    assert "model sha256" in capsys.readouterr().err
    assert _mtimes(out) == first
    # adding a method resumes: only the new one is computed
    assert main(base[:-1] + ["cam,lrp-epsilon,gradient"]) == 0
    after = _mtimes(out)
    assert all(after[n] == t for n, t in first.items() if n.endswith((".npy", ".png")))
    assert any(n.endswith("_gradient.npy") for n in after)
    # --overwrite recomputes with the new settings and records them
    assert main(base + ["--dtype", "float64", "--overwrite"]) == 0
    redone = _mtimes(out)
    assert all(redone[n] != t for n, t in first.items() if n.endswith(".npy"))
    assert not any(n.endswith("_gradient.npy") for n in redone)  # the earlier run's extra outputs are gone
    assert json.loads((out / "run.json").read_text())["dtype"] == "float64"


def test_same_named_files_in_two_folders_get_two_outputs(tmp_path, ckpt):
    a = _film(tmp_path / "data" / "a" / "x.png", seed=1)
    b = _film(tmp_path / "data" / "b" / "x.png", seed=2)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(ckpt), "--method", "cam", "--target", "Mass"]
    assert main(["explain", str(a), str(b), "--out", str(out), *argv]) == 0
    names = {r["file"]: r["image"] for r in _rows(out / "maps.csv")}
    assert len(set(names.values())) == 2 and all(n.startswith("x-") for n in names.values())
    maps = [np.load(out / f"{names[os.path.realpath(p)]}_Mass_cam.npy") for p in (a, b)]
    assert not np.array_equal(maps[0], maps[1])  # two images, two maps
    # a rerun with one of them keeps its name (and finds it done)
    assert main(["explain", str(b), "--out", str(out), *argv]) == 0
    assert {r["file"]: r["image"] for r in _rows(out / "maps.csv")} == names
    # a folder: names are paths below it
    out2 = tmp_path / "out2"
    assert main(["explain", str(tmp_path / "data"), "--out", str(out2), *argv]) == 0
    assert (out2 / "a" / "x_Mass_cam.png").is_file() and (out2 / "b" / "x_Mass_cam.png").is_file()


# --------------------------------------------------------------------------- what the outputs say
def test_predictions_csv_holds_every_output_with_its_probability(tmp_path, ckpt):
    film = _film(tmp_path / "f.png")
    out = tmp_path / "out"
    assert main(["explain", str(film), "--checkpoint", str(ckpt), "--method", "cam", "--out", str(out)]) == 0
    rows = _rows(out / "predictions.csv")
    model = api.load_model(str(ckpt))
    (img,) = api.load_images([film], model)
    with torch.no_grad():
        logits = model(img.tensor[None])[0].double()
    assert [r["finding"] for r in rows] == list(model.cxr_spec.labels)
    np.testing.assert_allclose([float(r["logit"]) for r in rows], logits.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([float(r["probability"]) for r in rows], torch.sigmoid(logits).numpy(), rtol=1e-5)
    top = model.cxr_spec.labels[int(logits.argmax())]
    (m,) = _rows(out / "maps.csv")
    assert m["target"] == top and abs(float(m["explained"]) - float(logits.max())) < 1e-4


def test_boxes_csv_draws_the_target_findings_boxes(tmp_path, ckpt):
    film = tmp_path / "in" / NIH_PNG.name
    film.parent.mkdir()
    film.write_bytes(NIH_PNG.read_bytes())
    boxes = tmp_path / "BBox_List.csv"
    boxes.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                     f"{NIH_PNG.name},Cardiomegaly,300,400,400,200\n{NIH_PNG.name},Mass,100,100,50,50\n")
    out = tmp_path / "out"
    assert main(["explain", str(film), "--checkpoint", str(ckpt), "--method", "cam", "--out", str(out),
                 "--target", "Cardiomegaly,Effusion", "--boxes", str(boxes)]) == 0

    def pure_red(name):
        rgb = np.asarray(Image.open(out / name))
        return int(((rgb[..., 0] == 255) & (rgb[..., 1] == 0) & (rgb[..., 2] == 0)).sum())

    stem = NIH_PNG.stem
    assert pure_red(f"{stem}_Cardiomegaly_cam.png") > 1000  # the box outline (a blend is never pure red)
    assert pure_red(f"{stem}_Effusion_cam.png") == 0  # no Effusion box; the Mass box is not drawn


def test_default_model_warns_once_on_real_films_and_records_it(tmp_path, recwarn):
    out = tmp_path / "out"
    films = [_film(tmp_path / "in" / "a.png", size=128, seed=1), _film(tmp_path / "in" / "b.png", size=128, seed=2)]
    assert main(["explain", *map(str, films), "--method", "cam", "--out", str(out)]) == 0
    lines = [str(w.message) for w in recwarn if "synthetic benchmark" in str(w.message)]
    assert len(lines) == 1 and "mean nothing" in lines[0] and "--checkpoint" in lines[0], lines
    record = json.loads((out / "run.json").read_text())
    assert record["warnings"] == lines
    assert record["model"]["checkpoint"].startswith("shipped default")
    # films of the benchmark itself: no warning
    recwarn.clear()
    bench = tmp_path / "bench"
    (bench / "images").mkdir(parents=True)
    (bench / "phantom.json").write_text(json.dumps({"generator": "cxr_explain.phantom/1", "seed": 0}))
    film = _film(bench / "images" / "p.png", size=128)
    assert main(["explain", str(film), "--method", "cam", "--out", str(tmp_path / "out2")]) == 0
    assert not [w for w in recwarn if "synthetic benchmark" in str(w.message)]
