"""FolderDataset (any folder of images + optional CSV) and the shared dataset helpers."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_explain.data.folder import FolderDataset, patient_split
from cxr_explain.data.images import get_preprocessing
from cxr_explain.errors import DataError

DATA = Path(__file__).parent / "data"
DCM = DATA / "dicom" / "Fake_MONOHR1.dcm"


def one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def _folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    Image.fromarray(np.full((40, 30), 100, np.uint8)).save(root / "a.png")
    Image.fromarray(np.full((40, 30, 3), 50, np.uint8)).save(root / "sub" / "b.jpg")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / ".hidden" / "x.png")
    shutil.copy(DCM, root / "sub" / "c.dcm")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_without_csv(tmp_path):
    ds = FolderDataset(_folder(tmp_path))
    assert ds.ids == ["a.png", "sub/b.jpg", "sub/c.dcm"] and ds.findings == ()
    assert ds[0].labels.shape == (0,) and ds[2].boxes == []
    assert ds.read_image(1).pixels.shape == (40, 30)
    assert ds.read_image(2).pixels.shape == (1024, 1024)


def test_folder_with_labels_and_boxes(tmp_path):
    root = _folder(tmp_path)
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "image,labels,finding,x,y,w,h\n"
        "a.png,Mass|Effusion,Mass,1,2,10,12\n"
        "a.png,Mass|Effusion,Effusion,5,6,7,8\n"
        "b.jpg,No Finding,,,,,\n"
        "sub/c.dcm,Nodule,Nodule,100,200,30,40\n"
        "gone.png,Mass,,,,,\n"
    )
    with pytest.warns(UserWarning, match="1 images listed in the CSV were not found"):
        ds = FolderDataset(root, csv)
    assert ds.findings == ("Effusion", "Mass", "Nodule")
    assert ds.ids == ["a.png", "sub/b.jpg", "sub/c.dcm"] and ds.missing == ["gone.png"]
    a = ds[ds.index_of("a.png")]
    np.testing.assert_array_equal(a.labels, [1, 1, 0])
    assert [(b.finding, b.x, b.h) for b in a.boxes] == [("Mass", 1.0, 12.0), ("Effusion", 5.0, 8.0)]
    np.testing.assert_array_equal(ds[ds.index_of("sub/b.jpg")].labels, [0, 0, 0])
    np.testing.assert_array_equal(ds.label_matrix().sum(0), [1, 1, 1])
    # a DataLoader-ready view
    view = ds.with_preprocessing(get_preprocessing("gray", size=16))
    x, y, i = view[0]
    assert x.shape == (1, 16, 16) and torch.allclose(x, torch.full_like(x, 100 / 255)) and i == 0
    assert y.tolist() == [1.0, 1.0, 0.0]


def test_folder_given_findings_rejects_unknown_label(tmp_path):
    root = _folder(tmp_path)
    csv = tmp_path / "labels.csv"
    csv.write_text("image,labels\na.png,Pneumonai\n")
    with pytest.raises(DataError) as e:
        FolderDataset(root, csv, findings=["Pneumonia", "Mass"])
    msg = one_line(e)
    assert "labels.csv" in msg and "'Pneumonai'" in msg and "did you mean 'Pneumonia'" in msg


@pytest.mark.parametrize(
    "text, what",
    [
        ("image,labels,finding,x,y,w\na.png,Mass,Mass,1,2,3\n", "missing column 'h'"),
        ("name,labels\na.png,Mass\n", "missing column 'image'"),
        ("image,finding,x,y,w,h\na.png,Mass,1,2,-3,4\n", "non-positive size"),
        ("image,finding,x,y,w,h\na.png,Mass,1,two,3,4\n", "not a number"),
    ],
)
def test_folder_csv_errors(tmp_path, text, what):
    root = _folder(tmp_path / "f")
    csv = tmp_path / "labels.csv"
    csv.write_text(text)
    with pytest.raises(DataError) as e:
        FolderDataset(root, csv)
    assert "labels.csv" in one_line(e) and what in str(e.value)


def test_folder_ambiguous_name_and_empty_folder(tmp_path):
    root = _folder(tmp_path / "f")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "sub" / "a.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("image,labels\na.png,Mass\nsub/a.png,Mass\n")
    ds = None
    with pytest.warns(UserWarning, match="no CSV row"):
        ds = FolderDataset(root, csv)  # 'a.png' exists at the top: exact relative path wins
    assert ds.ids == ["a.png", "sub/a.png"] and ds.unlabelled == ["sub/b.jpg", "sub/c.dcm"]
    csv.write_text("image,labels\nb.jpg,Mass\n")
    (root / "sub2").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "sub2" / "b.jpg")
    with pytest.raises(DataError) as e:
        FolderDataset(root, csv)
    assert "matches several files" in one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        FolderDataset(tmp_path / "empty")
    assert "no images found" in one_line(e)


def test_patient_split_helper():
    ids = [f"i{k}" for k in range(100)]
    pats = [f"p{k // 2}" for k in range(100)]
    val = patient_split(ids, pats, 0.2, seed=5)
    assert len(val) == 20 and val == patient_split(ids, pats, 0.2, seed=5)
    assert all((f"i{2 * (k // 2)}" in val) == (f"i{2 * (k // 2) + 1}" in val) for k in range(100))
    with pytest.raises(DataError):
        patient_split(ids, pats, 1.5)


def test_detect_layout_is_one_rule(tmp_path):
    from cxr_explain.data.layout import detect_layout, open_dataset

    Image.fromarray(np.full((40, 30), 100, np.uint8)).save(tmp_path / "a.png")
    assert detect_layout(tmp_path) == "folder"
    (tmp_path / "labels.csv").write_text("image,labels\na.png,Mass\n")
    assert detect_layout(tmp_path) == "folder"  # a folder's own CSV is not an RSNA table
    ds = open_dataset(tmp_path, labels_csv=tmp_path / "labels.csv")
    assert isinstance(ds, FolderDataset) and ds.findings == ("Mass",) and ds.splits() == {}
    assert ds.split_of(0) is None and ds.mask_findings(0) == []
    with pytest.raises(DataError, match="no split file"):
        open_dataset(tmp_path, split="test")
    (tmp_path / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height,Target\n")
    assert detect_layout(tmp_path) == "rsna"
    (tmp_path / "Data_Entry_2017.csv").write_text("Image Index\n")
    assert detect_layout(tmp_path) == "nih"
    with pytest.raises(DataError, match="not found"):
        detect_layout(tmp_path / "nope")
