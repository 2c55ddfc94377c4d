"""The CheXpert / CheXlocalize-style copy of a synthetic benchmark, read back by the readers."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from cxr_explain.data.chexlocalize import CheXlocalizeDataset, read_segmentations
from cxr_explain.data.chexpert import CheXpertDataset, read_chexpert_csv
from cxr_explain.data.labels import NO_FINDING
from cxr_explain.data.phantom import FINDINGS, PhantomConfig, generate, render_phantom
from cxr_explain.data.phantom_export import EXPORT_MANIFEST, export_chexlocalize
from cxr_explain.errors import DataError

N, SEED, SIZE = 24, 4, 64
CFG = PhantomConfig(split=(0.4, 0.3, 0.3), p_no_finding=0.3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    src = generate(base / "bench", n=N, seed=SEED, size=SIZE, config=CFG, workers=1, progress=False)
    out = export_chexlocalize(src, base / "cxl", uncertain_fraction=0.25, seed=1)
    truth = {f"{ph.image_id}.png": ph for ph in (render_phantom(i, SEED, SIZE, CFG) for i in range(N))}
    return src, out, truth


def _phantom_of(out: Path, truth: dict, image_id: str):
    return truth[json.loads((out / EXPORT_MANIFEST).read_text())["images"][image_id]]


def test_readers_read_the_copy_back(exported):
    src, out, truth = exported
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = CheXlocalizeDataset(out)
    assert ds.findings == FINDINGS
    want_ids = {f"patient{ph.patient:05d}_study{ph.follow_up + 1}_view1_frontal"
                for ph in truth.values() if ph.split in ("val", "test")}
    assert set(ds.ids) == want_ids and set(ds.image_split.values()) == {"val", "test"}
    n_masks = 0
    for i in range(len(ds)):
        s = ds[i]
        ph = _phantom_of(out, truth, s.image_id)
        assert ds.image_split[s.image_id] == ph.split
        assert s.labels.tolist() == [float(f in ph.findings) for f in FINDINGS]  # exact: val / test
        assert ds.gt_findings(i) == ph.findings and ds.in_ground_truth(i) == bool(ph.findings)
        for f, m in s.masks.items():
            assert np.array_equal(m, ph.finding_mask(f))
            n_masks += 1
        assert s.path.read_bytes() == (src / "images" / f"{ph.image_id}.png").read_bytes()
        assert np.array_equal(ds.read_image(i).pixels, ph.image.astype(np.float32))
    assert n_masks >= 5
    # the JSON lists only films with a finding, each with every finding (empty RLE when absent)
    gt = read_segmentations(out / "CheXlocalize" / "gt_segmentations_val.json", known=FINDINGS)
    assert gt and all(set(per) == set(FINDINGS) for per in gt.values())
    assert all(any(r.area for r in per.values()) for per in gt.values())


def test_train_labels_have_uncertainty_and_blanks(exported):
    src, out, truth = exported
    t = read_chexpert_csv(out / "CheXpert" / "train.csv")
    assert t.findings == (NO_FINDING,) + FINDINGS
    raw = t.raw[:, 1:]
    assert (raw == -1).any() and np.isnan(raw).any() and (raw == 1).any()
    ones = CheXpertDataset(out, split="train", findings=FINDINGS, uncertain="ones")
    zeros = CheXpertDataset(out, split="train", findings=FINDINGS, uncertain="zeros")
    assert len(ones) == sum(ph.split == "train" for ph in truth.values())
    for a, b, r in zip(ones.samples, zeros.samples, raw):
        ph = _phantom_of(out, truth, a.image_id)
        exact = np.array([float(f in ph.findings) for f in FINDINGS])
        sure = r != -1
        assert np.array_equal(a.labels[sure], exact[sure]) and np.array_equal(b.labels[sure], exact[sure])
        assert (a.labels[~sure] == 1).all() and (b.labels[~sure] == 0).all()
    frac = (raw == -1).mean()
    assert 0.1 < frac < 0.45  # uncertain_fraction=0.25


def test_jpeg_copy_and_bad_source(exported, tmp_path):
    src, _, truth = exported
    out = export_chexlocalize(src, tmp_path / "jpg", image_format="jpg")
    ds = CheXlocalizeDataset(out, split="val")
    ph = _phantom_of(out, truth, ds.ids[0])
    assert ds.samples[0].path.suffix == ".jpg"
    assert np.abs(ds.read_image(0).pixels - ph.image).mean() < 3.0
    rsna = generate(tmp_path / "rsna", n=2, seed=0, size=64, layout="rsna", workers=1, progress=False)
    with pytest.raises(DataError, match="NIH layout"):
        export_chexlocalize(rsna, tmp_path / "x")
