"""RSNA Pneumonia readers: labels CSV, detailed class info, split, DICOM folder."""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxr_explain.data.rsna import RSNADataset, read_rsna_class_info, read_rsna_labels
from cxr_explain.errors import DataError

DATA = Path(__file__).parent / "data"
DCM = DATA / "dicom" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
HEADER = "patientId,x,y,width,height,Target\n"


def one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def _pid(k: int) -> str:
    return str(uuid.UUID(int=k + 1))


def _layout(root: Path, n: int = 60, n_pos: int = 20, real_for: int = 2, skip_image: int = 0) -> Path:
    """n patients; the first n_pos positive (alternating 1 and 2 boxes); the first ``real_for``
    get a copy of the real DICOM, the rest an empty placeholder (never decoded in these tests)."""
    img = root / "stage_2_train_images"
    img.mkdir(parents=True)
    rows, info = [], []
    for k in range(n):
        pid = _pid(k)
        if k < n_pos:
            rows.append(f"{pid},100,200,150,300,1")
            info.append(f"{pid},Lung Opacity")
            if k % 2:
                rows.append(f"{pid},600,250,120,280,1")
                info.append(f"{pid},Lung Opacity")
        else:
            rows.append(f"{pid},,,,,0")
            info.append(f"{pid},{'Normal' if k % 2 else 'No Lung Opacity / Not Normal'}")
        if k >= n - skip_image:
            continue
        if k < real_for:
            shutil.copy(DCM, img / f"{pid}.dcm")
        else:
            (img / f"{pid}.dcm").write_bytes(b"")
    (root / "stage_2_train_labels.csv").write_text(HEADER + "\n".join(rows) + "\n")
    (root / "stage_2_detailed_class_info.csv").write_text("patientId,class\n" + "\n".join(info) + "\n")
    return root


def test_read_labels_positives_and_negatives(tmp_path):
    _layout(tmp_path)
    targets, boxes = read_rsna_labels(tmp_path / "stage_2_train_labels.csv")
    assert len(targets) == 60 and sum(targets.values()) == 20
    assert boxes[_pid(0)][0].finding == "Pneumonia"
    assert (boxes[_pid(0)][0].x, boxes[_pid(0)][0].h) == (100.0, 300.0)
    assert len(boxes[_pid(1)]) == 2 and boxes[_pid(30)] == []
    info = read_rsna_class_info(tmp_path / "stage_2_detailed_class_info.csv")
    assert info[_pid(0)] == "Lung Opacity" and info[_pid(31)] == "Normal"


@pytest.mark.parametrize(
    "rows, what",
    [
        ("a,,,,,1\n", "lacks box coordinates"),
        ("a,1,2,3,4,0\n", "has box coordinates"),
        ("a,,,,,2\n", "Target must be 0 or 1"),
        ("a,900,10,200,50,1\n", "outside"),
        ("a,10,10,0,50,1\n", "non-positive size"),
        ("a,10,10,20,50,1\na,,,,,0\n", "Target 0 and Target 1"),
    ],
)
def test_bad_label_rows(tmp_path, rows, what):
    p = tmp_path / "labels.csv"
    p.write_text(HEADER + rows)
    with pytest.raises(DataError) as e:
        read_rsna_labels(p)
    msg = one_line(e)
    assert "labels.csv" in msg and "line " in msg and what in msg


