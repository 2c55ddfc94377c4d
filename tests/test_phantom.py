"""Tests of the synthetic chest X-ray benchmark (cxr_explain.data.phantom)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from cxr_explain.data.phantom import (FINDINGS, NIH_BBOX_HEADER, NIH_DATA_ENTRY_HEADER, PhantomConfig,
                                      generate, render_phantom)
from cxr_explain.data.phantom_lesions import cue_pattern, mask_box
from cxr_explain.errors import CxrExplainError, DataError

# NIH box-area medians (fraction of the image), docs/data_formats.md §1.1
NIH_MEDIAN_AREA = {"Nodule": 0.0046, "Mass": 0.015, "Atelectasis": 0.019, "Pneumothorax": 0.036,
                   "Effusion": 0.056, "Infiltration": 0.057, "Pneumonia": 0.057, "Cardiomegaly": 0.171}


@pytest.fixture(scope="module")
def cohort():
    """200 default-config phantoms at 96 px (seed 4)."""
    return [render_phantom(i, seed=4, size=96) for i in range(200)]


def test_deterministic_per_seed_and_index():
    a = render_phantom(7, seed=1, size=128)
    b = render_phantom(7, seed=1, size=128)
    assert a.image.dtype == np.uint8 and a.image.shape == (128, 128)
    assert a.image.tobytes() == b.image.tobytes()
    assert [l.box for l in a.lesions] == [l.box for l in b.lesions]
    assert render_phantom(7, seed=2, size=128).image.tobytes() != a.image.tobytes()
    c = render_phantom(6, seed=1, size=128)  # same patient (images_per_patient = 2), other film
    assert c.image.tobytes() != a.image.tobytes()
    assert (c.patient, c.split, c.sex) == (a.patient, a.split, a.sex) and abs(c.age - a.age) <= 1
    assert (c.follow_up, a.follow_up) == (0, 1) and c.image_id == "00000004_000"


def test_lesions_inside_anatomy_and_box_is_mask_bbox(cohort):
    n_lesions = 0
    for ph in cohort:
        for les in ph.lesions:
            n_lesions += 1
            assert les.mask.dtype == bool and les.mask.shape == ph.lungs.shape
            assert les.mask.any()
            region = ph.heart if les.finding == "Cardiomegaly" else ph.lungs
            assert not (les.mask & ~region).any(), (ph.index, les.finding)
            assert (les.box.x, les.box.y, les.box.w, les.box.h) == mask_box(les.mask)
            assert les.box.finding == les.finding
    assert n_lesions > 100


def test_cardiomegaly_ctr_ranges_overlap_normal(cohort):
    """Normal CTR in [0.38, 0.52], Cardiomegaly (enlarged heart) in [0.49, 0.62]: overlapping, so
    the label is not a threshold on heart width, yet enlarged hearts are larger on average."""
    normal = np.array([ph.ctr for ph in cohort if "Cardiomegaly" not in ph.findings])
    big = np.array([ph.ctr for ph in cohort if "Cardiomegaly" in ph.findings])
    assert len(big) >= 10
    assert normal.min() >= 0.38 and normal.max() <= 0.52
    assert big.min() >= 0.49 and big.max() <= 0.62
    assert (normal > 0.5).any() and (big < 0.52).any()  # the overlap is populated
    auc = roc_auc_score(np.r_[np.zeros(len(normal)), np.ones(len(big))], np.r_[normal, big])
    assert 0.85 < auc < 0.995, auc
    for ph in cohort:  # the Cardiomegaly mask is the heart
        for les in ph.lesions:
            if les.finding == "Cardiomegaly":
                assert np.array_equal(les.mask, ph.heart)


def test_box_sizes_near_nih_medians(cohort):
    areas = {f: [] for f in FINDINGS}
    for ph in cohort:
        for les in ph.lesions:
            areas[les.finding].append(les.box.w * les.box.h / ph.lungs.size)
    for f, target in NIH_MEDIAN_AREA.items():
        assert len(areas[f]) >= 8, f
        med = float(np.median(areas[f]))
        assert target / 2 < med < target * 2, (f, med, target)


def test_mean_intensity_does_not_separate_classes(cohort):
    mean = np.array([ph.image.mean() for ph in cohort])
    for f in FINDINGS:
        y = np.array([f in ph.findings for ph in cohort])
        assert 10 <= y.sum() <= len(y) - 10, f
        auc = roc_auc_score(y, mean)
        assert max(auc, 1 - auc) < 0.7, (f, auc)


def test_lesion_changes_the_image_inside_its_mask():
    cfg = PhantomConfig(prevalence={f: float(f == "Mass") for f in FINDINGS}, p_no_finding=0.0,
                        lesion_contrast=2.0)
    ph = render_phantom(3, seed=0, size=128, config=cfg)
    base = render_phantom(3, seed=0, size=128, config=PhantomConfig(
        prevalence={f: float(f == "Mass") for f in FINDINGS}, p_no_finding=0.0, lesion_contrast=0.0))
    m = ph.lesions[0].mask
    diff = ph.image.astype(int) - base.image.astype(int)
    assert diff[m].mean() > 5 and abs(diff[~m].mean()) < 0.5


def _lift(finding: str, n: int = 6) -> float:
    """Mean grey-level lift inside the lesion mask: default contrast minus lesion_contrast = 0."""
    prev = {f: float(f == finding) for f in FINDINGS}
    lifts = []
    for i in range(n):
        on = render_phantom(i, seed=2, size=128, config=PhantomConfig(prevalence=prev, p_no_finding=0.0))
        off = render_phantom(i, seed=2, size=128, config=PhantomConfig(prevalence=prev, p_no_finding=0.0,
                                                                       lesion_contrast=0.0))
        m = on.finding_mask(finding)
        lifts.append((on.image.astype(float) - off.image.astype(float))[m].mean())
    return float(np.mean(lifts))


def test_small_lesions_conspicuous_effusion_subtle():
    """Difficulty calibration: nodules / masses lift the film more than the (subtle) effusion does,
    and enough to be seen at 128 px."""
    lift = {f: _lift(f) for f in ("Nodule", "Mass", "Effusion")}
    assert lift["Nodule"] > 25 and lift["Mass"] > 25, lift
    assert lift["Effusion"] < min(lift["Nodule"], lift["Mass"]), lift


def test_shortcut_correlates_in_train_only():
    cfg = PhantomConfig(prevalence={f: (0.5 if f == "Pneumonia" else 0.1) for f in FINDINGS}, p_no_finding=0.2,
                        split=(0.5, 0.0, 0.5))
    tab = {"train": [], "test": []}
    for i in range(240):
        ph = render_phantom(i, seed=9, size=64, config=cfg, shortcut="marker")
        tab[ph.split].append(("Pneumonia" in ph.findings, ph.cue is not None))
        if ph.cue is not None:
            assert ph.cue.any() and not (ph.cue & ph.lungs).any()
            want = 255 * cue_pattern(ph.cue)[ph.cue]  # burned in over the film, up to grain
            assert np.abs(ph.image[ph.cue].astype(float) - want).mean() < 8
    for split, rows in tab.items():
        pos = [c for y, c in rows if y]
        neg = [c for y, c in rows if not y]
        assert len(pos) >= 15 and len(neg) >= 15, split
        gap = np.mean(pos) - np.mean(neg)
        if split == "train":
            assert gap > 0.5, gap
        else:
            assert abs(gap) < 0.25, gap
    assert render_phantom(0, seed=9, size=64, config=cfg).cue is None


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


def test_nih_layout_tables_agree(tmp_path):
    out = generate(tmp_path / "nih", n=14, seed=3, size=96, shortcut="marker", workers=1, progress=False)
    lines = (out / "Data_Entry_2017.csv").read_text().splitlines()
    assert lines[0] == NIH_DATA_ENTRY_HEADER and len(lines) == 15
    assert (out / "BBox_List_2017.csv").read_text().splitlines()[0] == NIH_BBOX_HEADER
    de = pd.read_csv(out / "Data_Entry_2017.csv")
    assert len(de.columns) == 11
    labels = {r["Image Index"]: set(r["Finding Labels"].split("|")) for _, r in de.iterrows()}
    for name in labels:
        assert (out / "images" / name).is_file()
        pid, fu = name[:-4].split("_")
        assert len(pid) == 8 and len(fu) == 3
    bb = pd.read_csv(out / "BBox_List_2017.csv", usecols=range(6), skiprows=1, header=None,
                     names=["img", "label", "x", "y", "w", "h"])
    masks = pd.read_csv(out / "masks.csv")
    assert list(masks.columns) == ["Image Index", "Finding Label", "Mask Path"]
    mpath = {(r["Image Index"], r["Finding Label"]): r["Mask Path"] for _, r in masks.iterrows()}
    boxed = set()
    for _, r in bb.iterrows():
        f = "Infiltration" if r["label"] == "Infiltrate" else r["label"]
        assert r["label"] != "Infiltration"
        assert f in labels[r["img"]]
        m = np.array(Image.open(out / mpath[(r["img"], f)])) > 0
        assert mask_box(m) == (r["x"], r["y"], r["w"], r["h"])
        boxed.add((r["img"], f))
    expected = {(img, f) for img, fs in labels.items() for f in fs if f != "No Finding"}
    assert boxed == expected == set(mpath)
    lungs = pd.read_csv(out / "lungs.csv")
    assert set(lungs["Image Index"]) == set(labels)
    split = pd.read_csv(out / "split.csv")
    assert list(split.columns) == ["Image Index", "split"] and set(split["split"]) <= {"train", "val", "test"}
    by_patient = split.assign(p=split["Image Index"].str[:8]).groupby("p")["split"].nunique()
    assert (by_patient == 1).all()
    cues = pd.read_csv(out / "cues.csv", keep_default_na=False)
    assert set(cues["Image Index"]) == set(labels)
    for _, r in cues.iterrows():
        assert bool(r["Present"]) == bool(r["Mask Path"]) == (out / str(r["Mask Path"])).is_file()
    # same bytes as an in-memory render
    first = sorted(labels)[0]
    assert np.array_equal(np.array(Image.open(out / "images" / first)), render_phantom(
        0, seed=3, size=96, shortcut="marker").image)


def test_rsna_layout_dicom_and_labels(tmp_path):
    cfg = PhantomConfig(prevalence={f: (0.6 if f == "Pneumonia" else 0.1) for f in FINDINGS})
    out = generate(tmp_path / "rsna", n=10, seed=5, layout="rsna", size=96, config=cfg, workers=1,
                   progress=False)
    lab = pd.read_csv(out / "stage_2_train_labels.csv")
    assert list(lab.columns) == ["patientId", "x", "y", "width", "height", "Target"]
    info = pd.read_csv(out / "stage_2_detailed_class_info.csv")
    assert list(info.columns) == ["patientId", "class"] and len(info) == len(lab)
    assert set(lab["patientId"]) == {p.stem for p in (out / "stage_2_train_images").glob("*.dcm")}
    assert lab["patientId"].nunique() == 10 and lab["Target"].sum() >= 1
    assert lab.loc[lab["Target"] == 0, "x"].isna().all()
    assert (info["class"] == "Lung Opacity").sum() == lab["Target"].sum()
    masks = pd.read_csv(out / "masks.csv")
    for pid, g in lab.groupby("patientId"):
        ds = pydicom.dcmread(out / "stage_2_train_images" / f"{pid}.dcm")
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 8 and ds.BitsAllocated == 8
        assert ds.SamplesPerPixel == 1 and ds.PixelRepresentation == 0 and ds.Rows == ds.Columns == 96
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.PatientID == pid
        px = ds.pixel_array
        assert px.dtype == np.uint8 and px.shape == (96, 96)
        mrow = masks[masks["patientId"] == pid]
        if g["Target"].iloc[0] == 1:
            assert list(mrow["Finding Label"]) == ["Pneumonia"]
            m = np.array(Image.open(out / mrow["Mask Path"].iloc[0])) > 0
            ys, xs = np.nonzero(m)
            assert g["x"].min() == xs.min() and g["y"].min() == ys.min()
            assert (g["x"] + g["width"]).max() == xs.max() + 1
        else:
            assert len(mrow) == 0
    assert np.array_equal(pydicom.dcmread(out / "stage_2_train_images" / f"{lab['patientId'].iloc[0]}.dcm").pixel_array,
                          render_phantom(0, seed=5, size=96, config=cfg, layout="rsna").image)


def test_resume_skips_existing_and_rejects_other_settings(tmp_path):
    out = generate(tmp_path / "d", n=5, seed=1, size=80, workers=1, progress=False)
    imgs = sorted((out / "images").glob("*.png"))
    stamp = {p.name: p.stat().st_mtime_ns for p in imgs}
    victim = imgs[2]
    victim.unlink()
    generate(tmp_path / "d", n=7, seed=1, size=80, workers=1, progress=False)
    after = sorted((out / "images").glob("*.png"))
    assert len(after) == 7 and victim.is_file()
    for p in imgs:
        if p != victim:
            assert p.stat().st_mtime_ns == stamp[p.name], p.name
    assert len(pd.read_csv(out / "Data_Entry_2017.csv")) == 7
    with pytest.raises(DataError):
        generate(tmp_path / "d", n=7, seed=2, size=80, workers=1, progress=False)


def test_parallel_workers_match_serial(tmp_path):
    a = generate(tmp_path / "a", n=4, seed=2, size=64, workers=1, progress=False)
    b = generate(tmp_path / "b", n=4, seed=2, size=64, workers=2, progress=False, chunk=1)
    for p in sorted((a / "images").glob("*.png")):
        assert _md5(p) == _md5(b / "images" / p.name)
    assert (a / "BBox_List_2017.csv").read_text() == (b / "BBox_List_2017.csv").read_text()


def test_bad_arguments_raise_one_line_errors(tmp_path):
    for kw in ({"layout": "coco"}, {"shortcut": "watermark"}, {"config": PhantomConfig(prevalence={"Hernia": 1.0})}):
        with pytest.raises(CxrExplainError) as e:
            generate(tmp_path / "x", n=2, size=64, progress=False, **kw)
        assert "\n" not in str(e.value)


def test_round_trip_through_nih_reader(tmp_path):
    import warnings

    from cxr_explain.data.labels import CHEXNET_FINDINGS
    from cxr_explain.data.nih import NIHDataset, read_bbox_list, read_data_entry

    out = generate(tmp_path / "nih", n=12, seed=6, size=96, workers=1, progress=False)
    truth = {f"{ph.image_id}.png": ph for ph in (render_phantom(i, seed=6, size=96) for i in range(12))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = NIHDataset(out, split=None, image_size=96)
        assert len(ds) == 12
        assert len(read_data_entry(out / "Data_Entry_2017.csv")) == 12
        boxes = read_bbox_list(out / "BBox_List_2017.csv", image_size=96)
        for i in range(len(ds)):
            s = ds[i]
            ph = truth[Path(s.path).name]
            want = np.array([f in ph.findings for f in CHEXNET_FINDINGS], dtype=float)
            assert np.array_equal(np.asarray(s.labels, dtype=float), want)
            assert sorted(s.boxes, key=lambda b: b.finding) == sorted((l.box for l in ph.lesions), key=lambda b: b.finding)
            assert sorted(s.masks) == ph.findings
            for f, m in s.masks.items():
                assert np.array_equal(m, ph.finding_mask(f))
        assert sum(len(v) for v in boxes.values()) == sum(len(ph.lesions) for ph in truth.values())
        for split in ("train", "test"):
            names = {Path(ds_s.path).name for ds_s in NIHDataset(out, split=split, image_size=96).samples}
            assert names == {k for k, ph in truth.items() if ph.split == split}


def test_round_trip_through_rsna_reader(tmp_path):
    import warnings

    from cxr_explain.data.rsna import RSNADataset

    cfg = PhantomConfig(prevalence={f: (0.5 if f == "Pneumonia" else 0.1) for f in FINDINGS})
    out = generate(tmp_path / "rsna", n=10, seed=8, layout="rsna", size=96, config=cfg, workers=1,
                   progress=False)
    truth = {ph.image_id: ph for ph in (render_phantom(i, seed=8, size=96, config=cfg, layout="rsna")
                                        for i in range(10))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = RSNADataset(out, split=None, image_size=96)
        assert len(ds) == 10
        n_pos = 0
        for i in range(len(ds)):
            s = ds[i]
            ph = truth[s.image_id]
            pos = "Pneumonia" in ph.findings
            n_pos += pos
            assert float(s.labels[0]) == float(pos)
            want = sorted((l.box for l in ph.lesions if l.finding == "Pneumonia"), key=lambda b: (b.x, b.y))
            assert sorted(s.boxes, key=lambda b: (b.x, b.y)) == want
            if pos:
                assert np.array_equal(s.masks["Pneumonia"], ph.finding_mask("Pneumonia"))
            else:
                assert not s.masks
        assert n_pos >= 1
        test_ids = {s.image_id for s in RSNADataset(out, split="test", image_size=96).samples}
        assert test_ids == {k for k, ph in truth.items() if ph.split == "test"}
