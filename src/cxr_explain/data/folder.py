"""Generic datasets: the base every reader shares, and any folder of images with an optional CSV.

A dataset is a sequence of :class:`~cxr_explain.data.types.Sample` (labels, boxes, masks, path);
pixels are read on demand with :meth:`SampleDataset.read_image`, and
:meth:`SampleDataset.with_preprocessing` gives a torch ``Dataset`` of ``(tensor, labels, index)``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

from ..errors import DataError
from .images import IMAGE_EXTENSIONS, Preprocessing, XRay, read_image
from .labels import NO_FINDING, check_labels, parse_finding_labels
from .types import Box, Sample

__all__ = ["SampleDataset", "PreprocessedDataset", "FolderDataset", "patient_split", "read_csv_table", "parse_float"]

_SHOW = 5  # names quoted in a "missing" warning


class SampleDataset:
    """Base: ``findings`` (label order), ``samples``; ``missing`` = ids left out because their
    image file was not found; ``missing_rows`` = ids referenced (boxes, masks, split lists) that
    have no label row. Both are reported with a warning when non-empty."""

    name = "dataset"
    #: The split this dataset was restricted to (``"train"``, ``"val"``, ``"test"``), None for all images.
    split: Optional[str] = None

    def __init__(self, findings: Sequence[str], samples: list[Sample]):
        self.findings: tuple[str, ...] = tuple(findings)
        self.samples: list[Sample] = samples
        self.missing: list[str] = []
        self.missing_rows: list[str] = []
        self._index = {s.image_id: i for i, s in enumerate(samples)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    @property
    def ids(self) -> list[str]:
        return [s.image_id for s in self.samples]

    def index_of(self, image_id: str) -> int:
        """Position of ``image_id``; DataError if it is not in this dataset (or split)."""
        try:
            return self._index[image_id]
        except KeyError:
            raise DataError(f"{self.name}: image {image_id!r} is not in this dataset/split") from None

    def splits(self) -> dict[str, str]:
        """``{image id: split}`` for the images of this dataset whose split is known: here the
        dataset's own ``split`` for every image, ``{}`` when it has none (readers with a split
        file override this)."""
        return {i: str(self.split) for i in self.ids} if self.split else {}

    def split_of(self, i: int) -> Optional[str]:
        """The split (``"train"``, ``"val"``, ``"test"``) of sample ``i``; None when unknown."""
        return self.splits().get(self.samples[i].image_id)

    def mask_findings(self, i: int) -> list[str]:
        """Findings with an exact lesion mask for sample ``i`` (readers that keep mask paths answer
        without decoding the masks)."""
        return list(self[i].masks)

    def read_image(self, i: int) -> XRay:
        """Decode sample ``i``'s image (see :func:`~cxr_explain.data.images.read_image`)."""
        return read_image(self.samples[i].path)

    def label_matrix(self) -> np.ndarray:
        """N×F float32 matrix of labels, rows in dataset order, columns in ``findings`` order."""
        if not self.samples:
            return np.zeros((0, len(self.findings)), dtype=np.float32)
        return np.stack([s.labels for s in self.samples]).astype(np.float32)

    def with_preprocessing(self, pre: Preprocessing) -> "PreprocessedDataset":
        return PreprocessedDataset(self, pre)

    def _report(self, what: str, names: Sequence[str], source: object) -> None:
        if names:
            first = ", ".join(names[:_SHOW]) + (", ..." if len(names) > _SHOW else "")
            warnings.warn(f"{source}: {len(names)} {what} (first: {first})", stacklevel=3)


class PreprocessedDataset(torch.utils.data.Dataset):
    """``(x: C×S×S float32, y: F float32, index)`` per sample, for a ``DataLoader``."""

    def __init__(self, base: SampleDataset, pre: Preprocessing):
        self.base, self.pre = base, pre

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, _, _ = self.pre(self.base.read_image(i))
        return x, torch.from_numpy(np.asarray(self.base[i].labels, dtype=np.float32)), i


