"""CheXpert and MIMIC-CXR-JPG label readers: uncertainty policy, views, image paths, bad files."""
from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_explain.data.chexpert import (
    CHEXPERT_LABELS,
    CheXpertDataset,
    apply_uncertainty,
    chexpert_image_id,
    read_chexpert_csv,
)
from cxr_explain.data.mimic import MIMICDataset, mimic_image_path, read_mimic_labels, read_mimic_split
from cxr_explain.errors import DataError

HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_LABELS)


def one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def _png(path: Path, h: int = 12, w: int = 10, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w), value, dtype=np.uint8)).save(path)
    return path


def _row(path: str, labels: dict, view: str = "Frontal", ap: str = "AP") -> str:
    cells = [labels.get(c, "") for c in CHEXPERT_LABELS]
    return ",".join([path, "Female", "68", view, ap if view == "Frontal" else ""] + cells)


# ------------------------------------------------------------------------------------ CheXpert
def test_image_id_is_chexlocalize_spelling():
    assert chexpert_image_id("CheXpert-v1.0/valid/patient64541/study1/view1_frontal.jpg") == \
        "patient64541_study1_view1_frontal"
    assert chexpert_image_id("patient1\\study2\\view2_lateral.png") == "patient1_study2_view2_lateral"
    with pytest.raises(ValueError):
        chexpert_image_id("study1/view1_frontal.jpg")


def test_uncertainty_policies():
    raw = np.array([[1, 0, -1, np.nan]], dtype=np.float32)
    assert apply_uncertainty(raw, "ones").tolist() == [[1, 0, 1, 0]]
    assert apply_uncertainty(raw, "zeros").tolist() == [[1, 0, 0, 0]]
    ign = apply_uncertainty(raw, "ignore")
    assert ign[0, :2].tolist() == [1, 0] and np.isnan(ign[0, 2]) and ign[0, 3] == 0
    with pytest.raises(DataError):
        apply_uncertainty(raw, "u-ones")


@pytest.fixture()
def chexpert_root(tmp_path):
    """CheXpert's download layout with a renamed top folder: CSV paths say CheXpert-v1.0-small/..."""
    root = tmp_path / "my_chexpert"
    rows = [
        _row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
             {"Cardiomegaly": "1.0", "Edema": "-1.0", "Pleural Effusion": "0.0"}),
        _row("CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg", {"Cardiomegaly": "1.0"},
             view="Lateral"),
        _row("CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg", {"No Finding": "1.0"}, ap="PA"),
        _row("CheXpert-v1.0-small/train/patient00003/study4/view1_frontal.jpg", {"Edema": "1"}),
    ]
    (root).mkdir()
    (root / "train.csv").write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    (root / "valid.csv").write_text(HEADER + "\n" + _row(
        "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", {"Cardiomegaly": "1.0"}) + "\n")
    for r in rows[:3]:
        _png(root / r.split(",")[0].split("/", 1)[1])  # train/patient.../view.jpg (PNG bytes: any reader)
    _png(root / "valid" / "patient64541" / "study1" / "view1_frontal.jpg")
    return root


def test_read_chexpert_csv_codes_views_and_ids(chexpert_root):
    t = read_chexpert_csv(chexpert_root / "train.csv")
    assert t.findings == CHEXPERT_LABELS
    assert list(t.rows["image_id"]) == ["patient00001_study1_view1_frontal", "patient00001_study1_view2_lateral",
                                        "patient00002_study1_view1_frontal", "patient00003_study4_view1_frontal"]
    assert list(t.rows["view"]) == ["frontal", "lateral", "frontal", "frontal"]
    card, edema, eff = (CHEXPERT_LABELS.index(n) for n in ("Cardiomegaly", "Edema", "Pleural Effusion"))
    assert t.raw[0, card] == 1 and t.raw[0, edema] == -1 and t.raw[0, eff] == 0
    assert np.isnan(t.raw[0, CHEXPERT_LABELS.index("Fracture")])
    assert t.labels("ones")[0, edema] == 1 and t.labels("zeros")[0, edema] == 0
    assert np.isnan(t.labels("ignore")[0, edema]) and t.labels("ignore")[0, eff] == 0


def test_chexpert_dataset_resolves_renamed_folder_and_filters_views(chexpert_root):
    with pytest.warns(UserWarning, match="1 images listed in the label CSV have no file"):
        ds = CheXpertDataset(chexpert_root, split="train", findings=["Cardiomegaly", "Edema"], uncertain="zeros")
    assert ds.ids == ["patient00001_study1_view1_frontal", "patient00002_study1_view1_frontal"]
    assert ds.missing == ["patient00003_study4_view1_frontal"]
    assert ds.samples[0].labels.tolist() == [1.0, 0.0]  # Edema -1 -> 0 under U-Zeros
    assert ds.samples[0].view == "AP" and ds.samples[1].view == "PA" and ds.samples[0].patient_id == "patient00001"
    assert ds.samples[0].path == chexpert_root / "train" / "patient00001" / "study1" / "view1_frontal.jpg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lat = CheXpertDataset(chexpert_root, split="train", views="lateral")
        both = CheXpertDataset(chexpert_root, split=None, views="all")
    assert lat.ids == ["patient00001_study1_view2_lateral"] and lat.samples[0].view == "Lateral"
    assert len(lat.findings) == 14
    assert both.image_split == {"patient00001_study1_view1_frontal": "train", "patient00001_study1_view2_lateral": "train",
                                "patient00002_study1_view1_frontal": "train", "patient64541_study1_view1_frontal": "val"}
    val = CheXpertDataset(chexpert_root, split="valid")
    assert val.ids == ["patient64541_study1_view1_frontal"] and val.read_image(0).height == 12


