"""Synthetic chest X-ray benchmark ("phantom"): frontal radiographs with exact lesion masks.

``render_phantom(index, seed)`` draws one film, deterministic from ``numpy.random.default_rng([seed,
index])`` (the patient's body from ``default_rng([seed, patient, 1])``, so follow-ups of a patient
share anatomy). ``generate(out_dir, n)`` writes a dataset in the NIH ChestX-ray14 or the RSNA
Pneumonia layout, in parallel, resuming where an earlier run stopped. See docs/phantom.md.
"""
from __future__ import annotations

import csv
import json
import os
import uuid
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ..errors import CxrExplainError, DataError
from .labels import BOX_FINDINGS
from .phantom_anatomy import (lung_masks, polygon_mask, render_anatomy, resize_field,
                              sample_anatomy, smooth_noise, tone_map)
from .phantom_lesions import (LesionPlan, cue_pattern, draw_cue, draw_distractors, mask_box,
                              plan_lesion, pneumothorax_suppression, render_lesion)
from .types import Box

__all__ = ["PhantomConfig", "Lesion", "Phantom", "render_phantom", "generate", "phantom_cli",
           "FINDINGS", "SHORTCUTS", "NIH_DATA_ENTRY_HEADER", "NIH_BBOX_HEADER", "benchmark_root", "benchmark_info",
           "EXPORT_MANIFEST", "GENERATOR_PREFIX"]

#: The 8 box findings the phantom draws (Data_Entry spelling).
FINDINGS: tuple[str, ...] = tuple(BOX_FINDINGS)
#: Planted shortcut cues understood by ``shortcut=``.
SHORTCUTS: tuple[str, ...] = ("marker",)
NIH_DATA_ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                         "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
NIH_BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
_WORK = 384  # anatomy is rendered at min(size, _WORK) and upsampled


def _default_prevalence() -> dict:
    return {f: 0.2 for f in FINDINGS}


