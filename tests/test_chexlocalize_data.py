"""CheXlocalize ground truth: COCO RLE round trip, agreement with pycocotools, bad files, the dataset."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from cxr_explain.data.chexlocalize import (
    CHEXLOCALIZE_FINDINGS,
    CheXlocalizeDataset,
    decode_rle,
    encode_mask,
    parse_rle,
    read_segmentations,
    rle_counts,
    write_segmentations,
)
from cxr_explain.data.chexpert import CHEXPERT_LABELS
from cxr_explain.errors import DataError
from test_chexpert_data import HEADER, _png, _row, one_line


# ------------------------------------------------------------------------------------ RLE
def _ref_decode(runs: np.ndarray, h: int, w: int) -> np.ndarray:
    """Independent decoder: alternate 0/1 runs, column-major."""
    return np.repeat(np.arange(len(runs)) % 2, runs).reshape(w, h).T.astype(bool)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own decode under numpy 2
def test_rle_round_trip_and_agreement_with_pycocotools():
    from pycocotools import mask as cocomask

    rng = np.random.default_rng(0)
    for t in range(200):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        m = rng.random((h, w)) < rng.random()
        if t % 2:
            m = np.zeros((h, w), dtype=bool)
            m[rng.integers(0, h):, rng.integers(0, w):] = True
        e = json.loads(json.dumps(encode_mask(m)))  # through JSON text, as in the files
        assert e["size"] == [h, w]
        back = decode_rle(e)
        assert back.dtype == bool and np.array_equal(back, m)
        runs = rle_counts(e["counts"])
        coco = cocomask.decode({"size": [h, w], "counts": e["counts"].encode()}).astype(bool)
        assert np.array_equal(_ref_decode(runs, h, w), coco)
        assert parse_rle(e).area == int(m.sum())
    # the uncompressed (list) form decodes to the same mask
    m = np.zeros((4, 3), dtype=bool)
    m[1:3, 1] = True
    assert np.array_equal(decode_rle({"size": [4, 3], "counts": [5, 2, 5]}), m)


def test_malformed_rle_names_file_and_entry(tmp_path):
    good = encode_mask(np.eye(5, dtype=bool))
    cases = {
        "": "runs cover 0 pixels",
        good["counts"][:-1]: "runs cover",
        good["counts"] + "1": "runs cover",
        "garbage!!": "is not part of a COCO RLE string",
        good["counts"][:-1] + "Z": "ends inside a run",
    }
    for counts, why in cases.items():
        p = tmp_path / "gt.json"
        p.write_text(json.dumps({"patient1_study1_view1_frontal": {"Edema": {"size": [5, 5], "counts": counts},
                                                                   "Cardiomegaly": good}}))
        with pytest.raises(DataError) as e:
            read_segmentations(p)
        msg = one_line(e)
        assert str(p) in msg and "patient1_study1_view1_frontal" in msg and "Edema" in msg and why in msg, msg
    p.write_text(json.dumps({"x": {"Edema": {"size": [5], "counts": good["counts"]}}}))
    with pytest.raises(DataError, match="size must be"):
        read_segmentations(p)
    p.write_text(json.dumps({"x": {"Edema": {"size": [5, 5], "counts": [10, -1, 16]}}}))
    with pytest.raises(DataError, match="negative run"):
        read_segmentations(p)
    p.write_text(json.dumps({"x": {"Pleural Efusion": good}}))
    with pytest.raises(DataError) as e:
        read_segmentations(p)
    assert "'x'" in one_line(e) and "did you mean 'Pleural Effusion'" in str(e.value)
    p.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_segmentations(p)
    p.write_text(json.dumps({"x": {"Airspace Opacity": good}}))
    assert list(read_segmentations(p)["x"]) == ["Lung Opacity"]


# ------------------------------------------------------------------------------------ CheXlocalize
def _chexlocalize_root(tmp_path, h=12, w=10):
    """CheXlocalize's download layout: CheXpert/val_labels.csv + CheXpert/val/, CheXlocalize/*.json."""
    root = tmp_path / "cxl"
    rows = [
        _row("CheXpert-v1.0/valid/patient64541/study1/view1_frontal.jpg", {"Cardiomegaly": "1.0", "Edema": "1.0"}),
        _row("CheXpert-v1.0/valid/patient64541/study1/view2_lateral.jpg", {"Cardiomegaly": "1.0"}, view="Lateral"),
        _row("CheXpert-v1.0/valid/patient64542/study1/view1_frontal.jpg", {"No Finding": "1.0"}),
    ]
    (root / "CheXpert").mkdir(parents=True)
    (root / "CheXpert" / "val_labels.csv").write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    for r in rows:
        _png(root / "CheXpert" / "val" / Path(*Path(r.split(",")[0]).parts[-3:]), h, w)
    heart = np.zeros((h, w), dtype=bool)
    heart[5:9, 3:8] = True
    empty = np.zeros((h, w), dtype=bool)
    per = {f: empty for f in CHEXLOCALIZE_FINDINGS}
    gt = {"patient64541_study1_view1_frontal": {**per, "Cardiomegaly": heart},
          "patient64541_study1_view2_lateral": {**per, "Cardiomegaly": heart[::-1]}}
    write_segmentations(root / "CheXlocalize" / "gt_segmentations_val.json", gt,
                        names={"Lung Opacity": "Airspace Opacity"})
    return root, heart


