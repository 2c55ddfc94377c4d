"""NIH ChestX-ray14: Data_Entry table, BBox_List boxes, split lists, image folders, the dataset.

Layout searched under ``root`` (each part can also be passed explicitly):
``Data_Entry_2017_v2020.csv`` / ``Data_Entry_2017.csv`` (required), ``BBox_List_2017.csv``,
``masks.csv`` (synthetic benchmark), ``split.csv`` or ``train_list.txt``/``val_list.txt``/
``test_list.txt`` (arnoweng) or ``train_val_list.txt``/``test_list.txt`` (official), and images in
``images/``, ``images_0NN/images/`` or ``root`` itself.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
from PIL import Image

from ..errors import DataError
from .folder import SampleDataset, image_size_wh, patient_split, read_csv_table
from .images import IMAGE_EXTENSIONS
from .labels import (
    CHEXNET_FINDINGS,
    NO_FINDING,
    canonical_box_label,
    check_labels,
    parse_finding_labels,
)
from .types import Box, Sample

__all__ = [
    "read_data_entry",
    "read_bbox_list",
    "read_split_list",
    "read_label_list",
    "read_masks_csv",
    "read_split_csv",
    "find_nih_images",
    "NIHDataset",
]

PathLike = Union[str, Path]

# Data_Entry's bracketed header names contain commas, so they split into four columns.
_RENAME = {
    "Patient Sex": "Patient Gender",
    "OriginalImage[Width": "OriginalImageWidth",
    "Height]": "OriginalImageHeight",
    "OriginalImagePixelSpacing[x": "OriginalImagePixelSpacingX",
    "y]": "OriginalImagePixelSpacingY",
}
_NUMERIC = [
    "Follow-up #",
    "Patient Age",
    "OriginalImageWidth",
    "OriginalImageHeight",
    "OriginalImagePixelSpacingX",
    "OriginalImagePixelSpacingY",
]
_NIH_NAME = re.compile(r"^(\d+)_(\d+)\.\w+$")
SPLITS = ("train", "val", "test")


def _patient_from_name(name: str) -> str:
    """``00013118_008.png`` → ``13118``; other names → the name without extension."""
    m = _NIH_NAME.match(name)
    return str(int(m.group(1))) if m else name.rsplit(".", 1)[0]


def read_data_entry(
    csv_path: PathLike, known: Sequence[str] = CHEXNET_FINDINGS + (NO_FINDING,)
) -> pd.DataFrame:
    """Read ``Data_Entry_2017*.csv`` into a DataFrame, one row per image.

    Accepts ``Patient Gender`` or ``Patient Sex`` (renamed to ``Patient Gender``); the bracketed
    columns are renamed ``OriginalImageWidth/Height``, ``OriginalImagePixelSpacingX/Y``; empty
    ``Unnamed`` columns are dropped. Adds ``labels`` (list of names, split on ``|``) and makes
    ``Patient ID`` a string without zero padding (derived from the file name if absent).
    Required: ``Image Index``, ``Finding Labels``. Unknown labels, empty labels, ``No Finding``
    mixed with findings and duplicate image names raise DataError naming the file and line.
    """
    p = Path(csv_path)
    df = read_csv_table(p, required=["Image Index", "Finding Labels"])
    df = df[[c for c in df.columns if not (c.startswith("Unnamed:") and (df[c].str.strip() == "").all())]]
    df = df.rename(columns={k: v for k, v in _RENAME.items() if k in df.columns and v not in df.columns})
    df = df.copy()
    df["Image Index"] = df["Image Index"].str.strip()
    empty = df.index[df["Image Index"] == ""]
    if len(empty):
        raise DataError(f"{p} (line {int(empty[0]) + 2}): empty 'Image Index'")
    dup = df["Image Index"].duplicated()
    if dup.any():
        k = int(np.argmax(dup.to_numpy()))
        raise DataError(f"{p} (line {k + 2}): image {df['Image Index'].iloc[k]!r} appears twice")
    labels = [parse_finding_labels(t) for t in df["Finding Labels"]]
    seen = {lab for labs in labels for lab in labs}
    bad = set(seen) - set(known)
    for k, labs in enumerate(labels):
        if not labs:
            raise DataError(f"{p} (line {k + 2}): empty 'Finding Labels'; write 'No Finding' for a normal")
        if bad and bad.intersection(labs):
            check_labels(labs, known=known, source=p, where=f"line {k + 2}")
        if NO_FINDING in labs and len(labs) > 1:
            raise DataError(f"{p} (line {k + 2}): '{NO_FINDING}' is combined with findings: {'|'.join(labs)}")
    df["labels"] = labels
    if "Patient ID" in df.columns:
        df["Patient ID"] = [
            str(int(v)) if v.strip().isdigit() else (v.strip() or _patient_from_name(n))
            for v, n in zip(df["Patient ID"], df["Image Index"])
        ]
    else:
        df["Patient ID"] = [_patient_from_name(n) for n in df["Image Index"]]
    for c in _NUMERIC:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    if "View Position" in df.columns:
        df["View Position"] = df["View Position"].str.strip()
    return df.reset_index(drop=True)


def read_bbox_list(
    csv_path: PathLike,
    image_size: Union[int, tuple[int, int], None] = 1024,
    known: Sequence[str] = CHEXNET_FINDINGS,
) -> dict[str, list[Box]]:
    """Read ``BBox_List_2017.csv`` BY POSITION: ``image, label, x, y, w, h`` then only empty fields.

    The header line (``Image Index,Finding Label,Bbox [x,y,w,h],,,``) is skipped when its third
    field is not a number. ``Infiltrate`` → ``Infiltration``. Several boxes per image are kept in
    file order. ``image_size`` (``W`` or ``(W, H)``; None = no check) bounds the boxes: a box with
    ``w <= 0``, ``h <= 0``, ``x < 0``, ``y < 0``, ``x + w > W`` or ``y + h > H`` raises DataError
    naming the file and line.
    """
    p = Path(csv_path)
    if not p.is_file():
        raise DataError(f"{p}: box list not found")
    size_w, size_h = image_size_wh(image_size)
    eps = 1e-3
    out: dict[str, list[Box]] = {}
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{p}: cannot read box list ({' '.join(str(e).split())})") from e
    for k, row in enumerate(rows):
        line = k + 1
        if not row or all(not f.strip() for f in row):
            continue
        if k == 0 and (len(row) < 3 or not _is_number(row[2])):
            continue  # header
        if len(row) < 6:
            raise DataError(
                f"{p} (line {line}): expected 6 fields (image, label, x, y, w, h), got {len(row)}"
            )
        if any(f.strip() for f in row[6:]):
            raise DataError(
                f"{p} (line {line}): unexpected non-empty fields after the 6th: {row[6:]!r}"
            )
        name = row[0].strip()
        label = canonical_box_label(row[1])
        check_labels([label], known=known, source=p, where=f"line {line}")
        vals = []
        for col, v in zip(("x", "y", "w", "h"), row[2:6]):
            if not _is_number(v):
                raise DataError(f"{p} (line {line}): box {col} is not a number: {v!r}")
            vals.append(float(v))
        x, y, w, h = vals
        if w <= 0 or h <= 0:
            raise DataError(f"{p} (line {line}): box for {name} has non-positive size w={w}, h={h}")
        if x < -eps or y < -eps or (size_w is not None and (x + w > size_w + eps or y + h > size_h + eps)):
            raise DataError(
                f"{p} (line {line}): box for {name} (x={x:g}, y={y:g}, w={w:g}, h={h:g}) lies outside "
                f"the {size_w}x{size_h} image; fix the row or pass the right image_size"
            )
        out.setdefault(name, []).append(Box(label, x, y, w, h))
    return out


def _is_number(v: str) -> bool:
    try:
        return bool(np.isfinite(float(v)))
    except (TypeError, ValueError):
        return False


def read_split_list(txt_path: PathLike) -> list[str]:
    """Image names from ``train_val_list.txt`` / ``test_list.txt`` (one per line) or an
    arnoweng list (``name l1 .. l14``): the first token of each non-empty line, folder stripped."""
    p = Path(txt_path)
    if not p.is_file():
        raise DataError(f"{p}: split list not found")
    names = []
    with open(p, encoding="utf-8-sig") as fh:
        for line in fh:
            tok = line.split()
            if tok:
                names.append(tok[0].replace("\\", "/").rsplit("/", 1)[-1])
    return names


def read_label_list(txt_path: PathLike, findings: Sequence[str] = CHEXNET_FINDINGS) -> dict[str, np.ndarray]:
    """arnoweng-style label list: ``name l1 .. lF`` (space-separated 0/1 in ``findings`` order)."""
    p = Path(txt_path)
    if not p.is_file():
        raise DataError(f"{p}: label list not found")
    out: dict[str, np.ndarray] = {}
    with open(p, encoding="utf-8-sig") as fh:
        for k, line in enumerate(fh):
            tok = line.split()
            if not tok:
                continue
            if len(tok) != len(findings) + 1:
                raise DataError(
                    f"{p} (line {k + 1}): expected a name and {len(findings)} labels, got {len(tok) - 1} labels"
                )
            try:
                vals = np.array([float(t) for t in tok[1:]], dtype=np.float32)
            except ValueError:
                raise DataError(f"{p} (line {k + 1}): labels must be 0 or 1: {' '.join(tok[1:])}") from None
            if not np.isin(vals, (0.0, 1.0)).all():
                raise DataError(f"{p} (line {k + 1}): labels must be 0 or 1: {' '.join(tok[1:])}")
            out[tok[0].replace("\\", "/").rsplit("/", 1)[-1]] = vals
    return out


def read_masks_csv(
    csv_path: PathLike, known: Sequence[str] = CHEXNET_FINDINGS, id_column: str = "Image Index"
) -> dict[str, dict[str, list[Path]]]:
    """``masks.csv`` (``<id_column>,Finding Label,Mask Path``; paths relative to the CSV's folder)
    → ``{image: {finding: [mask paths]}}``; several masks of one finding are OR-ed when loaded.
    A referenced mask file that does not exist raises DataError."""
    p = Path(csv_path)
    df = read_csv_table(p, required=[id_column, "Finding Label", "Mask Path"])
    out: dict[str, dict[str, list[Path]]] = {}
    for k, (name, label, mpath) in enumerate(zip(df[id_column], df["Finding Label"], df["Mask Path"])):
        label = canonical_box_label(label)
        check_labels([label], known=known, source=p, where=f"line {k + 2}")
        mp = Path(mpath.strip())
        mp = mp if mp.is_absolute() else p.parent / mp
        if not mp.is_file():
            raise DataError(f"{p} (line {k + 2}): mask file {mp} not found")
        out.setdefault(name.strip(), {}).setdefault(label, []).append(mp)
    return out


def read_mask(paths: Sequence[Path]) -> np.ndarray:
    """Union of the mask PNGs (pixel > 0 = inside), H×W bool."""
    mask = None
    for mp in paths:
        try:
            with Image.open(mp) as im:
                m = np.asarray(im.convert("L") if im.mode not in ("L", "1", "I;16", "I") else im) > 0
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{mp}: cannot decode mask ({' '.join(str(e).split())})") from e
        if mask is not None and m.shape != mask.shape:
            raise DataError(f"{mp}: mask shape {m.shape} differs from another mask of the same finding")
        mask = m if mask is None else (mask | m)
    return mask


def read_split_csv(csv_path: PathLike, id_column: str = "Image Index") -> dict[str, str]:
    """``split.csv`` (``<id_column>,split`` with split in train/val/test) → ``{id: split}``."""
    p = Path(csv_path)
    df = read_csv_table(p, required=[id_column, "split"])
    out: dict[str, str] = {}
    for k, (name, sp) in enumerate(zip(df[id_column], df["split"])):
        sp = sp.strip().lower()
        if sp not in SPLITS:
            raise DataError(f"{p} (line {k + 2}): split {sp!r} is not one of train, val, test")
        out[name.strip()] = sp
    return out


def find_nih_images(root: PathLike) -> dict[str, Path]:
    """``{file name: path}`` for images in ``root/images/``, ``root/images_*/images/``,
    ``root/images_*/`` and ``root`` itself (non-recursive in each)."""
    root = Path(root)
    dirs = [root / "images"]
    if root.is_dir():
        for d in sorted(os.scandir(root), key=lambda e: e.name):
            if d.is_dir() and d.name.startswith("images_"):
                dirs += [Path(d.path) / "images", Path(d.path)]
    dirs.append(root)
    out: dict[str, Path] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        for e in os.scandir(d):
            if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file():
                out.setdefault(e.name, Path(e.path))
    return out


def _first(root: Path, names: Sequence[str], pattern: Optional[str] = None) -> Optional[Path]:
    for n in names:
        if (root / n).is_file():
            return root / n
    if pattern:
        hits = sorted(root.glob(pattern))
        if hits:
            return hits[0]
    return None


class NIHDataset(SampleDataset):
    """ChestX-ray14 as a sequence of :class:`Sample` (labels over ``findings``, boxes, masks).

    ``split``: None (all), ``"train"``, ``"val"``, ``"test"`` (and ``"trainval"`` with the official
    lists). Source, first found: ``split.csv`` (``Image Index,split``); ``train_list.txt`` +
    ``val_list.txt`` + ``test_list.txt`` (arnoweng); ``train_val_list.txt`` + ``test_list.txt``
    (official: train/val = a patient-level split of train_val by ``seed`` and ``val_fraction``).
    ``boxed_only`` keeps images with a box or mask of one of ``findings``; boxes of other findings
    are not attached. ``views`` (e.g. ``["PA"]``) filters on View Position (default: all).
    Images with no file are left out and listed in ``missing``; ids in the box list, masks or split
    list without a Data_Entry row in ``missing_rows``; both are warned about.
    """

    name = "NIH dataset"

    def __init__(
        self,
        root: PathLike,
        split: Optional[str] = None,
        boxed_only: bool = False,
        findings: Sequence[str] = CHEXNET_FINDINGS,
        *,
        views: Optional[Sequence[str]] = None,
        data_entry: Optional[PathLike] = None,
        bbox_csv: Optional[PathLike] = None,
        masks_csv: Optional[PathLike] = None,
        split_csv: Optional[PathLike] = None,
        images_dir: Optional[PathLike] = None,
        image_size: Union[int, tuple[int, int], None] = 1024,
        seed: int = 0,
        val_fraction: float = 0.1,
    ):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: NIH dataset folder not found")
        self.root = root
        self.name = f"NIH dataset at {root}"
        findings = tuple(check_labels(findings, known=CHEXNET_FINDINGS, source="NIHDataset", where="findings="))

        entry_path = Path(data_entry) if data_entry else _first(
            root, ["Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"], "Data_Entry*.csv"
        )
        if entry_path is None:
            raise DataError(f"{root}: no Data_Entry_2017*.csv found; pass data_entry= with its path")
        df = read_data_entry(entry_path)
        bbox_path = Path(bbox_csv) if bbox_csv else _first(root, ["BBox_List_2017.csv"], "BBox_List*.csv")
        boxes = read_bbox_list(bbox_path, image_size=image_size) if bbox_path else {}
        masks_path = Path(masks_csv) if masks_csv else _first(root, ["masks.csv"])
        self._mask_paths = read_masks_csv(masks_path) if masks_path else {}
        if boxed_only and not boxes and not self._mask_paths:
            raise DataError(f"{root}: boxed_only=True but no BBox_List_2017.csv or masks.csv was found")

        names = list(df["Image Index"])
        rows = set(names)
        missing_rows = [n for n in list(boxes) + list(self._mask_paths) if n not in rows]

        self._split_source = (df[["Image Index", "Patient ID"]], split_csv, seed, val_fraction)
        self._split_table: Optional[dict[str, str]] = None
        if split is not None:
            keep, split_missing = self._split_names(root, split, df, split_csv, seed, val_fraction)
            missing_rows += [n for n in split_missing if n not in missing_rows]
        else:
            keep = rows
        if views is not None:
            if "View Position" not in df.columns:
                raise DataError(f"{entry_path}: views= given but there is no 'View Position' column")
            want = {v.strip().upper() for v in views}
            keep = keep & {n for n, v in zip(names, df["View Position"]) if str(v).upper() in want}

        image_files = find_nih_images(Path(images_dir) if images_dir else root)
        if not image_files:
            raise DataError(
                f"{Path(images_dir) if images_dir else root}: no images found (looked in images/, "
                "images_*/images/ and the folder itself); pass images_dir="
            )
        wanted = set(findings)
        samples: list[Sample] = []
        missing: list[str] = []
        unlabelled_boxes: list[str] = []
        views_col = df["View Position"] if "View Position" in df.columns else [None] * len(df)
        for name, labs, pid, view in zip(names, df["labels"], df["Patient ID"], views_col):
            if name not in keep:
                continue
            bx = [b for b in boxes.get(name, []) if b.finding in wanted]
            has_mask = any(f in wanted for f in self._mask_paths.get(name, {}))
            if boxed_only and not bx and not has_mask:
                continue
            path = image_files.get(name)
            if path is None:
                missing.append(name)
                continue
            labset = set(labs)
            gt = [b.finding for b in bx] + [f for f in self._mask_paths.get(name, {}) if f in wanted]
            unlabelled_boxes += [f"{name}:{f}" for f in dict.fromkeys(gt) if f not in labset]
            vec = np.array([1.0 if f in labset else 0.0 for f in findings], dtype=np.float32)
            samples.append(Sample(name, path, vec, boxes=bx, patient_id=pid, view=view))
        super().__init__(findings, samples)
        self.missing = missing
        self.missing_rows = missing_rows
        self.split = split
        self._report("images have no file and are left out", missing, self.name)
        self._report("images named in the box/mask/split files have no Data_Entry row",
                     missing_rows, entry_path)
        self._report("boxes/masks are of a finding that the image's Finding Labels do not list",
                     unlabelled_boxes, self.name)

    def splits(self) -> dict[str, str]:
        """``{image id: split}`` from the split source the constructor reads (``split.csv`` or the
        split lists, see the class doc), for every image of this dataset whose split is known;
        ``{}`` without a split source. A dataset restricted to one split names it for every image."""
        if self.split:
            return super().splits()
        if self._split_table is None:
            table: dict[str, str] = {}
            ids = set(self.ids)
            entry, split_csv, seed, val_fraction = self._split_source
            for sp in SPLITS:
                try:
                    names, _ = self._split_names(self.root, sp, entry, split_csv, seed, val_fraction)
                except DataError:  # no source for this split (e.g. no test list)
                    continue
                table.update({n: sp for n in sorted(names) if n in ids})
            self._split_table = table
        return dict(self._split_table)

    def mask_findings(self, i: int) -> list[str]:
        """Findings of ``findings`` that ``masks.csv`` gives sample ``i`` a mask of (not decoded)."""
        return [f for f in self._mask_paths.get(self.samples[i].image_id, {}) if f in self.findings]

    def __getitem__(self, i: int) -> Sample:
        s = self.samples[i]
        mp = self._mask_paths.get(s.image_id)
        if not mp:
            return s
        masks = {f: read_mask(paths) for f, paths in mp.items() if f in self.findings}
        return Sample(s.image_id, s.path, s.labels, list(s.boxes), masks, s.patient_id, s.view)

    @staticmethod
    def _split_names(root, split, df, split_csv, seed, val_fraction) -> tuple[set[str], list[str]]:
        """The image names in ``split`` and the split-list names without a Data_Entry row."""
        split = str(split).lower()
        names = list(df["Image Index"])
        rows = set(names)
        sc = Path(split_csv) if split_csv else _first(root, ["split.csv"])
        if sc is not None:
            if split not in SPLITS:
                raise DataError(f"{sc}: split={split!r} must be one of train, val, test")
            table = read_split_csv(sc)
            chosen = [n for n, s in table.items() if s == split]
        elif (root / "train_list.txt").is_file() and (root / "val_list.txt").is_file():
            if split not in SPLITS:
                raise DataError(f"{root}: split={split!r} must be one of train, val, test")
            lst = root / f"{split}_list.txt"
            if not lst.is_file():
                raise DataError(f"{lst}: split list not found")
            chosen = read_split_list(lst)
        elif (root / "train_val_list.txt").is_file() or (root / "test_list.txt").is_file():
            if split == "test":
                chosen = read_split_list(root / "test_list.txt")
            elif split in ("train", "val", "trainval"):
                tv = read_split_list(root / "train_val_list.txt")
                if split != "trainval":
                    tv_rows = [n for n in tv if n in rows]
                    pid = dict(zip(df["Image Index"], df["Patient ID"]))
                    val = patient_split(tv_rows, [pid[n] for n in tv_rows], val_fraction, seed)
                    tv = [n for n in tv if (n in val) == (split == "val")]
                chosen = tv
            else:
                raise DataError(f"{root}: split={split!r} must be one of train, val, test, trainval")
        else:
            raise DataError(
                f"{root}: split={split!r} requested but there is no split.csv, "
                "train_list.txt/val_list.txt/test_list.txt or train_val_list.txt/test_list.txt; "
                "pass split=None or split_csv="
            )
        return set(chosen) & rows, [n for n in chosen if n not in rows]
