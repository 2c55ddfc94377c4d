"""NIH ChestX-ray14 readers: Data_Entry, BBox_List, split lists, image layouts, NIHDataset."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_explain.data.labels import (
    BOX_FINDINGS,
    CHEXNET_FINDINGS,
    XRV_PATHOLOGIES,
    check_labels,
    parse_finding_labels,
)
from cxr_explain.data.nih import (
    NIHDataset,
    find_nih_images,
    read_bbox_list,
    read_data_entry,
    read_label_list,
    read_split_list,
)
from cxr_explain.errors import DataError

DATA = Path(__file__).parent / "data"
ENTRY = DATA / "Data_Entry_2017_v2020_subset.csv"
BBOX = DATA / "BBox_List_2017_subset.csv"
PNGS = sorted((DATA / "nih_png").glob("*.png"))


def one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------- labels


def test_label_constants():
    assert len(CHEXNET_FINDINGS) == 14 and CHEXNET_FINDINGS[12] == "Pleural_Thickening"
    assert BOX_FINDINGS == CHEXNET_FINDINGS[:8] and "Infiltration" in BOX_FINDINGS
    assert len(XRV_PATHOLOGIES) == 18 and XRV_PATHOLOGIES[8] == "Pneumonia" and XRV_PATHOLOGIES[16] == "Lung Opacity"
    assert parse_finding_labels("Cardiomegaly|Emphysema") == ["Cardiomegaly", "Emphysema"]
    assert parse_finding_labels("No Finding") == ["No Finding"]
    with pytest.raises(DataError) as e:
        check_labels(["Pleural Thickening"], source="my.csv", where="line 3")
    msg = one_line(e)
    assert "my.csv" in msg and "line 3" in msg and "'Pleural Thickening'" in msg
    assert "did you mean 'Pleural_Thickening'" in msg


# ---------------------------------------------------------------- Data_Entry


def test_read_data_entry_real_subset():
    df = read_data_entry(ENTRY)
    assert len(df) == 24
    assert list(df.columns[:11]) == [
        "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
        "View Position", "OriginalImageWidth", "OriginalImageHeight",
        "OriginalImagePixelSpacingX", "OriginalImagePixelSpacingY",
    ]
    row = df.set_index("Image Index").loc["00013911_000.png"]
    assert row["labels"] == ["Effusion", "Mass", "Nodule", "Pleural_Thickening"]
    assert row["Patient ID"] == "13911" and row["Follow-up #"] == 23 and row["View Position"] == "PA"
    assert row["OriginalImageWidth"] == 2992 and row["OriginalImagePixelSpacingY"] == pytest.approx(0.143)
    assert (df["Finding Labels"] == "No Finding").sum() == 8


def test_data_entry_patient_sex_and_trailing_empty_column(tmp_path):
    lines = ENTRY.read_text().splitlines()
    lines[0] = lines[0].replace("Patient Gender", "Patient Sex") + ","
    lines[1:] = [ln + "," for ln in lines[1:]]
    p = tmp_path / "Data_Entry_2017.csv"
    p.write_text("\n".join(lines) + "\n")
    df = read_data_entry(p)
    assert "Patient Gender" in df.columns and "Patient Sex" not in df.columns
    assert not any(c.startswith("Unnamed") for c in df.columns)
    assert set(df["Patient Gender"]) == {"F", "M"}


def test_data_entry_missing_column(tmp_path):
    lines = ENTRY.read_text().splitlines()
    p = tmp_path / "entry.csv"
    p.write_text("\n".join(ln.split(",", 1)[0] + "," + ln.split(",", 2)[2] for ln in lines) + "\n")
    with pytest.raises(DataError) as e:
        read_data_entry(p)
    msg = one_line(e)
    assert "entry.csv" in msg and "'Finding Labels'" in msg


def test_data_entry_unknown_label(tmp_path):
    text = ENTRY.read_text().replace("00009745_000.png,Cardiomegaly", "00009745_000.png,Cardiomegally")
    p = tmp_path / "entry.csv"
    p.write_text(text)
    with pytest.raises(DataError) as e:
        read_data_entry(p)
    msg = one_line(e)
    assert "entry.csv" in msg and "line 7" in msg and "'Cardiomegally'" in msg and "'Cardiomegaly'" in msg


# ---------------------------------------------------------------- BBox_List


def test_read_bbox_list_real_subset_by_position():
    assert BBOX.read_text().splitlines()[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    boxes = read_bbox_list(BBOX)
    assert len(boxes) == 12 and sum(len(v) for v in boxes.values()) == 12
    (b,) = boxes["00004296_000.png"]
    assert (b.finding, b.x, b.y, b.w, b.h) == (
        "Atelectasis", 731.428571428571, 753.100529100529, 119.195767195767, 93.189417989418
    )
    assert boxes["00026911_000.png"][0].finding == "Infiltration"  # 'Infiltrate' in the file
    assert {bb.finding for v in boxes.values() for bb in v} <= set(BOX_FINDINGS)


def test_bbox_rows_with_trailing_commas_and_several_boxes(tmp_path):
    lines = BBOX.read_text().splitlines()
    extra = "00004296_000.png,Nodule,10,20,30,40"
    p = tmp_path / "BBox_List_2017.csv"
    p.write_text("\n".join([lines[0]] + [ln + ",,," for ln in lines[1:]] + [extra + ",,,"]) + "\n")
    boxes = read_bbox_list(p)
    assert [b.finding for b in boxes["00004296_000.png"]] == ["Atelectasis", "Nodule"]
    assert boxes["00004296_000.png"][1].h == 40.0


@pytest.mark.parametrize(
    "row, what",
    [
        ("00000001_000.png,Mass,1000.5,10,30,40", "outside"),
        ("00000001_000.png,Mass,10,1000,30,40.5", "outside"),
        ("00000001_000.png,Mass,10,10,-3,40", "non-positive size"),
        ("00000001_000.png,Mass,10,10,abc,40", "not a number"),
        ("00000001_000.png,Lump,10,10,30,40", "unknown label"),
        ("00000001_000.png,Mass,10,10", "expected 6 fields"),
    ],
)
def test_bbox_bad_rows(tmp_path, row, what):
    p = tmp_path / "bbox.csv"
    p.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000002_000.png,Nodule,1,2,3,4\n" + row + "\n")
    with pytest.raises(DataError) as e:
        read_bbox_list(p)
    msg = one_line(e)
    assert "bbox.csv" in msg and "line 3" in msg and what in msg


# ---------------------------------------------------------------- split and label lists


def test_split_and_label_lists(tmp_path):
    (tmp_path / "test_list.txt").write_text("00000001_000.png\n\n00000002_001.png\n")
    assert read_split_list(tmp_path / "test_list.txt") == ["00000001_000.png", "00000002_001.png"]
    labels = ["0"] * 14
    labels[1] = "1"
    (tmp_path / "arno.txt").write_text(f"images/00000003_000.png {' '.join(labels)}\n")
    assert read_split_list(tmp_path / "arno.txt") == ["00000003_000.png"]
    lab = read_label_list(tmp_path / "arno.txt")
    np.testing.assert_array_equal(lab["00000003_000.png"], np.eye(14)[1])
    (tmp_path / "bad.txt").write_text("00000003_000.png 0 1 0\n")
    with pytest.raises(DataError) as e:
        read_label_list(tmp_path / "bad.txt")
    assert "bad.txt" in one_line(e) and "line 1" in str(e.value)


# ---------------------------------------------------------------- dataset


def _layout(root: Path, nested: bool = True) -> Path:
    """NIH layout with the 4 real test PNGs and the full 24-row Data_Entry / 12-box BBox subsets."""
    img_dir = root / "images_001" / "images" if nested else root
    img_dir.mkdir(parents=True, exist_ok=True)
    for p in PNGS:
        (img_dir / p.name).symlink_to(p.resolve())
    shutil.copy(ENTRY, root / "Data_Entry_2017_v2020.csv")
    shutil.copy(BBOX, root / "BBox_List_2017.csv")
    return root


def test_dataset_reports_missing_images(tmp_path):
    root = _layout(tmp_path)
    with pytest.warns(UserWarning, match="20 images have no file"):
        ds = NIHDataset(root)
    assert len(ds) == 4 and len(ds.missing) == 20 and "00009745_000.png" in ds.missing
    assert ds.missing_rows == []
    s = ds[ds.index_of("00004296_000.png")]
    assert s.path.name == "00004296_000.png" and s.patient_id == "4296" and s.view == "PA"
    expect = np.array([f in ("Atelectasis", "Fibrosis", "Nodule") for f in CHEXNET_FINDINGS], np.float32)
    np.testing.assert_array_equal(s.labels, expect)
    assert [b.finding for b in s.boxes] == ["Atelectasis"]
    assert ds[ds.index_of("00000129_000.png")].labels.sum() == 0  # No Finding
    x = ds.read_image(ds.index_of("00001369_000.png"))  # the RGBA one
    assert x.pixels.shape == (1024, 1024) and x.bits == 8
    assert ds.label_matrix().shape == (4, 14)


def test_dataset_boxed_only_and_findings_subset(tmp_path):
    root = _layout(tmp_path, nested=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = NIHDataset(root, boxed_only=True)
        assert sorted(ds.ids) == ["00001369_000.png", "00004296_000.png", "00008386_000.png"]
        assert len(ds.missing) == 9  # boxed images without a file: reported, not dropped silently
        sub = NIHDataset(root, boxed_only=True, findings=["Nodule", "Cardiomegaly"])
    assert sub.findings == ("Nodule", "Cardiomegaly")
    assert sorted(sub.ids) == ["00001369_000.png", "00008386_000.png"]
    s = sub[sub.index_of("00008386_000.png")]
    np.testing.assert_array_equal(s.labels, [1.0, 0.0])
    with pytest.raises(DataError) as e:
        NIHDataset(root, findings=["Nodules"])
    assert "did you mean 'Nodule'" in one_line(e)


def test_dataset_split_csv_and_missing_rows(tmp_path):
    root = _layout(tmp_path)
    (root / "split.csv").write_text(
        "Image Index,split\n00001369_000.png,train\n00004296_000.png,test\n"
        "00008386_000.png,test\n00000129_000.png,val\n99999999_000.png,test\n"
    )
    with open(root / "BBox_List_2017.csv", "a") as fh:
        fh.write("88888888_000.png,Mass,1,2,3,4\n")
    with pytest.warns(UserWarning, match="no Data_Entry row"):
        ds = NIHDataset(root, split="test")
    assert sorted(ds.ids) == ["00004296_000.png", "00008386_000.png"] and ds.missing == []
    assert set(ds.missing_rows) == {"88888888_000.png", "99999999_000.png"}
    with pytest.raises(DataError) as e:
        NIHDataset(root, split="testing")
    assert "split.csv" in one_line(e)


def test_dataset_official_lists_patient_level_split(tmp_path):
    root = tmp_path
    (root / "images").mkdir()
    names, rows = [], []
    for pat in range(1, 41):
        for fu in range(3):
            n = f"{pat:08d}_{fu:03d}.png"
            names.append(n)
            rows.append(f"{n},No Finding,{fu},{pat},40,F,PA,1024,1024,0.1,0.1")
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "images" / n)
    (root / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n" + "\n".join(rows) + "\n"
    )
    (root / "train_val_list.txt").write_text("\n".join(names[:90]) + "\n")
    (root / "test_list.txt").write_text("\n".join(names[90:]) + "\n")
    train, val, test = (NIHDataset(root, split=s, seed=3) for s in ("train", "val", "test"))
    assert len(test) == 30 and set(test.ids) == set(names[90:])
    assert set(train.ids) | set(val.ids) == set(names[:90]) and not set(train.ids) & set(val.ids)
    assert len(val) == 9  # 3 of 30 patients
    assert not {s.patient_id for s in train} & {s.patient_id for s in val}
    assert NIHDataset(root, split="val", seed=3).ids == val.ids  # deterministic
    assert NIHDataset(root, split="val", seed=4).ids != val.ids
    assert NIHDataset(root, split="trainval").ids == names[:90]
    # the whole dataset knows each image's split without being rebuilt per split
    whole = NIHDataset(root, seed=3)
    want = {**{i: "train" for i in train.ids}, **{i: "val" for i in val.ids}, **{i: "test" for i in test.ids}}
    assert whole.splits() == want
    assert [whole.split_of(k) for k in range(len(whole))] == [want[i] for i in whole.ids]
    assert test.splits() == {i: "test" for i in test.ids}


def test_dataset_masks_csv(tmp_path):
    root = _layout(tmp_path)
    (root / "masks").mkdir()
    m1 = np.zeros((1024, 1024), np.uint8)
    m1[10:20, 30:40] = 255
    m2 = np.zeros((1024, 1024), np.uint8)
    m2[500:510, 600:620] = 1
    Image.fromarray(m1).save(root / "masks" / "a.png")
    Image.fromarray(m2).save(root / "masks" / "b.png")
    (root / "masks.csv").write_text(
        "Image Index,Finding Label,Mask Path\n"
        "00004296_000.png,Nodule,masks/a.png\n00004296_000.png,Nodule,masks/b.png\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = NIHDataset(root)
    s = ds[ds.index_of("00004296_000.png")]
    assert set(s.masks) == {"Nodule"} and s.masks["Nodule"].sum() == 100 + 200
    assert s.masks["Nodule"][15, 35] and s.masks["Nodule"][505, 610] and not s.masks["Nodule"][0, 0]
    assert ds[ds.index_of("00000129_000.png")].masks == {}
    assert [ds.mask_findings(k) for k in range(len(ds))] == [list(ds[k].masks) for k in range(len(ds))]
    assert ds.splits() == {} and ds.split_of(0) is None  # no split source in this folder
    (root / "masks.csv").write_text("Image Index,Finding Label,Mask Path\n00004296_000.png,Nodule,masks/zz.png\n")
    with pytest.raises(DataError) as e:
        NIHDataset(root)
    assert "masks.csv" in one_line(e) and "zz.png" in str(e.value)


def test_dataset_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError) as e:
        NIHDataset(tmp_path)
    assert "Data_Entry" in one_line(e)
    root = _layout(tmp_path / "r")
    with pytest.raises(DataError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        NIHDataset(root, split="test")
    assert "split" in one_line(e)
    assert sorted(find_nih_images(root)) == sorted(p.name for p in PNGS)


@pytest.mark.filterwarnings("ignore:.*have no file")
def test_dataset_warns_when_a_box_finding_is_not_a_label(tmp_path):
    root = _layout(tmp_path)
    with open(root / "BBox_List_2017.csv", "a") as fh:
        fh.write("00000129_000.png,Mass,1,2,3,4\n")  # a 'No Finding' image
    with pytest.warns(UserWarning, match=r"1 boxes/masks .*00000129_000.png:Mass"):
        ds = NIHDataset(root)
    assert [b.finding for b in ds[ds.index_of("00000129_000.png")].boxes] == ["Mass"]
