"""MIMIC-CXR-JPG (Johnson et al. 2019): CheXpert-style labels, the official split, view metadata
(docs/data_formats.md §1.6).

Files under ``root`` (each also as ``.csv.gz``; each can be passed explicitly):

* ``mimic-cxr-2.0.0-chexpert.csv``: ``subject_id, study_id`` and one column per label (CheXpert's
  14 names, alphabetical); one row per **study**, cells 1 / 0 / -1 (uncertain) / blank, read with
  the same uncertainty policy as CheXpert (:mod:`.chexpert`: ``"ones"``, ``"zeros"``, ``"ignore"``;
  blank → 0). Every image of a study gets the study's labels.
* ``mimic-cxr-2.0.0-split.csv``: ``dicom_id, study_id, subject_id, split`` (``train`` /
  ``validate`` / ``test``; ``validate`` is called ``"val"`` here); one row per image (required:
  it lists the images).
* ``mimic-cxr-2.0.0-metadata.csv``: ``dicom_id`` and ``ViewPosition`` (``PA``, ``AP``,
  ``LATERAL``, ``LL`` …); needed for ``views="frontal"`` (PA and AP, the default) or
  ``"lateral"`` (LATERAL and LL).

Images: ``files/p<first 2 digits of subject>/p<subject_id>/s<study_id>/<dicom_id>.jpg``
(e.g. ``files/p10/p10000032/s50414267/02aa804e-….jpg``). Image id = ``dicom_id``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import DataError
from .chexpert import UNCERTAINTY_POLICIES, apply_uncertainty, canonical_split, canonical_views, parse_label_values
from .folder import SampleDataset, read_csv_table
from .labels import check_labels
from .types import Sample

__all__ = [
    "MIMIC_LABELS_CSV",
    "MIMIC_SPLIT_CSV",
    "MIMIC_METADATA_CSV",
    "read_mimic_labels",
    "read_mimic_split",
    "read_mimic_views",
    "mimic_image_path",
    "MIMICDataset",
]

PathLike = Union[str, Path]
MIMIC_LABELS_CSV = "mimic-cxr-2.0.0-chexpert.csv"
MIMIC_SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
MIMIC_METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
FRONTAL_POSITIONS = ("PA", "AP")
LATERAL_POSITIONS = ("LATERAL", "LL")
_KEY_COLUMNS = ("subject_id", "study_id")


def _find(root: Path, name: str) -> Optional[Path]:
    for n in (name, name + ".gz"):
        if (root / n).is_file():
            return root / n
    return None


def _ids(values, p: Path, col: str) -> list[str]:
    """Integer-valued id cells as canonical strings (``"10000032"``; ``"10000032.0"`` accepted)."""
    out = []
    for k, v in enumerate(values):
        t = str(v).strip()
        try:
            f = float(t)
            ok = f.is_integer() and f >= 0
        except ValueError:
            ok = False
        if not ok:
            raise DataError(f"{p} (line {k + 2}): {col} {t!r} is not a non-negative integer")
        out.append(str(int(f)))
    return out


def read_mimic_labels(csv_path: PathLike) -> tuple[tuple[str, ...], dict[tuple[str, str], np.ndarray]]:
    """``mimic-cxr-2.0.0-chexpert.csv`` → ``(label names, {(subject_id, study_id): raw codes})``
    with codes 1, 0, -1 and NaN for blank (float32). DataError (file, line) for a bad id, a bad
    label value or a study listed twice."""
    p = Path(csv_path)
    df = read_csv_table(p, required=list(_KEY_COLUMNS))
    names = tuple(c for c in df.columns if c not in _KEY_COLUMNS and not c.startswith("Unnamed:"))
    if not names:
        raise DataError(f"{p}: no label columns besides subject_id, study_id")
    subj, study = _ids(df["subject_id"], p, "subject_id"), _ids(df["study_id"], p, "study_id")
    raw = np.stack([parse_label_values(df[c], p, c) for c in names], axis=1) if len(df) else \
        np.zeros((0, len(names)), dtype=np.float32)
    out: dict[tuple[str, str], np.ndarray] = {}
    for k, key in enumerate(zip(subj, study)):
        if key in out:
            raise DataError(f"{p} (line {k + 2}): study {key[1]} of subject {key[0]} appears twice")
        out[key] = raw[k]
    return names, out


def read_mimic_split(csv_path: PathLike) -> list[tuple[str, str, str, str]]:
    """``mimic-cxr-2.0.0-split.csv`` → ``[(dicom_id, subject_id, study_id, split)]`` in file order,
    split ``train`` / ``val`` / ``test`` (``validate`` → ``val``)."""
    p = Path(csv_path)
    df = read_csv_table(p, required=["dicom_id", "study_id", "subject_id", "split"])
    subj, study = _ids(df["subject_id"], p, "subject_id"), _ids(df["study_id"], p, "study_id")
    out, seen = [], set()
    for k, (d, s, st, sp) in enumerate(zip(df["dicom_id"], subj, study, df["split"])):
        d = d.strip()
        if not d:
            raise DataError(f"{p} (line {k + 2}): empty dicom_id")
        if d in seen:
            raise DataError(f"{p} (line {k + 2}): dicom_id {d!r} appears twice")
        seen.add(d)
        try:
            split = canonical_split(sp.strip() or "?", f"{p} (line {k + 2})")
        except DataError:
            raise DataError(f"{p} (line {k + 2}): split {sp!r} is not one of train, validate, test") from None
        out.append((d, s, st, split))
    return out


def read_mimic_views(csv_path: PathLike) -> dict[str, str]:
    """``mimic-cxr-2.0.0-metadata.csv`` → ``{dicom_id: ViewPosition}`` (upper case, may be empty)."""
    p = Path(csv_path)
    df = read_csv_table(p, required=["dicom_id", "ViewPosition"])
    return {d.strip(): v.strip().upper() for d, v in zip(df["dicom_id"], df["ViewPosition"])}


def mimic_image_path(root: PathLike, subject_id: str, study_id: str, dicom_id: str, ext: str = ".jpg") -> Path:
    """``root/files/p10/p10000032/s50414267/<dicom_id>.jpg``."""
    return Path(root) / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}" / f"{dicom_id}{ext}"


class MIMICDataset(SampleDataset):
    """MIMIC-CXR-JPG as :class:`Sample` s (one per image of the split, labels of its study).

    ``split``: ``"train"``, ``"val"`` (``validate``), ``"test"`` or None (all); ``image_split``
    maps every id to its split. ``findings`` defaults to the label columns. Images whose study has
    no label row are left out and listed in ``missing_rows``; images without a file in
    ``missing``; both are warned about."""

    name = "MIMIC-CXR-JPG dataset"

    def __init__(
        self,
        root: PathLike,
        split: Optional[str] = "test",
        findings: Optional[Sequence[str]] = None,
        *,
        uncertain: str = "ones",
        views: Optional[str] = "frontal",
        labels_csv: Optional[PathLike] = None,
        split_csv: Optional[PathLike] = None,
        metadata_csv: Optional[PathLike] = None,
        images_dir: Optional[PathLike] = None,
    ):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: MIMIC-CXR-JPG folder not found")
        if uncertain not in UNCERTAINTY_POLICIES:
            raise DataError(f"{self.name}: uncertain={uncertain!r} must be one of {', '.join(UNCERTAINTY_POLICIES)}")
        self.root = root
        self.name = f"MIMIC-CXR-JPG dataset at {root}"
        split = canonical_split(split, self.name)
        views = canonical_views(views, self.name)
        lab = Path(labels_csv) if labels_csv else _find(root, MIMIC_LABELS_CSV)
        if lab is None:
            raise DataError(f"{root}: no {MIMIC_LABELS_CSV}(.gz); pass labels_csv= with its path")
        spl = Path(split_csv) if split_csv else _find(root, MIMIC_SPLIT_CSV)
        if spl is None:
            raise DataError(f"{root}: no {MIMIC_SPLIT_CSV}(.gz) (it lists the images); pass split_csv= with its path")
        names, studies = read_mimic_labels(lab)
        if findings is None:
            findings = names
        findings = tuple(check_labels(findings, known=names, source=lab, where="findings="))
        col_idx = [names.index(f) for f in findings]
        positions: dict[str, str] = {}
        if views != "all":
            meta = Path(metadata_csv) if metadata_csv else _find(root, MIMIC_METADATA_CSV)
            if meta is None:
                raise DataError(f"{root}: views={views!r} needs {MIMIC_METADATA_CSV}(.gz) (ViewPosition); "
                                "pass metadata_csv= or views='all'")
            positions = read_mimic_views(meta)
        want = FRONTAL_POSITIONS if views == "frontal" else LATERAL_POSITIONS
        img_root = Path(images_dir) if images_dir else root
        self.uncertain, self.views, self.label_columns = uncertain, views, names
        self.image_split: dict[str, str] = {}
        samples: list[Sample] = []
        missing: list[str] = []
        missing_rows: list[str] = []
        for dicom, subj, study, sp in read_mimic_split(spl):
            if split is not None and sp != split:
                continue
            pos = positions.get(dicom, "")
            if views != "all" and pos not in want:
                continue
            raw = studies.get((subj, study))
            if raw is None:
                missing_rows.append(dicom)
                continue
            path = mimic_image_path(img_root, subj, study, dicom)
            if not path.is_file():
                missing.append(dicom)
                continue
            vec = apply_uncertainty(raw, uncertain)[col_idx]
            samples.append(Sample(dicom, path, vec, patient_id=subj, view=pos or None))
            self.image_split[dicom] = sp
        super().__init__(findings, samples)
        self.split = split
        self.missing = missing
        self.missing_rows = missing_rows
        self._report("images have no file and are left out", missing, self.name)
        self._report("images belong to a study without a label row and are left out", missing_rows, lab)

    def splits(self) -> dict[str, str]:
        """``{image id: split}`` from the split file (``image_split``)."""
        if self.split:
            return super().splits()
        return {i: str(self.image_split[i]) for i in self.ids if i in self.image_split}
