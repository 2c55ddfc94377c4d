"""RSNA Pneumonia Detection Challenge: labels CSV, class info, DICOM folder, the dataset.

Layout under ``root``: ``stage_2_train_labels.csv`` (``patientId,x,y,width,height,Target``; one
row per box, or one row with empty coordinates and ``Target=0``), optional
``stage_2_detailed_class_info.csv`` (``patientId,class``), optional ``split.csv``
(``patientId,split``), optional ``masks.csv`` (``patientId,Finding Label,Mask Path``, synthetic
benchmark), images ``stage_2_train_images/<patientId>.dcm`` (``.png``/``.jpg`` copies
are accepted too).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import DataError
from .folder import SampleDataset, parse_float, image_size_wh, patient_split, read_csv_table
from .images import IMAGE_EXTENSIONS
from .labels import RSNA_FINDINGS, check_labels
from .nih import SPLITS, read_mask, read_masks_csv, read_split_csv
from .types import Box, Sample

__all__ = ["read_rsna_labels", "read_rsna_class_info", "RSNADataset", "RSNA_CLASSES"]

PathLike = Union[str, Path]
RSNA_CLASSES = ("Lung Opacity", "No Lung Opacity / Not Normal", "Normal")
BOX_FINDING = "Pneumonia"


def read_rsna_labels(
    csv_path: PathLike, image_size: Union[int, tuple[int, int], None] = 1024
) -> tuple[dict[str, int], dict[str, list[Box]]]:
    """``stage_2_train_labels.csv`` → ``({patientId: Target}, {patientId: [Box('Pneumonia', ...)]})``.

    Patient order follows the file. Raises DataError (file + line) for a missing column, a Target
    other than 0/1, a positive row without coordinates, a negative row with coordinates, a patient
    with both targets, or a box outside the ``image_size`` image / with non-positive size.
    """
    p = Path(csv_path)
    cols = ["patientId", "x", "y", "width", "height", "Target"]
    df = read_csv_table(p, required=cols)
    size_w, size_h = image_size_wh(image_size)
    targets: dict[str, int] = {}
    boxes: dict[str, list[Box]] = {}
    for k, rec in enumerate(zip(*(df[c] for c in cols))):
        line = k + 2
        pid = rec[0].strip()
        if not pid:
            raise DataError(f"{p} (line {line}): empty patientId")
        t = rec[5].strip()
        if t not in ("0", "1", "0.0", "1.0"):
            raise DataError(f"{p} (line {line}): Target must be 0 or 1, got {t!r}")
        target = int(float(t))
        if pid in targets and targets[pid] != target:
            raise DataError(f"{p} (line {line}): patient {pid} has rows with Target 0 and Target 1")
        targets[pid] = target
        coords = [v.strip() for v in rec[1:5]]
        if target == 0:
            if any(coords):
                raise DataError(f"{p} (line {line}): Target=0 row for {pid} has box coordinates; clear them")
            boxes.setdefault(pid, [])
            continue
        if not all(coords):
            raise DataError(f"{p} (line {line}): Target=1 row for {pid} lacks box coordinates")
        x, y, w, h = (parse_float(v, p, line, c) for v, c in zip(coords, cols[1:5]))
        if w <= 0 or h <= 0:
            raise DataError(f"{p} (line {line}): box for {pid} has non-positive size width={w}, height={h}")
        if x < 0 or y < 0 or (size_w is not None and (x + w > size_w + 1e-3 or y + h > size_h + 1e-3)):
            raise DataError(
                f"{p} (line {line}): box for {pid} (x={x:g}, y={y:g}, width={w:g}, height={h:g}) lies "
                f"outside the {size_w}x{size_h} image; fix the row or pass the right image_size"
            )
        boxes.setdefault(pid, []).append(Box(BOX_FINDING, x, y, w, h))
    return targets, boxes


def read_rsna_class_info(csv_path: PathLike) -> dict[str, str]:
    """``stage_2_detailed_class_info.csv`` (``patientId,class``) → ``{patientId: class}``;
    DataError for an unknown class or a patient with two different classes."""
    p = Path(csv_path)
    df = read_csv_table(p, required=["patientId", "class"])
    out: dict[str, str] = {}
    for k, (pid, cls) in enumerate(zip(df["patientId"], df["class"])):
        pid, cls = pid.strip(), cls.strip()
        check_labels([cls], known=RSNA_CLASSES, source=p, where=f"line {k + 2}")
        if out.get(pid, cls) != cls:
            raise DataError(f"{p} (line {k + 2}): patient {pid} has classes {out[pid]!r} and {cls!r}")
        out[pid] = cls
    return out


def _find_images(folder: Path) -> dict[str, Path]:
    """``{patientId: path}`` for ``<patientId>.dcm`` (preferred) / ``.png`` / ``.jpg`` in ``folder``."""
    rank = {".dcm": 0, ".dicom": 1, ".png": 2, ".jpg": 3, ".jpeg": 4}
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    for e in os.scandir(folder):
        stem, ext = os.path.splitext(e.name)
        ext = ext.lower()
        if ext in IMAGE_EXTENSIONS and (stem not in out or rank[ext] < rank[out[stem].suffix.lower()]):
            out[stem] = Path(e.path)
    return out


class RSNADataset(SampleDataset):
    """RSNA Pneumonia as :class:`Sample` s: labels = ``[Target]`` per name in ``findings``
    (``"Pneumonia"`` and/or ``"Lung Opacity"``), boxes with finding ``"Pneumonia"``.

    ``split``: ``"train"`` / ``"val"`` from ``split.csv`` when present, else a deterministic
    patient-level split (stratified by Target) with ``val_fraction`` and ``seed``
    (:func:`~cxr_explain.data.folder.patient_split`); ``"test"`` only from ``split.csv``;
    None = all. Patients without an image file are left out and listed in ``missing``.
    """

    name = "RSNA dataset"

    def __init__(
        self,
        root: PathLike,
        split: Optional[str] = "train",
        seed: int = 0,
        val_fraction: float = 0.1,
        findings: Sequence[str] = ("Pneumonia",),
        *,
        labels_csv: Optional[PathLike] = None,
        class_info_csv: Optional[PathLike] = None,
        split_csv: Optional[PathLike] = None,
        masks_csv: Optional[PathLike] = None,
        images_dir: Optional[PathLike] = None,
        image_size: Union[int, tuple[int, int], None] = 1024,
    ):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: RSNA dataset folder not found")
        self.root = root
        self.name = f"RSNA dataset at {root}"
        findings = tuple(check_labels(findings, known=RSNA_FINDINGS, source="RSNADataset", where="findings="))
        lab_path = Path(labels_csv) if labels_csv else root / "stage_2_train_labels.csv"
        if not lab_path.is_file():
            raise DataError(f"{lab_path}: RSNA labels CSV not found; pass labels_csv= with its path")
        targets, boxes = read_rsna_labels(lab_path, image_size=image_size)
        ci_path = Path(class_info_csv) if class_info_csv else root / "stage_2_detailed_class_info.csv"
        self.class_info: dict[str, str] = read_rsna_class_info(ci_path) if ci_path.is_file() else {}
        for pid, cls in self.class_info.items():
            if pid in targets and (cls == "Lung Opacity") != (targets[pid] == 1):
                raise DataError(f"{ci_path}: patient {pid} is {cls!r} but its Target is {targets[pid]}")

        mp = Path(masks_csv) if masks_csv else root / "masks.csv"
        self._mask_paths = (
            read_masks_csv(mp, known=(BOX_FINDING,), id_column=_id_column(mp)) if mp.is_file() else {}
        )

        ids = list(targets)
        missing_rows: list[str] = []
        self._split_source = (targets, split_csv, seed, val_fraction)
        self._split_table: Optional[dict[str, str]] = None
        if split is None:
            keep = set(ids)
        else:
            split = str(split).lower()
            keep, missing_rows = _split_ids(root, split, targets, split_csv, seed, val_fraction)

        img_dir = Path(images_dir) if images_dir else root / "stage_2_train_images"
        files = _find_images(img_dir)
        if not files:
            raise DataError(f"{img_dir}: no images found; expected <patientId>.dcm files (pass images_dir=)")
        samples: list[Sample] = []
        missing: list[str] = []
        for pid in ids:
            if pid not in keep:
                continue
            path = files.get(pid)
            if path is None:
                missing.append(pid)
                continue
            vec = np.full(len(findings), float(targets[pid]), dtype=np.float32)
            samples.append(Sample(pid, path, vec, boxes=list(boxes.get(pid, [])), patient_id=pid))
        super().__init__(findings, samples)
        self.split = split
        self.missing = missing
        self.missing_rows = missing_rows
        self._report("patients have no image file and are left out", missing, self.name)
        self._report("patients in split.csv have no labels row", missing_rows, lab_path)

    def splits(self) -> dict[str, str]:
        """``{patientId: split}`` for every image: from ``split.csv`` when present, else the
        patient-level train / val split the constructor makes with this dataset's ``seed`` and
        ``val_fraction``. A dataset restricted to one split names it for every image."""
        if self.split:
            return super().splits()
        if self._split_table is None:
            table: dict[str, str] = {}
            ids = set(self.ids)
            targets, split_csv, seed, val_fraction = self._split_source
            for sp in SPLITS:
                try:
                    keep, _ = _split_ids(self.root, sp, targets, split_csv, seed, val_fraction)
                except DataError:  # no test split without split.csv
                    continue
                table.update({k: sp for k in sorted(keep) if k in ids})
            self._split_table = table
        return dict(self._split_table)

    def mask_findings(self, i: int) -> list[str]:
        """Every name in ``findings`` when ``masks.csv`` has a Pneumonia mask for sample ``i``, else
        none (the mask is not decoded)."""
        return list(self.findings) if self._mask_paths.get(self.samples[i].image_id, {}).get(BOX_FINDING) else []

    def __getitem__(self, i: int) -> Sample:
        """The sample; a ``masks.csv`` Pneumonia mask is attached under each of ``findings``."""
        s = self.samples[i]
        paths = self._mask_paths.get(s.image_id, {}).get(BOX_FINDING)
        if not paths:
            return s
        m = read_mask(paths)
        masks = {f: m for f in self.findings}
        return Sample(s.image_id, s.path, s.labels, list(s.boxes), masks, s.patient_id, s.view)


def _split_ids(root: Path, split: str, targets: dict[str, int], split_csv: Optional[PathLike], seed: int,
               val_fraction: float) -> tuple[set[str], list[str]]:
    """The patients of ``split`` (from ``split.csv``, else a patient-level split stratified by
    Target) and the split-file patients that have no labels row."""
    if split not in SPLITS:
        raise DataError(f"{root}: split={split!r} must be one of train, val, test or None")
    ids = list(targets)
    sc = Path(split_csv) if split_csv else root / "split.csv"
    if sc.is_file():
        table = read_split_csv(sc, _id_column(sc))
        chosen = [k for k, v in table.items() if v == split]
        return set(chosen) & set(ids), [k for k in chosen if k not in targets]
    if split == "test":
        raise DataError(f"{root}: split='test' needs a split.csv (patientId,split); RSNA stage 2 "
                        "test labels were never released")
    val = patient_split(ids, ids, val_fraction, seed, strata=[targets[i] for i in ids])
    return (val if split == "val" else set(ids) - val), []


def _id_column(csv_path: Path) -> str:
    """``patientId`` if the CSV header has it, else ``Image Index``."""
    with open(csv_path, encoding="utf-8-sig") as fh:
        header = [c.strip() for c in fh.readline().split(",")]
    return "patientId" if "patientId" in header else "Image Index"