def test_chexlocalize_dataset_reads_layout(tmp_path):
    root, heart = _chexlocalize_root(tmp_path)
    raw = json.loads((root / "CheXlocalize" / "gt_segmentations_val.json").read_text())
    assert "Airspace Opacity" in raw["patient64541_study1_view1_frontal"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = CheXlocalizeDataset(root)
    assert ds.findings == tuple(c for c in CHEXPERT_LABELS if c in CHEXLOCALIZE_FINDINGS)
    assert ds.ids == ["patient64541_study1_view1_frontal", "patient64541_study1_view2_lateral",
                      "patient64542_study1_view1_frontal"]
    assert ds.image_split == dict.fromkeys(ds.ids, "val")
    assert ds.gt_findings(0) == ["Cardiomegaly"] and ds.gt_findings(2) == []
    assert ds.in_ground_truth(0) and not ds.in_ground_truth(2)
    s = ds[0]
    assert list(s.masks) == ["Cardiomegaly"] and np.array_equal(s.masks["Cardiomegaly"], heart)
    assert np.array_equal(ds[1].masks["Cardiomegaly"], heart[::-1]) and ds[2].masks == {}
    assert s.labels[ds.findings.index("Edema")] == 1 and s.labels[ds.findings.index("Cardiomegaly")] == 1
    frontal = CheXlocalizeDataset(root, split="val", views="frontal")
    assert len(frontal) == 2 and frontal.gt_findings(0) == ["Cardiomegaly"]


def test_chexlocalize_bad_ground_truth(tmp_path):
    root, heart = _chexlocalize_root(tmp_path)
    gpath = root / "CheXlocalize" / "gt_segmentations_val.json"
    data = json.loads(gpath.read_text())
    data["patient99999_study1_view1_frontal"] = data["patient64541_study1_view1_frontal"]
    gpath.write_text(json.dumps(data))
    with pytest.raises(DataError) as e:
        CheXlocalizeDataset(root)
    msg = one_line(e)
    assert str(gpath) in msg and "patient99999_study1_view1_frontal" in msg and "no row" in msg
    del data["patient99999_study1_view1_frontal"]
    gpath.write_text(json.dumps(data))
    (root / "CheXpert" / "val" / "patient64541" / "study1" / "view2_lateral.jpg").unlink()
    with pytest.raises(DataError) as e:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            CheXlocalizeDataset(root)
    assert "patient64541_study1_view2_lateral" in one_line(e) and "image file was not found" in str(e.value)
    with pytest.raises(DataError, match="no gt_segmentations_test.json"):
        CheXlocalizeDataset(root, split="test")


def test_chexlocalize_mask_resized_to_smaller_image(tmp_path):
    root, heart = _chexlocalize_root(tmp_path, h=24, w=20)  # masks 24x20
    _png(root / "CheXpert" / "val" / "patient64541" / "study1" / "view1_frontal.jpg", 12, 10)  # "small" image
    ds = CheXlocalizeDataset(root)
    with pytest.warns(UserWarning, match="resized"):
        m = ds[0].masks["Cardiomegaly"]
    assert m.shape == (12, 10) and np.array_equal(m, heart[1::2, 1::2])  # pixel centres, as nearest-exact
    _png(root / "CheXpert" / "val" / "patient64541" / "study1" / "view1_frontal.jpg", 12, 20)
    with pytest.raises(DataError, match="does not belong"):
        ds[0]