def image_size_wh(image_size) -> tuple:
    """``(width, height)`` from an image size given as one int (square), a (w, h) pair or None."""
    if image_size is None:
        return None, None
    if isinstance(image_size, int):
        return image_size, image_size
    return tuple(image_size)


def patient_split(
    ids: Sequence[str],
    patients: Sequence[str],
    val_fraction: float = 0.1,
    seed: int = 0,
    strata: Optional[Sequence[object]] = None,
) -> set[str]:
    """Ids whose patient falls in the validation part of a deterministic patient-level split.

    Patients (sorted, per stratum when ``strata`` gives each id's stratum; a patient takes the
    stratum of its first id) are permuted with ``numpy.random.default_rng(seed)``; the first
    ``round(n * val_fraction)`` of each stratum go to validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    stratum_of: dict[str, object] = {}
    for k, p in enumerate(patients):
        stratum_of.setdefault(p, strata[k] if strata is not None else 0)
    groups: dict[object, list[str]] = {}
    for p, s in stratum_of.items():
        groups.setdefault(s, []).append(p)
    rng = np.random.default_rng(seed)
    val_patients: set[str] = set()
    for s in sorted(groups, key=str):
        members = sorted(groups[s])
        order = rng.permutation(len(members))
        n_val = int(round(len(members) * val_fraction))
        val_patients.update(members[j] for j in order[:n_val])
    return {i for i, p in zip(ids, patients) if p in val_patients}


def read_csv_table(path: Union[str, Path], required: Iterable[str] = ()) -> pd.DataFrame:
    """Read a CSV as strings (no NaN conversion); DataError naming the file for a missing file,
    a parse error or a missing required column."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise DataError(f"{p}: the file is empty; expected a CSV with a header line") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise DataError(f"{p}: cannot parse CSV ({msg})") from e
    df.columns = [str(c).strip() for c in df.columns]
    for col in required:
        if col not in df.columns:
            raise DataError(
                f"{p}: missing column {col!r}; found columns: {', '.join(map(repr, df.columns))}"
            )
    return df


def parse_float(value: str, p: Path, line: int, col: str) -> float:
    """``float(value)`` of a CSV cell; DataError naming file, line and column when it is not a finite number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{p} (line {line}): column {col!r} is not a number: {value!r}") from None
    if not np.isfinite(v):
        raise DataError(f"{p} (line {line}): column {col!r} is not finite: {value!r}")
    return v


def _scan_images(root: Path) -> list[Path]:
    """Every png/jpg/jpeg/dcm/dicom file under ``root`` (hidden folders skipped), sorted."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / f)
    return found


