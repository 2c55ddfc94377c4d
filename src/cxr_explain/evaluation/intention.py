"""The "inconsistency of intention" analysis (paper Section 3; docs/evaluation.md §6).

For a pneumonia model (binary, or any model with a ``Pneumonia`` output), where does the positive
relevance of the explained logit go? Per image and method, shares of ``sum(max(h, 0))`` (map in
original pixel space):

* ``inside_lesion``: inside the lesion masks (or boxes) of the finding,
* ``lung_outside_lesion``: inside the lung fields but outside the lesions,
* ``outside_lungs``: everywhere else (markers, borders, devices),
* ``on_cue``: on the planted shortcut cue (synthetic benchmark with ``shortcut=...``; NaN where the
  image has no cue).

The three region shares sum to 1 (:func:`~cxr_explain.metrics.localization.region_shares`). Normal
images have no lesion, so their ``inside_lesion`` is 0. Lung masks come from the benchmark's
``lungs.csv``; without one, the lung split is NaN and only ``inside_lesion`` is reported.
Reported per method and per class (pneumonia vs normal images), mean with bootstrap 95% CI.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Collection, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ..attribution import explain
from ..attribution.methods import resolve_method_name
from ..data.labels import find_label
from ..data.folder import read_csv_table
from ..data.images import get_preprocessing
from ..data.nih import read_mask
from ..errors import CxrExplainError
from ..metrics.localization import region_shares
from ..runtime import resolve_device
from ..results.analyses import INTENTION_CSV, INTENTION_SETTINGS, intention_table
from ..results.folder import TABLES_DIR



def read_region_masks(root: str | Path, name: str) -> dict[str, Path]:
    """``{image id: mask path}`` from the benchmark's ``lungs.csv`` / ``cues.csv`` (rows with an empty
    path or ``Present = 0`` are skipped); ``{}`` when the file does not exist."""
    p = Path(root) / name
    if not p.is_file():
        return {}
    with open(p, encoding="utf-8-sig") as fh:
        header = [c.strip() for c in fh.readline().split(",")]
    id_col = "patientId" if "patientId" in header else "Image Index"
    df = read_csv_table(p, required=[id_col, "Mask Path"])
    out = {}
    present = df["Present"] if "Present" in df.columns else ["1"] * len(df)
    for i, mp, pr in zip(df[id_col], df["Mask Path"], present):
        mp = str(mp).strip()
        if mp and str(pr).strip() not in ("0", "0.0"):
            q = Path(mp)
            out[str(i).strip()] = q if q.is_absolute() else p.parent / q
    return out


def _shares(h: np.ndarray, lesion: np.ndarray, lungs: Optional[np.ndarray], cue: Optional[np.ndarray]) -> dict:
    pos = np.maximum(h, 0).astype(np.float64)
    total = pos.sum()
    if lungs is not None:
        a, b, c = region_shares(h, lesion, lungs)
    else:
        a = float(pos[lesion].sum() / total) if total > 0 else float("nan")
        b = c = float("nan")
    cue_share = float("nan")
    if cue is not None and cue.any():
        cue_share = float(pos[cue].sum() / total) if total > 0 else float("nan")
    return {"inside_lesion": a, "lung_outside_lesion": b, "outside_lungs": c, "on_cue": cue_share}


def intention_analysis(
    model: nn.Module,
    dataset: Any,
    methods: Sequence[str] = ("cam", "lrp", "rap"),
    finding: str = "Pneumonia",
    out_dir: Optional[str | os.PathLike] = None,
    batch_size: int = 16,
    device: str = "cpu",
    lungs: Optional[Mapping[str, Path]] = None,
    cues: Optional[Mapping[str, Path]] = None,
    max_images: Optional[int] = None,
    progress: bool = False,
    split: Optional[str] = None,
    exclude: Collection[str] = (),
) -> pd.DataFrame:
    """Relevance shares per image and method for the logit of ``finding``; one row per (image,
    method) with ``image_id, class, method, logit, prob, inside_lesion, lung_outside_lesion,
    outside_lungs, on_cue``. ``lungs`` / ``cues`` map image ids to mask files (default: the
    dataset root's ``lungs.csv`` / ``cues.csv``). ``split`` keeps the images of that split (the
    dataset's split file), ``max_images`` the first N of them; ``exclude``: image files to leave out
    (those ``evaluate`` could not read). With ``out_dir``, writes
    :func:`write_intention_tables` there."""
    spec = getattr(model, "cxr_spec", None)
    if spec is None:
        raise CxrExplainError("the model has no .cxr_spec; build it with build_model / load_checkpoint")
    cls = find_label(finding, spec.labels)
    if cls is None:
        raise CxrExplainError(f"the model has no output named {finding!r}; its outputs are: {', '.join(spec.labels)}")
    if finding not in dataset.findings:
        raise CxrExplainError(f"the dataset has no {finding!r} labels (findings: {', '.join(dataset.findings)})")
    fi = list(dataset.findings).index(finding)
    methods = [resolve_method_name(m) for m in methods]
    root = getattr(dataset, "root", None)
    lungs = dict(lungs) if lungs is not None else (read_region_masks(root, "lungs.csv") if root else {})
    cues = dict(cues) if cues is not None else (read_region_masks(root, "cues.csv") if root else {})
    pre = get_preprocessing(spec.preprocessing, spec.input_size)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    skip = {str(f) for f in exclude}
    order = [i for i in range(len(dataset)) if str(dataset.samples[i].path) not in skip]
    if split is not None:
        splits = dataset.splits()
        if not splits:
            raise CxrExplainError(f"split={split!r} requested but {type(dataset).__name__} has no split file")
        order = [i for i in order if splits.get(dataset.samples[i].image_id) == split]
        if not order:
            raise CxrExplainError(f"the dataset has no image of split {split!r}; choose another split")
    if max_images is not None:
        order = order[:max_images]
    n = len(order)
    rows = []
    bar = None
    if progress:
        from ..progress import progress_bar

        bar = progress_bar(total=n, unit="img", desc="intention")
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        xs, metas = [], []
        for i in idx:
            s = dataset[i]
            xr = dataset.read_image(i)
            x, _, _ = pre(xr)
            xs.append(x)
            H, W = xr.height, xr.width
            if finding in s.masks:
                lesion = np.asarray(s.masks[finding], dtype=bool)
            else:
                lesion = np.zeros((H, W), bool)
                for b in s.boxes:
                    if find_label(b.finding, [finding]) is not None:
                        lesion |= b.to_mask(H, W)
            lm = read_mask([lungs[s.image_id]]) if s.image_id in lungs else None
            cm = read_mask([cues[s.image_id]]) if s.image_id in cues else None
            metas.append((s, H, W, lesion, lm, cm))
        x = torch.stack(xs)
        for m in methods:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                exp = explain(model, x, method=m, target=cls)
            maps = (exp.raw_maps if exp.raw_maps is not None else exp.maps).detach().float().cpu()
            logits = exp.logits.detach().float().cpu()
            probs = torch.sigmoid(logits) if spec.multilabel else torch.softmax(logits, 1)
            for b, (s, H, W, lesion, lm, cm) in enumerate(metas):
                h = pre.to_original(maps[b], H, W).numpy()
                rows.append({"image_id": s.image_id, "class": finding.lower() if s.labels[fi] > 0 else "normal",
                             "method": m, "logit": float(logits[b, cls]), "prob": float(probs[b, cls]),
                             **_shares(h, lesion, lm, cm)})
        if bar:
            bar.update(len(idx))
    if bar:
        bar.close()
    df = pd.DataFrame(rows)
    if out_dir is not None:
        write_intention_tables(df, out_dir, model_name=str(spec.provenance.get("path") or spec.arch), finding=finding)
    return df


def write_intention_tables(df: pd.DataFrame, out_dir: str | os.PathLike, model_name: str = "",
                           finding: str = "Pneumonia") -> Path:
    """``intention.csv`` (per image), ``intention.json`` (finding, model) and
    ``tables/intention.{md,csv,json}`` (per method and class); returns the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / INTENTION_CSV, index=False, lineterminator="\n")
    (out / INTENTION_SETTINGS).write_text(json.dumps({"finding": finding, "model": model_name}, indent=1))
    return intention_table(df, finding, model_name).write(out / TABLES_DIR)["md"]
