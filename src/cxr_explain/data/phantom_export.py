"""A CheXpert / CheXlocalize-style copy of a synthetic benchmark folder (NIH layout).

:func:`export_chexlocalize` reads a folder written by :func:`~cxr_explain.data.phantom.generate`
(``Data_Entry_2017.csv``, ``split.csv``, ``masks.csv``, ``images/``) and writes, under ``out``, the
layout of CheXlocalize's download (docs/chexlocalize.md §0)::

    CheXpert/train.csv, CheXpert/val_labels.csv, CheXpert/test_labels.csv
    CheXpert/{train,val,test}/patient00001/study1/view1_frontal.png
    CheXlocalize/gt_segmentations_val.json, CheXlocalize/gt_segmentations_test.json
    chexlocalize_export.json        (source folder name, its phantom.json, settings, image id -> phantom file)

Film ``0000PPPP_00F.png`` becomes ``patientPPPPP/study<F+1>/view1_frontal``. Label columns are
``No Finding`` and the benchmark's findings (the model-side names, so the shipped model's outputs
match). Validation and test labels are exact 0 / 1 (as CheXpert's consensus labels). Training
labels imitate CheXpert's report labeller: each finding cell is ``-1`` (uncertain) with probability
``uncertain_fraction``, else 1 for a present finding and, for an absent one, 0 or blank (not
mentioned) with equal odds; drawn with ``numpy.random.default_rng(seed)`` in file order. The
ground-truth JSON lists the films with at least one finding, each with every finding (an empty RLE
for an absent one), as the benchmark's files do. Images are copied byte for byte (PNG) or, with
``image_format="jpg"``, re-encoded as JPEG (quality 95, lossy). The generator is not changed.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from ..errors import CxrExplainError, DataError
from .chexlocalize import write_segmentations
from .labels import NO_FINDING
from .nih import find_nih_images, read_data_entry, read_mask, read_masks_csv, read_split_csv
from .phantom import EXPORT_MANIFEST, FINDINGS

__all__ = ["export_chexlocalize", "EXPORT_MANIFEST", "SPLIT_CSV_NAMES"]

PathLike = Union[str, Path]
#: split → label CSV name (CheXpert's train.csv; CheXlocalize's val/test label files).
SPLIT_CSV_NAMES = {"train": "train.csv", "val": "val_labels.csv", "test": "test_labels.csv"}
_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", NO_FINDING, *FINDINGS]
_SEX = {"M": "Male", "F": "Female"}


def _cell(value: float) -> str:
    return "" if value != value else f"{value:.1f}"  # NaN (blank) -> ""


def export_chexlocalize(phantom_dir: PathLike, out_dir: PathLike, uncertain_fraction: float = 0.1,
                        seed: int = 0, image_format: str = "png") -> Path:
    """Write the CheXpert / CheXlocalize-style copy of ``phantom_dir`` into ``out_dir`` (see the module
    docstring); returns ``out_dir``. Rerunning rewrites the same files (the copy is deterministic)."""
    src, out = Path(phantom_dir), Path(out_dir)
    if image_format not in ("png", "jpg"):
        raise CxrExplainError(f"image_format {image_format!r} must be 'png' or 'jpg'")
    if not 0.0 <= float(uncertain_fraction) <= 1.0:
        raise CxrExplainError(f"uncertain_fraction {uncertain_fraction} must be in [0, 1]")
    meta = src / "phantom.json"
    try:
        phantom = json.loads(meta.read_text()) if meta.is_file() else {}
        layout = phantom.get("layout")
    except (ValueError, AttributeError):
        raise DataError(f"{meta} is not valid JSON; regenerate the benchmark") from None
    if layout != "nih":
        raise DataError(f"{src}: not a synthetic benchmark in the NIH layout (phantom.json layout: {layout!r}); "
                        "generate one with `cxr-explain phantom --layout nih`")
    if out.resolve() == src.resolve():
        raise CxrExplainError(f"{out}: write the copy into another folder than the benchmark")
    df = read_data_entry(src / "Data_Entry_2017.csv", known=FINDINGS + (NO_FINDING,))
    splits = read_split_csv(src / "split.csv")
    masks = read_masks_csv(src / "masks.csv", known=FINDINGS)
    files = find_nih_images(src)
    rng = np.random.default_rng(seed)
    rows: dict[str, list[list[str]]] = {sp: [] for sp in SPLIT_CSV_NAMES}
    gt: dict[str, dict[str, dict[str, np.ndarray]]] = {"val": {}, "test": {}}
    id_map: dict[str, str] = {}
    for r in df.to_dict("records"):
        name = r["Image Index"]
        sp = splits.get(name)
        if sp is None:
            raise DataError(f"{src / 'split.csv'}: image {name!r} has no split")
        path = files.get(name)
        if path is None:
            raise DataError(f"{src}: image file {name} listed in Data_Entry_2017.csv is missing")
        pid = int(r["Patient ID"])
        study = int(r["Follow-up #"]) + 1
        iid = f"patient{pid:05d}_study{study}_view1_frontal"
        rel = Path("CheXpert") / sp / f"patient{pid:05d}" / f"study{study}" / f"view1_frontal.{image_format}"
        _copy_image(path, out / rel, image_format)
        found = set(r["labels"]) - {NO_FINDING}
        truth = np.array([1.0 if f in found else 0.0 for f in FINDINGS])
        if sp == "train":
            u = rng.random(len(FINDINGS))
            blank = rng.random(len(FINDINGS)) < 0.5
            vals = np.where(u < uncertain_fraction, -1.0, np.where((truth == 0) & blank, np.nan, truth))
        else:
            vals = truth
        view = str(r.get("View Position", "")).strip() or "PA"
        sex = _SEX.get(str(r.get("Patient Gender", "")).strip(), "Unknown")
        age = r.get("Patient Age", float("nan"))
        rows[sp].append([rel.as_posix(), sex, "" if age != age else str(int(age)), "Frontal", view,
                         "1.0" if not found else ""] + [_cell(v) for v in vals])
        id_map[iid] = name
        if sp in gt and found:
            per = {f: read_mask(p) for f, p in masks.get(name, {}).items()}
            hw = next(iter(per.values())).shape if per else _image_hw(path)
            gt[sp][iid] = {f: per.get(f, np.zeros(hw, dtype=bool)) for f in FINDINGS}
    (out / "CheXpert").mkdir(parents=True, exist_ok=True)
    for sp, name in SPLIT_CSV_NAMES.items():
        _write_csv(out / "CheXpert" / name, rows[sp])
    for sp, per in gt.items():
        write_segmentations(out / "CheXlocalize" / f"gt_segmentations_{sp}.json", per)
    manifest = {"source": src.name, "phantom": phantom, "uncertain_fraction": float(uncertain_fraction), "seed": int(seed),
                "image_format": image_format, "images": id_map}
    _atomic_text(out / EXPORT_MANIFEST, json.dumps(manifest, indent=1))
    return out


def _image_hw(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.height, im.width


def _copy_image(src: Path, dst: Path, fmt: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    if fmt == "png":
        shutil.copyfile(src, tmp)
    else:
        with Image.open(src) as im:
            im.convert("L").save(tmp, format="JPEG", quality=95)
    os.replace(tmp, dst)


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_HEADER)
    w.writerows(rows)
    _atomic_text(path, buf.getvalue())


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