def test_missing_column_and_unknown_class(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("patientId,x,y,width,height\na,,,,\n")
    with pytest.raises(DataError) as e:
        read_rsna_labels(p)
    assert "labels.csv" in one_line(e) and "'Target'" in str(e.value)
    q = tmp_path / "info.csv"
    q.write_text("patientId,class\na,Lung opacity\n")
    with pytest.raises(DataError) as e:
        read_rsna_class_info(q)
    assert "info.csv" in one_line(e) and "did you mean 'Lung Opacity'" in str(e.value)


def test_dataset_patient_split_is_deterministic_and_stratified(tmp_path):
    root = _layout(tmp_path)
    train, val = RSNADataset(root, "train"), RSNADataset(root, "val")
    assert len(train) + len(val) == 60 and not set(train.ids) & set(val.ids)
    assert len(val) == 6 and sum(float(s.labels[0]) for s in val) == 2.0  # 10% of each stratum
    assert RSNADataset(root, "val", seed=0).ids == val.ids
    assert RSNADataset(root, "val", seed=1).ids != val.ids
    assert len(RSNADataset(root, split=None)) == 60
    assert RSNADataset(root, "val", val_fraction=0.2).ids != val.ids
    whole = RSNADataset(root, split=None)  # each patient's split, the same rule, no test without split.csv
    assert whole.splits() == {**{i: "train" for i in train.ids}, **{i: "val" for i in val.ids}}
    assert whole.split_of(whole.index_of(val.ids[0])) == "val"


def test_dataset_samples_and_dicom(tmp_path):
    root = _layout(tmp_path)
    ds = RSNADataset(root, split=None, findings=("Pneumonia", "Lung Opacity"))
    s = ds[ds.index_of(_pid(1))]
    np.testing.assert_array_equal(s.labels, [1.0, 1.0])
    assert [b.finding for b in s.boxes] == ["Pneumonia", "Pneumonia"] and s.patient_id == _pid(1)
    assert ds[ds.index_of(_pid(40))].labels.sum() == 0 and ds[ds.index_of(_pid(40))].boxes == []
    x = ds.read_image(ds.index_of(_pid(0)))
    np.testing.assert_array_equal(x.pixels, pydicom.dcmread(DCM).pixel_array)
    assert ds.class_info[_pid(40)] == "No Lung Opacity / Not Normal"


def test_dataset_split_csv_missing_images_and_errors(tmp_path):
    root = _layout(tmp_path, skip_image=3)
    with pytest.warns(UserWarning, match="3 patients have no image file"):
        ds = RSNADataset(root, split=None)
    assert len(ds) == 57 and ds.missing == [_pid(57), _pid(58), _pid(59)]
    with pytest.raises(DataError) as e:
        RSNADataset(root, split="test")
    assert "split.csv" in one_line(e)
    (root / "split.csv").write_text(f"patientId,split\n{_pid(0)},test\n{_pid(1)},test\n{_pid(2)},train\n")
    assert RSNADataset(root, split="test").ids == [_pid(0), _pid(1)]
    assert RSNADataset(root, split="train").ids == [_pid(2)]
    with pytest.warns(UserWarning, match="3 patients have no image file"):
        whole = RSNADataset(root, split=None)
    assert whole.splits() == {_pid(0): "test", _pid(1): "test", _pid(2): "train"}
    (root / "stage_2_detailed_class_info.csv").write_text(f"patientId,class\n{_pid(0)},Normal\n")
    with pytest.raises(DataError) as e:
        RSNADataset(root, split="test")
    assert "stage_2_detailed_class_info.csv" in one_line(e) and "Target is 1" in str(e.value)


def test_dataset_masks_csv_with_patient_ids(tmp_path):
    from PIL import Image

    root = _layout(tmp_path)
    (root / "masks").mkdir()
    m = np.zeros((1024, 1024), np.uint8)
    m[200:500, 100:250] = 255
    Image.fromarray(m).save(root / "masks" / "p0.png")
    (root / "masks.csv").write_text(f"patientId,Finding Label,Mask Path\n{_pid(0)},Pneumonia,masks/p0.png\n")
    ds = RSNADataset(root, split=None, findings=("Pneumonia", "Lung Opacity"))
    s = ds[ds.index_of(_pid(0))]
    assert set(s.masks) == {"Pneumonia", "Lung Opacity"} and s.masks["Pneumonia"].sum() == 300 * 150
    assert s.masks["Pneumonia"][s.boxes[0].to_mask(1024, 1024)].all()  # the mask is the box here
    assert ds[ds.index_of(_pid(1))].masks == {}
    assert [ds.mask_findings(k) for k in range(len(ds))] == [list(ds[k].masks) for k in range(len(ds))]
    (root / "masks.csv").write_text(f"patientId,Finding Label,Mask Path\n{_pid(0)},Effusion,masks/p0.png\n")
    with pytest.raises(DataError) as e:
        RSNADataset(root, split=None)
    assert "masks.csv" in one_line(e) and "'Effusion'" in str(e.value)
