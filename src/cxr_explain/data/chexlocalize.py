"""CheXlocalize (Saporta et al., Nature Machine Intelligence 2022): segmentations in COCO RLE, the dataset.

Ground truth ``gt_segmentations_{val,test}.json`` maps an image id (``patient64541_study1_view1_frontal``)
to a pathology name to a COCO run-length encoding ``{"size": [h, w], "counts": "<string>"}`` of a
binary mask in the original image's pixels (pycocotools' format: column-major runs starting with
background, compressed to a string). The benchmark's file lists only images with at least one positive
label, and for each of them every one of its ten pathologies, an empty mask for a negative one; an
image absent from the file has no lesion of any pathology. ``hb_segmentations_test.json`` (human
benchmark: a second group of radiologists) has the same format; ``hb_salient_pt_test.json`` maps
id → pathology → ``[[x, y], ...]`` (the radiologists' most representative points).

Layout under ``root`` (CheXlocalize's download, or the same files in one folder): JSON files in
``CheXlocalize/`` or ``root``; labels and images as :class:`~.chexpert.CheXpertDataset` finds them
(``CheXpert/val_labels.csv`` + ``CheXpert/val/``, ``valid.csv`` + ``valid/`` …).

Names: the benchmark's JSON says ``Airspace Opacity`` where CheXpert's CSV says ``Lung Opacity``;
a JSON name is matched to a label column of the split's CSV with
:func:`~cxr_explain.data.labels.find_label` (case, ``_`` and the project's one alias table,
``LABEL_ALIASES``) and the dataset uses the CSV's name. A name matching no column is an error. Bad files raise a one-line :class:`~cxr_explain.errors.DataError`
naming the file, the image and the pathology: malformed RLE (counts that are not a valid COCO
string, negative runs, runs that do not add up to h·w), an unknown pathology, an image id without a
row in the labels CSV or without an image file.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..errors import DataError
from .chexpert import SPLIT_NAMES, CheXpertDataset, canonical_split, find_label_csv
from .images import DICOM_EXTENSIONS
from .labels import check_labels, find_label
from .types import Sample

__all__ = [
    "CHEXLOCALIZE_FINDINGS",
    "RLE",
    "rle_counts",
    "encode_mask",
    "decode_rle",
    "parse_rle",
    "read_segmentations",
    "write_segmentations",
    "read_salient_points",
    "find_chexlocalize_json",
    "CheXlocalizeDataset",
]

PathLike = Union[str, Path]

#: The ten pathologies CheXlocalize segments, in CheXpert's spelling (``Airspace Opacity`` in its JSON).
CHEXLOCALIZE_FINDINGS: tuple[str, ...] = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Support Devices",
)
GT_FILE = "gt_segmentations_{split}.json"
HB_FILE = "hb_segmentations_{split}.json"
HB_POINTS_FILE = "hb_salient_pt_{split}.json"
_MAX_CHUNKS = 12  # 60 bits: more 5-bit chunks in one count cannot come from a real mask


# ----------------------------------------------------------------------------------- RLE
def rle_counts(counts: str) -> np.ndarray:
    """Run lengths of a COCO compressed RLE string (int64; background run first, column-major).

    The format (pycocotools ``rleToString``): each run is written in 5-bit groups, least significant
    first, as ``chr(48 + group + 32·more)``; the last group's bit 4 is the sign; from the fourth run
    on, the value stored is the difference to the run two places before. ValueError for a character
    outside ``'0'..'o'`` or a string that ends inside a run. (pycocotools decodes such strings without
    complaint, so they are checked here first.)"""
    try:
        b = np.frombuffer(counts.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    except UnicodeEncodeError:
        raise ValueError("counts hold a non-ASCII character") from None
    if b.size == 0:
        return np.zeros(0, dtype=np.int64)
    if (b < 0).any() or (b > 63).any():
        bad = counts[int(np.argmax((b < 0) | (b > 63)))]
        raise ValueError(f"character {bad!r} is not part of a COCO RLE string")
    more = (b & 0x20) != 0
    if more[-1]:
        raise ValueError("the string ends inside a run")
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1])
    token = np.repeat(np.arange(ends.size), ends - starts + 1)
    k = np.arange(b.size) - starts[token]
    if k.max() >= _MAX_CHUNKS:
        raise ValueError("a run is longer than any image")
    vals = np.add.reduceat((b & 0x1F) << (5 * k), starts)
    negative = (b[ends] & 0x10) != 0
    vals = vals - (negative.astype(np.int64) << (5 * (k[ends] + 1)))
    out = vals.copy()
    out[2::2] = np.cumsum(vals[2::2])
    out[1::2] = np.cumsum(vals[1::2])
    return out


@dataclass(frozen=True)
class RLE:
    """A checked COCO RLE: ``height``, ``width``, ``counts`` (the compressed string) and ``area``
    (foreground pixels)."""

    height: int
    width: int
    counts: str
    area: int

    def decode(self) -> np.ndarray:
        """The mask, H×W bool (pycocotools ``mask.decode``)."""
        if self.height * self.width == 0:
            return np.zeros((self.height, self.width), dtype=bool)
        from pycocotools import mask as cocomask

        with warnings.catch_warnings():  # pycocotools under numpy 2 warns about __array__(copy=)
            warnings.simplefilter("ignore", DeprecationWarning)
            m = cocomask.decode({"size": [self.height, self.width], "counts": self.counts.encode("ascii")})
        return np.ascontiguousarray(m, dtype=bool)

    def to_json(self) -> dict:
        return {"size": [self.height, self.width], "counts": self.counts}


def parse_rle(entry: object, source: object = "RLE", where: str = "") -> RLE:
    """Check one ``{"size": [h, w], "counts": ...}`` entry and return an :class:`RLE`.

    ``counts`` is a compressed string or a list of run lengths (pycocotools' uncompressed form).
    DataError naming ``source`` and ``where`` unless: ``size`` is two non-negative integers, every
    run is non-negative and the runs add up to ``h·w``."""
    loc = f" ({where})" if where else ""
    if not isinstance(entry, dict) or "size" not in entry or "counts" not in entry:
        raise DataError(f"{source}{loc}: expected an RLE object {{\"size\": [h, w], \"counts\": ...}}, "
                        f"got {_short(entry)}")
    size = entry["size"]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size)):
        raise DataError(f"{source}{loc}: RLE size must be [height, width] (two non-negative integers), got {_short(size)}")
    h, w = int(size[0]), int(size[1])
    counts = entry["counts"]
    if isinstance(counts, str):
        try:
            runs = rle_counts(counts)
        except ValueError as e:
            raise DataError(f"{source}{loc}: malformed RLE counts ({e})") from None
        text = counts
    elif isinstance(counts, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
        runs = np.asarray(counts, dtype=np.int64)
        text = None
    else:
        raise DataError(f"{source}{loc}: RLE counts must be a COCO string or a list of integers, got {_short(counts)}")
    if (runs < 0).any():
        raise DataError(f"{source}{loc}: malformed RLE counts (a negative run length)")
    total = int(runs.sum())
    if total != h * w:
        raise DataError(f"{source}{loc}: malformed RLE counts (runs cover {total} pixels, size {h}x{w} "
                        f"has {h * w})")
    if text is None:
        text = _compress(runs, h, w)
    return RLE(h, w, text, int(runs[1::2].sum()))


def _compress(runs: np.ndarray, h: int, w: int) -> str:
    if h * w == 0:
        return ""
    from pycocotools import mask as cocomask

    r = cocomask.frPyObjects({"size": [h, w], "counts": [int(v) for v in runs]}, h, w)
    return r["counts"].decode("ascii")


def encode_mask(mask: np.ndarray) -> dict:
    """H×W mask (nonzero = inside) → ``{"size": [h, w], "counts": str}`` (pycocotools ``mask.encode``)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise DataError(f"encode_mask: expected one H×W mask, got shape {m.shape}")
    if m.size == 0:
        return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": ""}
    from pycocotools import mask as cocomask

    r = cocomask.encode(np.asfortranarray(m != 0, dtype=np.uint8))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


def decode_rle(entry: object, source: object = "RLE", where: str = "") -> np.ndarray:
    """Check and decode one RLE entry (:func:`parse_rle`) → H×W bool."""
    return parse_rle(entry, source, where).decode()


def _short(v: object) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


# ----------------------------------------------------------------------------------- files
def _load_json(path: PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        with open(p, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{p}: not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise DataError(f"{p}: expected a JSON object {{image id: {{pathology: ...}}}}, got {type(data).__name__}")
    return data


def _canonical_name(name: str, known: Sequence[str], source: Path, iid: str) -> str:
    k = find_label(name, known)
    if k is not None:
        return known[k]
    check_labels([name], known=known, source=source, where=f"image {iid!r}")
    return name  # pragma: no cover (check_labels raised)


def read_segmentations(path: PathLike, known: Sequence[str] = CHEXLOCALIZE_FINDINGS) -> dict[str, dict[str, RLE]]:
    """A CheXlocalize segmentation JSON → ``{image id: {pathology: RLE}}``, every entry checked
    (:func:`parse_rle`); each pathology name must match one of ``known`` (``find_label``: exact,
    then case / ``_`` / alias-insensitive) and is replaced by it. Masks stay encoded (``RLE.decode``)."""
    p = Path(path)
    data = _load_json(p)
    out: dict[str, dict[str, RLE]] = {}
    for iid, per in data.items():
        if not isinstance(per, dict):
            raise DataError(f"{p} (image {iid!r}): expected {{pathology: RLE}}, got {_short(per)}")
        row: dict[str, RLE] = {}
        for name, entry in per.items():
            f = _canonical_name(name, known, p, iid)
            if f in row:
                raise DataError(f"{p} (image {iid!r}): pathology {f!r} is given twice ({name!r})")
            row[f] = parse_rle(entry, p, f"image {iid!r}, {name}")
        out[iid] = row
    return out


def write_segmentations(path: PathLike, masks: dict[str, dict[str, np.ndarray]],
                        names: Optional[dict[str, str]] = None) -> Path:
    """Write ``{image id: {pathology: H×W mask}}`` as a CheXlocalize JSON (RLE via :func:`encode_mask`);
    ``names`` renames pathologies on the way out (e.g. ``{"Lung Opacity": "Airspace Opacity"}``)."""
    p = Path(path)
    names = names or {}
    data = {iid: {names.get(f, f): encode_mask(m) for f, m in per.items()} for iid, per in masks.items()}
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(p)
    return p


def read_salient_points(path: PathLike, known: Sequence[str] = CHEXLOCALIZE_FINDINGS) -> dict[str, dict[str, np.ndarray]]:
    """``hb_salient_pt_*.json`` → ``{image id: {pathology: K×2 float array of (x, y)}}``."""
    p = Path(path)
    data = _load_json(p)
    out: dict[str, dict[str, np.ndarray]] = {}
    for iid, per in data.items():
        if not isinstance(per, dict):
            raise DataError(f"{p} (image {iid!r}): expected {{pathology: [[x, y], ...]}}, got {_short(per)}")
        row = {}
        for name, pts in per.items():
            f = _canonical_name(name, known, p, iid)
            try:
                a = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
            except (TypeError, ValueError):
                raise DataError(f"{p} (image {iid!r}, {name}): points must be [[x, y], ...], got {_short(pts)}") from None
            if not np.isfinite(a).all():
                raise DataError(f"{p} (image {iid!r}, {name}): a point is not finite")
            row[f] = a
        out[iid] = row
    return out


def find_chexlocalize_json(root: PathLike, template: str, split: str) -> Optional[Path]:
    """``root/CheXlocalize/<file>`` or ``root/<file>`` for ``template`` (e.g. :data:`GT_FILE`) and split
    (``val`` / ``test``); None if neither exists."""
    root = Path(root)
    name = template.format(split=split)
    for p in (root / "CheXlocalize" / name, root / name):
        if p.is_file():
            return p
    return None


def _image_hw(path: Path) -> Optional[tuple[int, int]]:
    """(height, width) from the file header, None when it cannot be read cheaply."""
    try:
        if path.suffix.lower() in DICOM_EXTENSIONS:
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        with Image.open(path) as im:
            return int(im.height), int(im.width)
    except Exception:  # the image reader reports unreadable files when pixels are needed
        return None


# ----------------------------------------------------------------------------------- dataset
class CheXlocalizeDataset(CheXpertDataset):
    """CheXlocalize: the CheXpert validation / test images with their segmentations.

    ``split``: ``"val"``, ``"test"`` or None (every split with a ``gt_segmentations_<split>.json``).
    Samples are every image of those splits' label CSVs that passes ``views`` (default ``"all"``:
    the benchmark scores lateral films too), with labels over ``findings`` (default: the
    pathologies of the ground-truth files, in CSV order). ``Sample.masks`` holds the non-empty
    ground-truth masks (``{}`` for an image without lesions); :meth:`gt_findings` lists them without
    decoding. A mask whose size differs from its image's is resized (nearest) when the aspect ratio
    agrees within 2 % (e.g. CheXpert's downsampled "small" images), with one warning; otherwise
    DataError. Human benchmark files, when present, are read into ``human`` / ``human_points``."""

    name = "CheXlocalize dataset"

    def __init__(
        self,
        root: PathLike,
        split: Optional[str] = None,
        findings: Optional[Sequence[str]] = None,
        *,
        uncertain: str = "ones",
        views: Optional[str] = "all",
        gt_json: Optional[PathLike] = None,
        labels_csv: Optional[PathLike] = None,
        images_dir: Optional[PathLike] = None,
    ):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: CheXlocalize folder not found")
        split = canonical_split(split, f"CheXlocalize dataset at {root}")
        if gt_json is not None:
            if split is None:
                raise DataError(f"gt_json={gt_json}: pass split= ('val' or 'test') with it")
            self._gt_files = {split: Path(gt_json)}
        else:
            splits = [split] if split is not None else [s for s in SPLIT_NAMES if s != "train"]
            self._gt_files = {s: p for s in splits if (p := find_chexlocalize_json(root, GT_FILE, s)) is not None}
        if not self._gt_files:
            want = GT_FILE.format(split=split) if split else "gt_segmentations_val.json / _test.json"
            raise DataError(f"{root}: no {want} in the folder or its CheXlocalize/ subfolder; pass gt_json=")
        self._labels_csv_arg = labels_csv
        # labels and images (CheXpertDataset reads the CSVs of the splits chosen in _label_csvs)
        super().__init__(root, split, None, uncertain=uncertain, views=views, labels_csv=None,
                         images_dir=images_dir)
        cols = self.label_columns
        self.gt: dict[str, dict[str, RLE]] = {}
        rows_of = {sp: t for (sp, _), t in zip(self._csvs, self.tables)}
        known_ids = {s.image_id for s in self.samples}
        gt_names: list[str] = []
        for sp, gpath in self._gt_files.items():
            seg = read_segmentations(gpath, known=cols)
            table = rows_of[sp]
            listed = dict(zip(table.rows["image_id"], table.rows["view"]))
            for iid, per in seg.items():
                if iid not in listed:
                    raise DataError(f"{gpath} (image {iid!r}): no row in {table.source}; the id has no image")
                if self.views != "all" and listed[iid] != self.views:
                    continue
                if iid not in known_ids:
                    raise DataError(f"{gpath} (image {iid!r}): the image file was not found (see {table.source}); "
                                    "pass images_dir=")
                self.gt[iid] = per
                gt_names += [f for f in per if f not in gt_names]
        if findings is None:
            findings = tuple(c for c in cols if c in gt_names)
        findings = tuple(check_labels(findings, known=cols, source=next(iter(self._gt_files.values())),
                                      where="findings="))
        idx = [cols.index(f) for f in findings]
        for s in self.samples:  # CheXpertDataset gave labels over every column
            s.labels = s.labels[idx]
        self.findings = findings
        self.human: dict[str, dict[str, RLE]] = {}
        self.human_points: dict[str, dict[str, np.ndarray]] = {}
        for sp in self._gt_files:
            hb = find_chexlocalize_json(root, HB_FILE, sp)
            if hb is not None:
                self.human.update(read_segmentations(hb, known=cols))
            hp = find_chexlocalize_json(root, HB_POINTS_FILE, sp)
            if hp is not None:
                self.human_points.update(read_salient_points(hp, known=cols))
        self._warned_resize = False

    # CheXpertDataset hooks --------------------------------------------------------------------
    def _label_csvs(self, root: Path, split: Optional[str], labels_csv) -> list[tuple[str, Path]]:
        out = []
        for sp in self._gt_files:
            p = Path(self._labels_csv_arg) if self._labels_csv_arg else find_label_csv(root, sp)
            if p is None or not p.is_file():
                raise DataError(f"{self._gt_files[sp]}: no labels CSV for split {sp!r} (looked for valid.csv, "
                                "val_labels.csv, test_labels.csv in the folder and CheXpert/); pass labels_csv=")
            out.append((sp, p))
        self._csvs = out
        return out

    # ground truth -----------------------------------------------------------------------------
    def gt_findings(self, i: int) -> list[str]:
        """Findings (of ``findings``) with a non-empty ground-truth mask on sample ``i``."""
        per = self.gt.get(self.samples[i].image_id, {})
        return [f for f in self.findings if f in per and per[f].area > 0]

    def in_ground_truth(self, i: int) -> bool:
        """Whether sample ``i`` is listed in the ground-truth file (the benchmark lists the images
        with at least one positive label)."""
        return self.samples[i].image_id in self.gt

    def __getitem__(self, i: int) -> Sample:
        s = self.samples[i]
        fs = self.gt_findings(i)
        if not fs:
            return s
        masks = {f: self._decode(self.gt[s.image_id][f], s, f) for f in fs}
        return Sample(s.image_id, s.path, s.labels, list(s.boxes), masks, s.patient_id, s.view)

    def human_masks(self, i: int) -> dict[str, np.ndarray]:
        """The human benchmark's non-empty masks of ``findings`` for sample ``i`` (``{}`` if none)."""
        s = self.samples[i]
        per = self.human.get(s.image_id, {})
        return {f: self._decode(per[f], s, f) for f in self.findings if f in per and per[f].area > 0}

    def _decode(self, rle: RLE, s: Sample, finding: str) -> np.ndarray:
        m = rle.decode()
        hw = _image_hw(Path(s.path))
        if hw is None or hw == m.shape:
            return m
        (h, w), (mh, mw) = hw, m.shape
        if mh == 0 or mw == 0 or abs((w / h) / (mw / mh) - 1) > 0.02:
            raise DataError(f"{self.name} (image {s.image_id!r}, {finding}): mask is {mw}x{mh} but the image "
                            f"{s.path} is {w}x{h}; the segmentation does not belong to this image")
        if not self._warned_resize:
            warnings.warn(f"{self.name}: masks are {mw}x{mh} but images {w}x{h} (e.g. {s.image_id}); masks are "
                          "resized (nearest) to the image size", stacklevel=3)
            self._warned_resize = True
        return np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST), dtype=bool)