class FolderDataset(SampleDataset):
    """Any folder of images (png / jpg / dcm, searched recursively), optionally with a CSV.

    CSV columns: ``image`` (path relative to ``root``, or a file name unique in the folder),
    optional ``labels`` (``|``-joined), optional box columns ``finding,x,y,w,h`` (all five; one
    row per box, several rows per image allowed, empty ``finding`` = no box). ``findings``
    defaults to the sorted labels seen (``No Finding`` excluded); given, unknown labels raise.
    Without a CSV every image is a sample with no labels. With one, CSV rows whose image is not
    found are listed in ``missing``, and images without a row in ``unlabelled`` (both left out).
    """

    name = "folder dataset"

    def __init__(
        self,
        root: Union[str, Path],
        labels_csv: Union[str, Path, None] = None,
        findings: Optional[Sequence[str]] = None,
    ):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: image folder not found; pass a directory of png/jpg/dcm files")
        self.root = root
        files = _scan_images(root)
        by_rel = {f.relative_to(root).as_posix(): f for f in files}
        self.unlabelled: list[str] = []
        if labels_csv is None:
            fnd = tuple(findings or ())
            samples = [
                Sample(image_id=rel, path=f, labels=np.zeros(len(fnd), dtype=np.float32))
                for rel, f in by_rel.items()
            ]
            super().__init__(fnd, samples)
            if not samples:
                raise DataError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
            return

        csv_path = Path(labels_csv)
        df = read_csv_table(csv_path, required=["image"])
        box_cols = ["finding", "x", "y", "w", "h"]
        has_boxes = any(c in df.columns for c in box_cols)
        if has_boxes:
            for c in box_cols:
                if c not in df.columns:
                    raise DataError(
                        f"{csv_path}: box columns need all of finding,x,y,w,h; missing column {c!r}"
                    )
        by_name: dict[str, list[str]] = {}
        for rel in by_rel:
            by_name.setdefault(rel.rsplit("/", 1)[-1], []).append(rel)

        labels_of: dict[str, list[str]] = {}
        boxes_of: dict[str, list[Box]] = {}
        order: list[str] = []
        missing: list[str] = []
        for k, row in enumerate(df.itertuples(index=False)):
            line = k + 2
            rec = dict(zip(df.columns, row))
            name = str(rec["image"]).strip()
            if not name:
                raise DataError(f"{csv_path} (line {line}): empty 'image' value")
            rel = self._resolve(name, by_rel, by_name, csv_path, line)
            if rel is None:
                if name not in missing:
                    missing.append(name)
                continue
            if rel not in labels_of:
                labels_of[rel], boxes_of[rel] = [], []
                order.append(rel)
            for lab in parse_finding_labels(rec.get("labels", "")):
                if lab not in labels_of[rel]:
                    labels_of[rel].append(lab)
            if has_boxes and str(rec["finding"]).strip():
                fnd = str(rec["finding"]).strip()
                x, y, w, h = (parse_float(rec[c], csv_path, line, c) for c in "xywh")
                if w <= 0 or h <= 0 or x < 0 or y < 0:
                    raise DataError(
                        f"{csv_path} (line {line}): box x={x}, y={y}, w={w}, h={h} has a negative "
                        "corner or a non-positive size; fix the row"
                    )
                boxes_of[rel].append(Box(fnd, x, y, w, h))
                if fnd not in labels_of[rel]:
                    labels_of[rel].append(fnd)

        if findings is None:
            seen = {lab for labs in labels_of.values() for lab in labs} - {NO_FINDING}
            fnd_t = tuple(sorted(seen))
        else:
            fnd_t = tuple(findings)
            known = fnd_t + (NO_FINDING,)
            for rel in order:
                check_labels(labels_of[rel], known=known, source=csv_path, where=f"image {rel!r}")
        samples = []
        for rel in order:
            labs = set(labels_of[rel])
            vec = np.array([1.0 if f in labs else 0.0 for f in fnd_t], dtype=np.float32)
            samples.append(Sample(image_id=rel, path=by_rel[rel], labels=vec, boxes=boxes_of[rel]))
        super().__init__(fnd_t, samples)
        self.missing = missing
        listed = set(order)
        self.unlabelled = [rel for rel in by_rel if rel not in listed]
        self._report("images listed in the CSV were not found under the folder and are left out",
                     self.missing, csv_path)
        self._report("images in the folder have no CSV row and are left out", self.unlabelled, root)

    @staticmethod
    def _resolve(name, by_rel, by_name, csv_path, line) -> Optional[str]:
        rel = name.replace("\\", "/")
        while rel.startswith("./"):
            rel = rel[2:]
        if rel in by_rel:
            return rel
        cands = by_name.get(rel.rsplit("/", 1)[-1], []) if "/" not in rel else []
        if len(cands) == 1:
            return cands[0]
        if len(cands) > 1:
            raise DataError(
                f"{csv_path} (line {line}): image {name!r} matches several files "
                f"({', '.join(cands[:3])}); write its path relative to the folder"
            )
        return None