def test_chexpert_scan_fallback_finds_images_by_id(tmp_path):
    root = tmp_path / "c"
    (root).mkdir()
    (root / "valid.csv").write_text(HEADER + "\n" + _row("elsewhere/x/patient7/study1/view1_frontal.jpg",
                                                          {"Edema": "1"}) + "\n")
    _png(root / "images" / "deep" / "patient7" / "study1" / "view1_frontal.png")
    ds = CheXpertDataset(root, split="val")
    assert ds.samples[0].path.name == "view1_frontal.png"


def test_chexpert_bad_files_give_one_line_errors(tmp_path):
    bad = tmp_path / "valid.csv"
    bad.write_text(HEADER + "\n" + _row("valid/patient1/study1/view1_frontal.jpg", {"Edema": "2"}) + "\n")
    with pytest.raises(DataError) as e:
        read_chexpert_csv(bad)
    msg = one_line(e)
    assert str(bad) in msg and "line 2" in msg and "'Edema'" in msg and "'2'" in msg
    bad.write_text(HEADER + "\n" + _row("view1_frontal.jpg", {}) + "\n")
    with pytest.raises(DataError, match="line 2.*patient/study/view"):
        read_chexpert_csv(bad)
    r = _row("valid/patient1/study1/view1_frontal.jpg", {})
    bad.write_text(HEADER + "\n" + r + "\n" + r + "\n")
    with pytest.raises(DataError, match="line 3.*appears twice"):
        read_chexpert_csv(bad)
    bad.write_text("Path,Sex\nvalid/patient1/study1/view1_frontal.jpg,Male\n")
    with pytest.raises(DataError, match="no label columns"):
        read_chexpert_csv(bad)
    bad.write_text(HEADER + "\n" + r + "\n")
    with pytest.raises(DataError) as e:
        CheXpertDataset(tmp_path, split="val", findings=["Effusion"])
    assert "did you mean 'Pleural Effusion'" in one_line(e)
    with pytest.raises(DataError, match="no test label CSV"):
        CheXpertDataset(tmp_path, split="test")


# ------------------------------------------------------------------------------------ MIMIC
def test_mimic_reader(tmp_path):
    root = tmp_path / "mimic"
    root.mkdir()
    names = sorted(CHEXPERT_LABELS)
    lab = "subject_id,study_id," + ",".join(names) + "\n"
    lab += "10000032,50414267," + ",".join("1.0" if n == "Edema" else ("-1.0" if n == "Atelectasis" else "")
                                          for n in names) + "\n"
    lab += "10000033,50414268," + ",".join("1.0" if n == "No Finding" else "" for n in names) + "\n"
    with gzip.open(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "wt") as fh:
        fh.write(lab)
    (root / "mimic-cxr-2.0.0-split.csv").write_text(
        "dicom_id,study_id,subject_id,split\n"
        "d1,50414267,10000032,test\n"  # frontal
        "d2,50414267,10000032,test\n"  # lateral
        "d3,50414268,10000033,validate\n"
        "d4,50414269,10000034,test\n")  # study without labels
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text(
        "dicom_id,subject_id,study_id,ViewPosition\nd1,10000032,50414267,PA\nd2,10000032,50414267,LATERAL\n"
        "d3,10000033,50414268,AP\nd4,10000034,50414269,PA\n")
    for d, s, st in (("d1", "10000032", "50414267"), ("d2", "10000032", "50414267"), ("d3", "10000033", "50414268")):
        _png(mimic_image_path(root, s, st, d))
    assert mimic_image_path(root, "10000032", "50414267", "d1") == root / "files/p10/p10000032/s50414267/d1.jpg"
    cols, studies = read_mimic_labels(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert cols == tuple(names) and studies[("10000032", "50414267")][names.index("Atelectasis")] == -1
    assert read_mimic_split(root / "mimic-cxr-2.0.0-split.csv")[2] == ("d3", "10000033", "50414268", "val")
    with pytest.warns(UserWarning, match="study without a label row"):
        ds = MIMICDataset(root, split="test", findings=["Atelectasis", "Edema"], uncertain="ignore")
    assert ds.ids == ["d1"] and ds.missing_rows == ["d4"] and ds.samples[0].view == "PA"
    assert np.isnan(ds.samples[0].labels[0]) and ds.samples[0].labels[1] == 1 and ds.samples[0].patient_id == "10000032"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        allv = MIMICDataset(root, split=None, views="all", findings=["Edema"])
    assert allv.ids == ["d1", "d2", "d3"] and allv.image_split["d3"] == "val"
    (root / "mimic-cxr-2.0.0-metadata.csv").unlink()
    with pytest.raises(DataError) as e:
        MIMICDataset(root, split="test")
    assert "metadata" in one_line(e) and "views='all'" in str(e.value)