@dataclass
class PhantomConfig:
    """Difficulty knobs. Defaults keep the task non-trivial (mean intensity alone has AUROC < 0.7).

    Per-class appearance (``phantom_lesions.PEAK``, the effusion height, the overlapping CTR ranges
    ``phantom_anatomy.CTR_NORMAL`` / ``CTR_CARDIOMEGALY``) is calibrated so that a CNN trained on a
    few thousand 128 px films lands roughly in AUROC 0.75-0.97 per class: small lesions raised in
    contrast, effusion mostly a small blunted angle, Cardiomegaly overlapping normal heart sizes.

    - ``lesion_contrast``: multiplies every lesion's peak attenuation change.
    - ``size_scale``: multiplies lesion areas (linear sizes by its square root).
    - ``prevalence``: per-finding probability on an image that is not "No Finding".
    - ``p_no_finding``: probability that an image has no finding at all.
    - ``distractors``: laterality marker, ECG leads, tube lines burned into some films.
    - ``noise``: multiplies film grain and low-frequency exposure variation.
    - ``images_per_patient``: follow-ups per patient (image index -> patient ``index // k + 1``;
      NIH layout only, the RSNA layout has one film per patientId).
    - ``split``: train / val / test fractions, drawn per patient.
    - ``shortcut_target``, ``shortcut_p_pos``, ``shortcut_p_neg``: in the train split the cue
      appears with ``p_pos`` on images with the target finding and ``p_neg`` on the others;
      in val / test with ``shortcut_p_eval`` regardless of the label.
    """

    lesion_contrast: float = 1.0
    size_scale: float = 1.0
    prevalence: dict = field(default_factory=_default_prevalence)
    p_no_finding: float = 0.4
    distractors: bool = True
    noise: float = 1.0
    images_per_patient: int = 2
    split: tuple = (0.7, 0.1, 0.2)
    shortcut_target: str = "Pneumonia"
    shortcut_p_pos: float = 0.9
    shortcut_p_neg: float = 0.1
    shortcut_p_eval: float = 0.3

    def validate(self) -> None:
        """Raise :class:`CxrExplainError` naming the bad field."""
        bad = [k for k in self.prevalence if k not in FINDINGS]
        if bad:
            raise CxrExplainError(f"PhantomConfig.prevalence: unknown finding {bad[0]!r}; use one of {', '.join(FINDINGS)}")
        if self.shortcut_target not in FINDINGS:
            raise CxrExplainError(f"PhantomConfig.shortcut_target {self.shortcut_target!r} is not one of {', '.join(FINDINGS)}")
        if len(self.split) != 3 or abs(sum(self.split) - 1) > 1e-6 or min(self.split) < 0:
            raise CxrExplainError(f"PhantomConfig.split {self.split!r} must be 3 non-negative fractions summing to 1")
        for name in ("p_no_finding", "shortcut_p_pos", "shortcut_p_neg", "shortcut_p_eval"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise CxrExplainError(f"PhantomConfig.{name} = {getattr(self, name)} must be a probability in [0, 1]")
        for f, p in self.prevalence.items():
            if not 0.0 <= float(p) <= 1.0:
                raise CxrExplainError(f"PhantomConfig.prevalence[{f!r}] = {p} must be a probability in [0, 1]")
        if self.images_per_patient < 1:
            raise CxrExplainError("PhantomConfig.images_per_patient must be >= 1")


@dataclass
class Lesion:
    """One lesion: its class, exact mask (bool, ``size``²) and the mask's bounding box."""

    finding: str
    mask: np.ndarray
    box: Box


@dataclass
class Phantom:
    """One generated film and everything known about it (all masks in ``size``² pixel space)."""

    index: int
    image: np.ndarray  # uint8 (size, size)
    lesions: list
    lungs: np.ndarray  # bool, both lung fields
    lung_sides: dict  # -1 (image left = patient right), +1 -> bool mask
    heart: np.ndarray  # bool
    cue: Optional[np.ndarray]  # bool mask of the planted cue, or None when absent
    patient: int
    follow_up: int
    split: str
    sex: str
    age: int
    view: str
    ctr: float
    image_id: str
    extra: dict = field(default_factory=dict)

    @property
    def findings(self) -> list[str]:
        """Distinct findings present, in FINDINGS order."""
        have = {l.finding for l in self.lesions}
        return [f for f in FINDINGS if f in have]

    def finding_mask(self, finding: str) -> np.ndarray:
        """Union of the masks of ``finding``'s lesions."""
        m = np.zeros_like(self.lungs)
        for l in self.lesions:
            if l.finding == finding:
                m |= l.mask
        return m


def _split_of(seed: int, patient: int, fractions) -> str:
    u = np.random.default_rng([seed, patient, 7]).random()
    return "train" if u < fractions[0] else ("val" if u < fractions[0] + fractions[1] else "test")


def _rsna_id(seed: int, index: int) -> str:
    return str(uuid.UUID(bytes=np.random.default_rng([seed, index, 5]).bytes(16), version=4))


def _choose_findings(rng: np.random.Generator, cfg: PhantomConfig, layout: str) -> list[str]:
    prev = {f: float(cfg.prevalence.get(f, 0.0)) for f in FINDINGS}
    if layout == "rsna":
        prev["Infiltration"] = 0.0  # RSNA's "Lung Opacity" covers infiltrates: keep negatives clean
    if rng.random() < cfg.p_no_finding or sum(prev.values()) <= 0:
        return []
    found = [f for f in FINDINGS if rng.random() < prev[f]]
    if not found:
        p = np.array([prev[f] for f in FINDINGS])
        found = [FINDINGS[int(rng.choice(len(FINDINGS), p=p / p.sum()))]]
    return found


def render_phantom(index: int, seed: int = 0, size: int = 1024, config: PhantomConfig | None = None,
                   shortcut: str | None = None, layout: str = "nih") -> Phantom:
    """Draw film ``index`` of the benchmark ``seed`` at ``size``² pixels.

    Pipeline: findings -> anatomy (Cardiomegaly = enlarged heart; its CTR range overlaps the
    normal one, see ``phantom_anatomy.CTR_*``) -> attenuation ``mu`` at ``min(size, 512)``, upsampled -> lesions added at full size -> ``tone_map`` -> markers,
    devices, planted cue -> grain -> uint8.
    """
    cfg = config or PhantomConfig()
    if shortcut is not None and shortcut not in SHORTCUTS:
        raise CxrExplainError(f"unknown shortcut {shortcut!r}; use one of {', '.join(SHORTCUTS)} or none")
    if size < 64:
        raise CxrExplainError(f"phantom size {size} is too small; use 64 or more (1024 = NIH)")
    k = 1 if layout == "rsna" else cfg.images_per_patient  # RSNA: one film per patientId
    patient, follow = index // k + 1, index % k
    rng = np.random.default_rng([seed, index])
    rp = np.random.default_rng([seed, patient, 1])
    split = _split_of(seed, patient, cfg.split)
    findings = _choose_findings(rng, cfg, layout)
    sides = {f: (-1 if rng.random() < 0.5 else 1) for f in findings}
    raised = sides.get("Atelectasis", 0) if rng.random() < 0.7 else 0
    an = sample_anatomy(rp, rng, cardiomegaly="Cardiomegaly" in findings, raised_side=raised)
    plans: list[LesionPlan] = []
    for f in findings:
        if f == "Cardiomegaly":
            plans.append(LesionPlan(f, 0, 0.0))
            continue
        fsides = [sides[f]]
        if layout == "rsna" and f == "Pneumonia" and rng.random() < 0.5:
            fsides.append(-sides[f])
        for s in fsides:
            plans.append(plan_lesion(f, s, an, rng, cfg.lesion_contrast, cfg.size_scale))
    # anatomy at working resolution
    W = min(size, _WORK)
    lw = lung_masks(an, W)
    sup = pneumothorax_suppression(an, plans, W)
    mu = render_anatomy(an, rng, W, lw[-1] | lw[1], sup)
    mu *= np.exp(0.06 * cfg.noise * smooth_noise(rng, W, 4))
    mu = resize_field(mu, size)
    lungs = lung_masks(an, size) if W != size else lw
    heart = polygon_mask(an, [an.heart_poly], size)
    lesions: list[Lesion] = []
    for P in plans:
        side_lung = lungs[P.side] if P.side else lungs[-1]
        m, (y0, y1, x0, x1), d = render_lesion(P, an, size, side_lung, heart)
        if d.size:
            mu[y0:y1, x0:x1] += d
        if m.any():
            lesions.append(Lesion(P.finding, m, Box(P.finding, *mask_box(m))))
    # film response with per-image exposure
    k_exp = rng.uniform(0.8, 1.15)
    lo, hi = rng.uniform(0.0, 0.12), rng.uniform(0.84, 0.98)
    gamma = rng.uniform(0.75, 1.45)
    img = tone_map(mu, k_exp, lo, hi, gamma)
    if cfg.distractors:
        draw_distractors(rng, an, size, img)
    # planted cue
    cue_mask = None
    if shortcut == "marker":
        if split == "train":
            p = cfg.shortcut_p_pos if cfg.shortcut_target in findings else cfg.shortcut_p_neg
        else:
            p = cfg.shortcut_p_eval
        r_cue = np.random.default_rng([seed, index, 11])
        present = r_cue.random() < p
        if present:
            cue_mask = draw_cue(r_cue, size)
            img = np.where(cue_mask, cue_pattern(cue_mask), img)
    # grain: white + slightly correlated (half-resolution) component, in 8-bit units
    g = rng.uniform(0.008, 0.018) * cfg.noise * 0.7 * 255.0
    noise = rng.standard_normal((size, size), dtype=np.float32)
    noise += resize_field(rng.standard_normal((size // 2, size // 2), dtype=np.float32), size)
    noise *= np.float32(g)
    img *= np.float32(255.0)
    img += noise
    img += np.float32(0.5)
    image = np.clip(img, 0, 255, out=img).astype(np.uint8)
    age = int(np.clip(np.random.default_rng([seed, patient, 2]).normal(50, 17), 1, 93)) + follow // 2
    view = "AP" if rng.random() < 0.4 else "PA"
    image_id = _rsna_id(seed, index) if layout == "rsna" else f"{patient:08d}_{follow:03d}"
    extra = {"orig_w": int(rng.integers(2500, 3057)), "orig_h": int(rng.integers(2400, 3057)),
             "spacing": float(rng.choice([0.143, 0.168, 0.139]))}
    return Phantom(index=index, image=image, lesions=lesions, lungs=lungs[-1] | lungs[1],
                   lung_sides=lungs, heart=heart, cue=cue_mask, patient=patient, follow_up=follow,
                   split=split, sex=an.sex, age=age, view=view, ctr=float(an.ctr),
                   image_id=image_id, extra=extra)


# ----------------------------------------------------------------------------------------------
# writers


def _save_mask(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(np.ascontiguousarray(mask, dtype=bool)).save(path)  # 1-bit PNG, pixel 1 = inside


def _write_dicom(path: Path, ph: Phantom, seed: int) -> None:
    """Secondary Capture DICOM, 8-bit MONOCHROME2, explicit VR little endian, uncompressed."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    sop = generate_uid(entropy_srcs=[str(seed), ph.image_id, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(seed), ph.image_id, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(seed), ph.image_id, "series"])
    ds.PatientID = ph.image_id
    ds.PatientName = ph.image_id
    ds.PatientSex = ph.sex
    ds.PatientAge = f"{ph.age:03d}Y"
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = ph.view
    ds.StudyDescription = "cxr-explain phantom"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PixelSpacing = [ph.extra["spacing"], ph.extra["spacing"]]
    ds.Rows, ds.Columns = ph.image.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(ph.image).tobytes()
    ds.save_as(path, enforce_file_format=True)


GENERATOR_PREFIX = "cxr_explain.phantom"


#: The manifest :mod:`.phantom_export` writes into a CheXpert / CheXlocalize-style copy of a benchmark
#: (its ``phantom`` entry is the source's ``phantom.json``).
EXPORT_MANIFEST = "chexlocalize_export.json"


def _read_meta(folder: Path) -> Optional[dict]:
    """The generator settings recorded in ``folder`` (``phantom.json``, or an export manifest's
    ``phantom`` entry); ``{}`` when a record is there but not this generator's; None when none is."""
    for name, key in (("phantom.json", None), (EXPORT_MANIFEST, "phantom")):
        meta = folder / name
        if meta.is_file():
            try:
                doc = json.loads(meta.read_text())
                doc = doc.get(key) if key else doc
                generator = str(doc.get("generator", ""))
            except (ValueError, OSError, AttributeError):
                return {}
            return dict(doc) if generator.startswith(GENERATOR_PREFIX) else {}
    return None


def benchmark_info(path: str | os.PathLike[str]) -> Optional[dict]:
    """The settings (seed, size, layout, n, generator, ...) of the synthetic benchmark ``path``
    belongs to: ``path`` itself or one of its three nearest parents holds a ``phantom.json`` written
    by this generator, or the manifest of a CheXlocalize-style copy of one (:mod:`.phantom_export`);
    the dict gains ``export: True`` for a copy. None for anything else."""
    p = Path(path).resolve()
    for folder in ([p] if p.is_dir() else []) + list(p.parents)[:3]:
        meta = _read_meta(folder)
        if meta is not None:
            if not meta:
                return None
            return {**meta, "export": (folder / EXPORT_MANIFEST).is_file() and not (folder / "phantom.json").is_file()}
    return None


def benchmark_root(path: str | os.PathLike[str]) -> Optional[Path]:
    """The synthetic benchmark folder ``path`` belongs to (``path`` itself or one of its three
    nearest parents holding a ``phantom.json`` written by this generator, or a CheXlocalize-style
    copy's manifest), else None."""
    p = Path(path).resolve()
    for folder in ([p] if p.is_dir() else []) + list(p.parents)[:3]:
        meta = _read_meta(folder)
        if meta is not None:
            return folder if meta else None
    return None


def _write_one(out: Path, index: int, seed: int, layout: str, size: int, cfg: PhantomConfig,
               shortcut: str | None) -> dict:
    """Render and write image ``index`` with its masks; return its record (also saved as JSON last)."""
    ph = render_phantom(index, seed, size, cfg, shortcut, layout)
    iid = ph.image_id
    if layout == "nih":
        img_rel = f"images/{iid}.png"
        # Huffman-only deflate after PNG row filters: ~15% faster and smaller than level 1 on grainy films
        Image.fromarray(ph.image).save(out / img_rel, compress_level=1, compress_type=zlib.Z_HUFFMAN_ONLY)
    else:
        img_rel = f"stage_2_train_images/{iid}.dcm"
        _write_dicom(out / img_rel, ph, seed)
    masks = []
    for f in ph.findings:
        if layout == "rsna" and f != "Pneumonia":
            continue
        rel = f"masks/{iid}_{f}.png"
        _save_mask(out / rel, ph.finding_mask(f))
        masks.append([f, rel])
    lung_rel = f"lungs/{iid}.png"
    _save_mask(out / lung_rel, ph.lungs)
    cue_rel = ""
    if ph.cue is not None:
        cue_rel = f"cues/{iid}.png"
        _save_mask(out / cue_rel, ph.cue)
    rec = {
        "index": index, "image_id": iid, "image": img_rel, "patient": ph.patient, "follow_up": ph.follow_up,
        "findings": ph.findings, "boxes": [[l.finding, l.box.x, l.box.y, l.box.w, l.box.h] for l in ph.lesions],
        "masks": masks, "lungs": lung_rel, "cue": cue_rel, "cue_present": ph.cue is not None,
        "split": ph.split, "sex": ph.sex, "age": ph.age, "view": ph.view, "ctr": round(ph.ctr, 4), **ph.extra,
    }
    tmp = out / "records" / f"{index:08d}.json.tmp"
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, out / "records" / f"{index:08d}.json")
    return rec


def _write_chunk(out: str, indices: list, seed: int, layout: str, size: int, cfg: PhantomConfig,
                 shortcut: str | None) -> list:
    return [_write_one(Path(out), i, seed, layout, size, cfg, shortcut) for i in indices]


def _load_record(out: Path, index: int) -> dict | None:
    p = out / "records" / f"{index:08d}.json"
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    files = [rec["image"], rec["lungs"]] + [m[1] for m in rec["masks"]] + ([rec["cue"]] if rec["cue"] else [])
    return rec if all((out / f).is_file() for f in files) else None


def _write_tables(out: Path, recs: list, layout: str, shortcut: str | None) -> None:
    id_col = "Image Index" if layout == "nih" else "patientId"
    if layout == "nih":
        with open(out / "Data_Entry_2017.csv", "w", newline="") as fh:
            fh.write(NIH_DATA_ENTRY_HEADER + "\n")
            w = csv.writer(fh, lineterminator="\n")
            for r in recs:
                labels = "|".join(r["findings"]) or "No Finding"
                w.writerow([r["image_id"] + ".png", labels, r["follow_up"], r["patient"], r["age"], r["sex"],
                            r["view"], r["orig_w"], r["orig_h"], r["spacing"], r["spacing"]])
        with open(out / "BBox_List_2017.csv", "w", newline="") as fh:
            fh.write(NIH_BBOX_HEADER + "\n")
            w = csv.writer(fh, lineterminator="\n")
            for r in recs:
                for f, x, y, bw, bh in r["boxes"]:
                    w.writerow([r["image_id"] + ".png", "Infiltrate" if f == "Infiltration" else f, x, y, bw, bh])
    else:
        with open(out / "stage_2_train_labels.csv", "w", newline="") as fh, \
                open(out / "stage_2_detailed_class_info.csv", "w", newline="") as fc:
            w = csv.writer(fh, lineterminator="\n")
            wc = csv.writer(fc, lineterminator="\n")
            w.writerow(["patientId", "x", "y", "width", "height", "Target"])
            wc.writerow(["patientId", "class"])
            for r in recs:
                boxes = [b for b in r["boxes"] if b[0] == "Pneumonia"]
                if boxes:
                    for _, x, y, bw, bh in boxes:
                        w.writerow([r["image_id"], x, y, bw, bh, 1])
                        wc.writerow([r["image_id"], "Lung Opacity"])
                else:
                    w.writerow([r["image_id"], "", "", "", "", 0])
                    wc.writerow([r["image_id"], "No Lung Opacity / Not Normal" if r["findings"] else "Normal"])
    name = (lambda r: r["image_id"] + ".png") if layout == "nih" else (lambda r: r["image_id"])
    with open(out / "masks.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow([id_col, "Finding Label", "Mask Path"])
        for r in recs:
            for f, rel in r["masks"]:
                w.writerow([name(r), f, rel])
    with open(out / "lungs.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow([id_col, "Mask Path"])
        for r in recs:
            w.writerow([name(r), r["lungs"]])
    with open(out / "split.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow([id_col, "split"])
        for r in recs:
            w.writerow([name(r), r["split"]])
    if shortcut:
        with open(out / "cues.csv", "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow([id_col, "Cue", "Present", "Mask Path"])
            for r in recs:
                w.writerow([name(r), shortcut, int(r["cue_present"]), r["cue"]])


def _config_json(cfg: PhantomConfig) -> dict:
    d = asdict(cfg)
    d["split"] = list(d["split"])
    return d


def generate(out_dir, n: int, seed: int = 0, layout: str = "nih", size: int = 1024,
             config: PhantomConfig | None = None, shortcut: str | None = None,
             workers: int | None = None, progress: bool = True, chunk: int = 8) -> Path:
    """Write ``n`` phantom films (indices ``0..n-1``) and their tables into ``out_dir``.

    Images are written as they are rendered (``workers`` processes, default: all CPUs) with one
    JSON record per image in ``records/``; a rerun with the same parameters skips images whose
    record and files exist, and the CSV tables are rewritten from all records at the end.
    Returns ``out_dir`` as a Path.
    """
    cfg = config or PhantomConfig()
    cfg.validate()
    if layout not in ("nih", "rsna"):
        raise CxrExplainError(f"unknown phantom layout {layout!r}; use 'nih' or 'rsna'")
    if shortcut is not None and shortcut not in SHORTCUTS:
        raise CxrExplainError(f"unknown shortcut {shortcut!r}; use one of {', '.join(SHORTCUTS)} or none")
    if int(size) < 64:
        raise CxrExplainError(f"phantom size {size} is too small; use 64 or more (1024 = NIH)")
    if n < 1:
        raise CxrExplainError(f"phantom n = {n}: ask for at least 1 image")
    out = Path(out_dir)
    params = {"seed": seed, "layout": layout, "size": size, "shortcut": shortcut, "config": _config_json(cfg),
              "generator": "cxr_explain.phantom/1"}
    pfile = out / "phantom.json"
    if pfile.is_file():
        try:
            old = json.loads(pfile.read_text())
        except ValueError:
            raise DataError(f"{pfile} is not valid JSON; delete it or choose a new --out directory") from None
        old_n = old.pop("n", None)
        if old != params:
            raise DataError(f"{out} holds a phantom made with other settings (see {pfile}); choose a new --out directory")
        n_total = max(n, old_n or 0)
    else:
        n_total = n
    img_dir = "images" if layout == "nih" else "stage_2_train_images"
    try:
        for d in (img_dir, "masks", "lungs", "records") + (("cues",) if shortcut else ()):
            (out / d).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create the output folders ({e.strerror}); choose a writable --out") from None
    pfile.write_text(json.dumps({**params, "n": n_total}, indent=1))
    recs: dict[int, dict] = {}
    todo = []
    for i in range(n):
        r = _load_record(out, i)
        if r is None:
            todo.append(i)
        else:
            recs[i] = r
    workers = max(1, workers or os.cpu_count() or 1)
    chunks = [todo[i:i + chunk] for i in range(0, len(todo), chunk)]
    bar = None
    if progress:
        from ..progress import progress_bar
        bar = progress_bar(total=n, initial=n - len(todo), unit="img", desc=f"phantom {layout}")
    try:
        if workers == 1 or len(chunks) <= 1:
            for c in chunks:
                for r in _write_chunk(str(out), c, seed, layout, size, cfg, shortcut):
                    recs[r["index"]] = r
                if bar:
                    bar.update(len(c))
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as ex:
                futs = {ex.submit(_write_chunk, str(out), c, seed, layout, size, cfg, shortcut): c for c in chunks}
                for fu in as_completed(futs):
                    for r in fu.result():
                        recs[r["index"]] = r
                    if bar:
                        bar.update(len(futs[fu]))
    finally:
        if bar:
            bar.close()
    # tables cover every complete record on disk (also those of an earlier, larger run)
    for i in range(n, n_total):
        r = _load_record(out, i)
        if r is not None:
            recs[i] = r
    _write_tables(out, [recs[i] for i in sorted(recs)], layout, shortcut)
    return out


def phantom_cli(args) -> Path:
    """CLI entry: ``cxr-explain phantom --out DIR --n N --seed S [--layout nih|rsna] [--size 1024]
    [--shortcut marker] [--workers K] [--no-progress]``; reads those attribute names from ``args``."""
    return generate(
        out_dir=args.out, n=int(args.n), seed=int(getattr(args, "seed", 0) or 0),
        layout=getattr(args, "layout", None) or "nih", size=int(getattr(args, "size", None) or 1024),
        shortcut=getattr(args, "shortcut", None) or None, workers=getattr(args, "workers", None),
        progress=not getattr(args, "no_progress", False))
