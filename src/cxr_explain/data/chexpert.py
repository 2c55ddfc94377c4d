"""CheXpert (Irvin et al., AAAI 2019): label CSVs, image paths, uncertainty policy, the dataset
(docs/data_formats.md §1.5).

Layouts searched under ``root`` (the first found per split; ``labels_csv=`` overrides):

* CheXpert's download: ``train.csv``, ``valid.csv`` (``test.csv``), images in ``train/``, ``valid/``;
* CheXlocalize's download: ``CheXpert/val_labels.csv``, ``CheXpert/test_labels.csv``, images in
  ``CheXpert/val/``, ``CheXpert/test/`` (also without the ``CheXpert/`` level).

CSV: ``Path`` (required; e.g. ``CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg``),
optional ``Sex``, ``Age``, ``Frontal/Lateral``, ``AP/PA``; every other column is a label, in file
order (CheXpert's 14: :data:`CHEXPERT_LABELS`). A label cell is ``1`` (positive), ``0`` (negative),
``-1`` (uncertain) or blank (not mentioned in the report); anything else is an error.

**Uncertainty policy** (Irvin et al.'s names), ``uncertain=``:
``"ones"`` (U-Ones, default): ``-1`` → 1; ``"zeros"`` (U-Zeros): ``-1`` → 0; ``"ignore"``
(U-Ignore): ``-1`` → NaN, which the AUROC code leaves out of that class. A blank cell is 0 under
every policy (not mentioned = negative, as CheXpert's authors train). The validation and test
labels are radiologist consensus and hold only 0 / 1.

**Views**: ``views="frontal"`` (default; AP and PA films), ``"lateral"`` or ``"all"``, from the
``Frontal/Lateral`` column, else from the file name (``view1_frontal.jpg``). ``Sample.view`` is
the ``AP/PA`` value of a frontal film and ``"Lateral"`` for a lateral one.

**Image ids** are CheXlocalize's: the last three parts of ``Path`` joined by ``_`` without the
extension (``patient64541_study1_view1_frontal``). A ``Path`` is resolved against the CSV's folder,
``root`` and their parents, dropping leading folders (the download's top folder is often renamed);
rows still unresolved are looked up by id among the image files under ``root``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd

from ..errors import DataError
from .folder import SampleDataset, read_csv_table
from .images import IMAGE_EXTENSIONS
from .labels import check_labels
from .types import Sample

__all__ = [
    "CHEXPERT_LABELS",
    "CHEXPERT_META_COLUMNS",
    "UNCERTAINTY_POLICIES",
    "LabelTable",
    "parse_label_values",
    "apply_uncertainty",
    "chexpert_image_id",
    "read_chexpert_csv",
    "find_chexpert_images",
    "resolve_image_paths",
    "CheXpertDataset",
]

PathLike = Union[str, Path]

#: CheXpert's 14 label columns, in the order of its CSV files.
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
#: Columns of a CheXpert CSV that are not labels.
CHEXPERT_META_COLUMNS: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
UNCERTAINTY_POLICIES: tuple[str, ...] = ("ones", "zeros", "ignore")
VIEW_CHOICES: tuple[str, ...] = ("frontal", "lateral", "all")
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
_SPLIT_ALIASES = {"valid": "val", "validation": "val", "validate": "val"}
#: Label CSV file names tried per split, in order, in ``root`` and then ``root/CheXpert``.
CSV_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("train.csv", "train_labels.csv"),
    "val": ("valid.csv", "val_labels.csv", "val.csv"),
    "test": ("test.csv", "test_labels.csv"),
}


def canonical_split(split: Optional[str], source: object = "split") -> Optional[str]:
    """``"valid"`` / ``"validate"`` → ``"val"``; None stays None; DataError for anything else."""
    if split is None:
        return None
    s = _SPLIT_ALIASES.get(str(split).strip().lower(), str(split).strip().lower())
    if s not in SPLIT_NAMES:
        raise DataError(f"{source}: split {split!r} must be one of train, val (valid), test or None")
    return s


def canonical_views(views: Optional[str], source: object = "views") -> str:
    v = "all" if views is None else str(views).strip().lower()
    if v not in VIEW_CHOICES:
        raise DataError(f"{source}: views={views!r} must be one of {', '.join(VIEW_CHOICES)}")
    return v


# ----------------------------------------------------------------------------------- labels
def parse_label_values(column: Sequence[str], source: PathLike, name: str) -> np.ndarray:
    """CSV cells of one label column → float32 codes ``1, 0, -1`` and NaN for blank.

    Accepts ``1``, ``1.0``, ``0``, ``0.0``, ``-1``, ``-1.0`` (spaces stripped) and the empty cell;
    DataError naming the file, line and column for anything else."""
    out = np.empty(len(column), dtype=np.float32)
    for k, text in enumerate(column):
        t = str(text).strip()
        if t == "":
            out[k] = np.nan
            continue
        try:
            v = float(t)
        except ValueError:
            v = None
        if v not in (1.0, 0.0, -1.0):
            raise DataError(
                f"{source} (line {k + 2}): label {name!r} is {t!r}; use 1, 0, -1 (uncertain) or leave it blank"
            )
        out[k] = v
    return out


def apply_uncertainty(raw: np.ndarray, policy: str = "ones") -> np.ndarray:
    """Codes (1, 0, -1, NaN = blank) → training labels: blank → 0; ``-1`` → 1 (``"ones"``),
    0 (``"zeros"``) or NaN (``"ignore"``). Returns float32 of the same shape."""
    if policy not in UNCERTAINTY_POLICIES:
        raise DataError(f"uncertainty policy {policy!r} must be one of {', '.join(UNCERTAINTY_POLICIES)}")
    raw = np.asarray(raw, dtype=np.float32)
    out = np.where(np.isnan(raw), np.float32(0.0), raw)
    fill = {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}[policy]
    return np.where(out == -1.0, np.float32(fill), out).astype(np.float32)


def chexpert_image_id(path: str) -> str:
    """``.../patient64541/study1/view1_frontal.jpg`` → ``patient64541_study1_view1_frontal``."""
    parts = PurePosixPath(path.strip().replace("\\", "/")).parts
    if len(parts) < 3:
        raise ValueError(path)
    return "_".join(parts[-3:-1] + (PurePosixPath(parts[-1]).stem,))


@dataclass
class LabelTable:
    """One label CSV: ``rows`` (``image_id``, ``path``, ``patient_id``, ``study``, ``view``,
    ``ap_pa``, ``sex``, ``age``; one per image, file order), ``raw`` label codes (N×F float32:
    1, 0, -1, NaN = blank) over ``findings`` (the label columns, file order)."""

    source: Path
    findings: tuple[str, ...]
    rows: pd.DataFrame
    raw: np.ndarray

    def labels(self, policy: str = "ones") -> np.ndarray:
        """N×F float32 labels under the uncertainty ``policy`` (:func:`apply_uncertainty`)."""
        return apply_uncertainty(self.raw, policy)


def _view_of(path: str, column_value: str) -> str:
    v = column_value.strip().lower()
    if v in ("frontal", "lateral"):
        return v
    name = PurePosixPath(path.replace("\\", "/")).name.lower()
    return "frontal" if "frontal" in name else ("lateral" if "lateral" in name else "")


def read_chexpert_csv(csv_path: PathLike) -> LabelTable:
    """Read a CheXpert-style label CSV (``train.csv``, ``valid.csv``, ``val_labels.csv`` …).

    DataError (file and line) for a missing ``Path`` column, a CSV without label columns, an
    empty or too short ``Path`` (it needs ``patient/study/view`` parts), the same image twice, or a
    label value other than 1 / 0 / -1 / blank."""
    p = Path(csv_path)
    df = read_csv_table(p, required=["Path"])
    findings = tuple(c for c in df.columns if c not in CHEXPERT_META_COLUMNS and not c.startswith("Unnamed:"))
    if not findings:
        raise DataError(f"{p}: no label columns after {', '.join(CHEXPERT_META_COLUMNS)}; is this a label CSV?")
    ids, paths = [], []
    for k, path in enumerate(df["Path"]):
        try:
            ids.append(chexpert_image_id(path))
        except ValueError:
            raise DataError(
                f"{p} (line {k + 2}): Path {path!r} needs at least patient/study/view parts "
                "(e.g. valid/patient64541/study1/view1_frontal.jpg)"
            ) from None
        paths.append(path.strip())
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        k = int(np.argmax(dup))
        raise DataError(f"{p} (line {k + 2}): image {ids[k]!r} appears twice")
    col = lambda c: list(df[c]) if c in df.columns else [""] * len(df)  # noqa: E731
    rows = pd.DataFrame({
        "image_id": ids,
        "path": paths,
        "patient_id": [i.split("_")[0] for i in ids],
        "study": [i.split("_")[1] for i in ids],
        "view": [_view_of(pth, v) for pth, v in zip(paths, col("Frontal/Lateral"))],
        "ap_pa": [v.strip() for v in col("AP/PA")],
        "sex": [v.strip() for v in col("Sex")],
        "age": pd.to_numeric(pd.Series(col("Age"), dtype=str).str.strip(), errors="coerce"),
    })
    raw = np.stack([parse_label_values(df[c], p, c) for c in findings], axis=1) if len(df) else \
        np.zeros((0, len(findings)), dtype=np.float32)
    return LabelTable(p, findings, rows, raw.astype(np.float32))


# ----------------------------------------------------------------------------------- images
def find_chexpert_images(root: PathLike) -> dict[str, Path]:
    """``{image id: path}`` for every image file under ``root`` (recursive; hidden folders skipped),
    the id made from its last three path parts as :func:`chexpert_image_id` does."""
    out: dict[str, Path] = {}
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith(".") or os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            full = Path(dirpath) / f
            try:
                iid = chexpert_image_id(full.relative_to(root).as_posix())
            except ValueError:  # fewer than three parts below root
                continue
            out.setdefault(iid, full)
    return out


def resolve_image_paths(paths: Sequence[str], ids: Sequence[str], bases: Sequence[Path],
                        scan_root: Optional[Path]) -> dict[str, Path]:
    """``{image id: file}`` for the CSV ``paths``: each is tried under each of ``bases`` with 0, 1, …
    leading folders dropped (the last way that worked is tried first); ids still unresolved are
    looked up among the images under ``scan_root`` (:func:`find_chexpert_images`). Ids with no
    file are absent from the result."""
    found: dict[str, Path] = {}
    last: Optional[tuple[Path, int]] = None
    todo: list[str] = []
    for rel, iid in zip(paths, ids):
        parts = PurePosixPath(rel.replace("\\", "/")).parts
        hit = None
        if last is not None and last[1] < len(parts):
            cand = last[0].joinpath(*parts[last[1]:])
            hit = cand if cand.is_file() else None
        if hit is None:
            for base in bases:
                for k in range(max(1, len(parts) - 2)):
                    cand = base.joinpath(*parts[k:])
                    if cand.is_file():
                        hit, last = cand, (base, k)
                        break
                if hit is not None:
                    break
        if hit is None:
            todo.append(iid)
        else:
            found[iid] = hit
    if todo and scan_root is not None and scan_root.is_dir():
        index = find_chexpert_images(scan_root)
        for iid in todo:
            if iid in index:
                found[iid] = index[iid]
    return found


def find_label_csv(root: Path, split: str) -> Optional[Path]:
    """The first of :data:`CSV_NAMES` ``[split]`` in ``root`` or ``root/CheXpert``; None if none."""
    for folder in (root, root / "CheXpert"):
        for name in CSV_NAMES[split]:
            if (folder / name).is_file():
                return folder / name
    return None


# ----------------------------------------------------------------------------------- dataset
class CheXpertDataset(SampleDataset):
    """CheXpert (or any CSV in its format) as :class:`Sample` s with labels over ``findings``.

    ``split``: ``"train"``, ``"val"`` (``"valid"``), ``"test"`` or None (every label CSV found,
    one after another); ``image_split`` maps each id to its split. ``findings`` defaults to the
    CSV's label columns (a given name must be one of them). ``uncertain`` and ``views`` as in the
    module docstring. Rows whose image file is not found are left out, listed in ``missing`` and
    warned about. ``table`` keeps the parsed CSV(s) (raw codes included)."""

    name = "CheXpert dataset"

    def __init__(
        self,
        root: PathLike,
        split: Optional[str] = "val",
        findings: Optional[Sequence[str]] = None,
        *,
        uncertain: str = "ones",
        views: Optional[str] = "frontal",
        labels_csv: Optional[PathLike] = None,
        images_dir: Optional[PathLike] = None,
    ):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: CheXpert dataset folder not found")
        if uncertain not in UNCERTAINTY_POLICIES:
            raise DataError(f"{self.name}: uncertain={uncertain!r} must be one of {', '.join(UNCERTAINTY_POLICIES)}")
        self.root = root
        self.name = f"{type(self).name} at {root}"
        split = canonical_split(split, self.name)
        views = canonical_views(views, self.name)
        csvs = self._label_csvs(root, split, labels_csv)
        tables = [(sp, read_chexpert_csv(c)) for sp, c in csvs]
        cols = tables[0][1].findings
        for _, t in tables[1:]:
            if t.findings != cols:
                raise DataError(f"{t.source}: label columns {', '.join(t.findings)} differ from "
                                f"{tables[0][1].source}'s ({', '.join(cols)}); pass split= to read one file")
        if findings is None:
            findings = cols
        findings = tuple(check_labels(findings, known=cols, source=tables[0][1].source, where="findings="))
        col_idx = [cols.index(f) for f in findings]
        self.uncertain, self.views = uncertain, views
        self.label_columns = cols
        self.tables = [t for _, t in tables]
        self.image_split: dict[str, str] = {}
        samples: list[Sample] = []
        missing: list[str] = []
        img_root = Path(images_dir) if images_dir else root
        for sp, t in tables:
            bases = list(dict.fromkeys([img_root, t.source.parent, root, root.parent, t.source.parent.parent]))
            files = resolve_image_paths(list(t.rows["path"]), list(t.rows["image_id"]), bases, img_root)
            labels = t.labels(uncertain)[:, col_idx]
            for k, r in enumerate(t.rows.itertuples(index=False)):
                if views != "all" and r.view != views:
                    continue
                if r.image_id in self.image_split:
                    raise DataError(f"{t.source}: image {r.image_id!r} is also listed in another label file")
                path = files.get(r.image_id)
                if path is None:
                    missing.append(r.image_id)
                    continue
                view = (r.ap_pa or "Frontal") if r.view == "frontal" else ("Lateral" if r.view == "lateral" else None)
                samples.append(Sample(r.image_id, path, labels[k].copy(), patient_id=r.patient_id, view=view))
                self.image_split[r.image_id] = sp
        super().__init__(findings, samples)
        self.split = split
        self.missing = missing
        self._report("images listed in the label CSV have no file and are left out", missing, self.name)

    def splits(self) -> dict[str, str]:
        """``{image id: split}`` from the label file each image came from (``image_split``)."""
        if self.split:
            return super().splits()
        return {i: str(self.image_split[i]) for i in self.ids if i in self.image_split}

    def _label_csvs(self, root: Path, split: Optional[str], labels_csv: Optional[PathLike]) -> list[tuple[str, Path]]:
        if labels_csv is not None:
            p = Path(labels_csv)
            if not p.is_file():
                raise DataError(f"{p}: label CSV not found")
            return [(split or "", p)]
        if split is not None:
            p = find_label_csv(root, split)
            if p is None:
                names = ", ".join(CSV_NAMES[split])
                raise DataError(f"{root}: no {split} label CSV ({names}) in the folder or its CheXpert/ "
                                "subfolder; pass labels_csv=")
            return [(split, p)]
        found = [(sp, find_label_csv(root, sp)) for sp in SPLIT_NAMES]
        found = [(sp, p) for sp, p in found if p is not None]
        if not found:
            raise DataError(f"{root}: no CheXpert label CSV (train.csv, valid.csv, val_labels.csv, test_labels.csv) "
                            "in the folder or its CheXpert/ subfolder")
        return found
