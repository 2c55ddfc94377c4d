"""The CheXlocalize protocol on a dataset (docs/chexlocalize.md): records, then the table.

:func:`collect_records` explains, for every image, the dataset's findings the model outputs (all of
them in one pass per method) and keeps one record per (image, finding, method): the model's
probability, and :func:`~cxr_explain.metrics.chexlocalize.score_map` of the map resized to the
original image (CAM-type maps from their feature resolution, as the benchmark resizes Grad-CAM)
against the ground truth (the finding's mask, or the union of its boxes on NIH data; empty on a
negative image). Only the images' positive findings are scored unless ``all_pairs`` (needed for
the full-set mIoU and for tuning cut-offs). A CheXlocalize dataset's human benchmark adds records of
method ``human``. Records go to ``chexlocalize_records.csv`` as produced (a rerun resumes).

:func:`write_chexlocalize_tables` turns them into ``tables/chexlocalize.{md,csv,json}`` through
:mod:`cxr_explain.results.chexlocalize`: mIoU and hit rate per pathology and method with bootstrap
CIs, thresholds and cut-offs tuned on the ``val`` split and reported on ``test`` when both are there.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Collection, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ..attribution import explain
from ..attribution.methods import Method, get_method, resolve_method_name
from ..data.images import get_preprocessing
from ..data.labels import find_label
from ..data.types import Sample
from ..errors import CxrExplainError
from ..metrics.chexlocalize import IOU_MODES, THRESHOLD_GRID, hit_points, score_map, threshold_column
from ..results.chexlocalize import (CUTOFF_CHOICES, HUMAN, RECORD_COLUMNS, RECORDS_NAME, SEGMENTATIONS,
                                    check_settings, chexlocalize_tables, save_settings)
from ..results.folder import TABLES_DIR
from ..runtime import loader_workers, resolve_device
from ..results.store import ResultsWriter, read_results

def output_index(model: nn.Module, finding: str) -> Optional[int]:
    """The model output explained for ``finding`` (:func:`~cxr_explain.data.labels.find_label` on the
    model's labels: exact, then case / ``_`` / alias-insensitive); None if it has none."""
    return find_label(finding, model.cxr_spec.labels)


def positive_findings(dataset: Any, i: int) -> list[str]:
    """Findings of sample ``i`` with a non-empty ground truth (mask or box)."""
    if hasattr(dataset, "gt_findings"):
        return list(dataset.gt_findings(i))
    s = dataset[i]
    have = set(s.masks) | {b.finding for b in s.boxes}
    return [f for f in dataset.findings if f in have]


def gt_mask(sample: Sample, finding: str, height: int, width: int) -> np.ndarray:
    """The finding's ground truth in original pixels: its mask OR its boxes (all False if none)."""
    m = np.zeros((height, width), dtype=bool)
    if finding in sample.masks:
        mk = np.asarray(sample.masks[finding], dtype=bool)
        if mk.shape != (height, width):
            raise CxrExplainError(f"{sample.image_id}: the {finding} mask is {mk.shape[1]}x{mk.shape[0]} but the "
                                  f"image is {width}x{height}; masks must be in the original pixel space")
        m |= mk
    for b in sample.boxes:
        if b.finding == finding:
            m |= b.to_mask(height, width)
    return m


class _Items(torch.utils.data.Dataset):
    def __init__(self, dataset: Any, indices: Sequence[int], pre):
        self.dataset, self.indices, self.pre = dataset, list(indices), pre

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        i = self.indices[k]
        xr = self.dataset.read_image(i)
        x, _, _ = self.pre(xr)
        return {"index": i, "x": x, "sample": self.dataset[i], "height": xr.height, "width": xr.width}


def _collate(items: list[dict]) -> list[dict]:
    return items


def collect_records(
    model: nn.Module,
    dataset: Any,
    methods: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    all_pairs: bool = False,
    splits: Optional[Sequence[str]] = None,
    max_images: Optional[int] = None,
    batch_size: int = 8,
    device: str = "cpu",
    workers: Optional[int] = None,
    progress: bool = True,
    method_options: Optional[dict[str, dict[str, Any]]] = None,
    exclude: Collection[str] = (),
) -> pd.DataFrame:
    """Score every (image, finding, method) of ``dataset`` (see the module docstring) into
    ``out_dir/chexlocalize_records.csv``; returns all its records. ``splits`` keeps images of those
    splits; ``max_images`` the first N images with a pair in each split; ``method_options`` as for
    :func:`~.runner.evaluate`; ``exclude``: image files to leave out (those ``evaluate`` could not
    read, listed in its ``failures.csv``)."""
    methods = [resolve_method_name(m) for m in methods]
    opts = {resolve_method_name(k): v for k, v in (method_options or {}).items()}
    configured: dict[str, Method] = {m: get_method(m, **opts.get(m, {})) for m in methods}
    spec = getattr(model, "cxr_spec", None)
    if spec is None:
        raise CxrExplainError(f"{type(model).__name__} has no .cxr_spec; load it with load_checkpoint / load_model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    idx = {f: output_index(model, f) for f in dataset.findings}
    usable = [f for f in dataset.findings if idx[f] is not None]
    if not usable:
        raise CxrExplainError(f"the model's outputs ({', '.join(spec.labels)}) include none of the dataset's "
                              f"findings ({', '.join(dataset.findings)})")
    split_of = dataset.splits()
    if splits is not None and not split_of:
        raise CxrExplainError(f"splits {list(splits)} requested but {type(dataset).__name__} has no split information")
    pairs: dict[int, list[str]] = {}
    per_split: dict[str, int] = {}
    skip = {str(f) for f in exclude}
    for i in range(len(dataset)):
        sp = split_of.get(dataset.samples[i].image_id, "")
        if (splits is not None and sp not in splits) or str(dataset.samples[i].path) in skip:
            continue
        if max_images is not None and per_split.get(sp, 0) >= max_images:
            continue
        fs = usable if all_pairs else [f for f in positive_findings(dataset, i) if f in usable]
        if fs:
            pairs[i] = fs
            per_split[sp] = per_split.get(sp, 0) + 1
    if not pairs:
        raise CxrExplainError(f"{getattr(dataset, 'root', 'the dataset')}: no image has ground truth of a finding the "
                              f"model outputs ({', '.join(usable)}){' in splits ' + str(list(splits)) if splits else ''}")
    human = getattr(dataset, "human", None) or {}
    ids = {i: dataset.samples[i].image_id for i in pairs}
    expected = {(ids[i], m): len(fs) for i, fs in pairs.items() for m in methods}
    expected.update({(ids[i], HUMAN): len(fs) for i, fs in pairs.items() if ids[i] in human})
    writer = ResultsWriter(out / RECORDS_NAME, RECORD_COLUMNS, expected)
    todo = [i for i in pairs if any((ids[i], m) not in writer.done for m in methods)
            or (ids[i] in human and (ids[i], HUMAN) not in writer.done)]
    pre = get_preprocessing(spec.preprocessing, int(spec.input_size))
    dev = resolve_device(device)
    model = model.to(dev).eval()
    loader = torch.utils.data.DataLoader(_Items(dataset, todo, pre), batch_size=batch_size, shuffle=False,
                                         num_workers=loader_workers(workers, -(-len(todo) // batch_size), dev),
                                         collate_fn=_collate)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), initial=len(pairs) - len(todo), unit="img", desc="CheXlocalize", dynamic_ncols=True)
    try:
        for batch in loader:
            for m in methods:
                items = [it for it in batch if (ids[it["index"]], m) not in writer.done]
                if items:
                    for rows in _score(model, configured[m], items, pairs, idx, pre, split_of, bool(spec.multilabel)):
                        writer.write_group(rows)
            for it in batch:
                iid = ids[it["index"]]
                if iid in human and (iid, HUMAN) not in writer.done:
                    writer.write_group(_human_rows(dataset, it, pairs[it["index"]], split_of))
            writer.flush()
            if bar:
                bar.update(len(batch))
    finally:
        writer.close()
        if bar:
            bar.close()
    return read_results(out / RECORDS_NAME, RECORD_COLUMNS)


def _score(model, configured: Method, items, pairs, idx, pre, split_of, multilabel):
    method = configured.name
    x = torch.stack([it["x"] for it in items])
    targets = [[idx[f] for f in pairs[it["index"]]] for it in items]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # conservation notes: not a scoring problem
        exp = explain(model, x, method=configured, target=targets)
    src = exp.raw_maps if exp.raw_maps is not None else exp.maps  # CAM family: the low-resolution map
    src = src.detach().float().cpu()
    logits = exp.logits.detach().float().cpu()
    probs = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
    for b, it in enumerate(items):
        s: Sample = it["sample"]
        H, W = int(it["height"]), int(it["width"])
        rows = []
        for k, f in enumerate(pairs[it["index"]]):
            h = pre.to_original(src[b, k], H, W).numpy()
            rec = score_map(h, gt_mask(s, f, H, W))
            rows.append({"image_id": s.image_id, "finding": f, "method": method, "gt": "chexlocalize", "gt_index": 0,
                         "split": split_of.get(s.image_id, ""), "prob": float(probs[b, targets[b][k]]),
                         "logit": float(logits[b, targets[b][k]]), "height": H, "width": W, **rec})
        yield rows


def _human_rows(dataset, it, findings, split_of) -> list[dict]:
    """The human benchmark as a method: its segmentation for every grid threshold, its points for the hit."""
    s: Sample = it["sample"]
    H, W = int(it["height"]), int(it["width"])
    hb = dataset.human_masks(it["index"])
    pts = getattr(dataset, "human_points", {}).get(s.image_id, {})
    rows = []
    for f in findings:
        g = gt_mask(s, f, H, W)
        p = np.asarray(hb[f], dtype=bool) if f in hb else np.zeros_like(g)
        if p.shape != g.shape:
            raise CxrExplainError(f"{s.image_id}: the human benchmark's {f} mask is {p.shape} but the image {g.shape}")
        n_p, n_i = int(p.sum()), int((p & g).sum())
        rec = {"gt_area": int(g.sum()), "hit": hit_points(pts.get(f), g), "pred_otsu": n_p, "inter_otsu": n_i}
        for t in THRESHOLD_GRID:
            rec[threshold_column(t, "pred")], rec[threshold_column(t, "inter")] = n_p, n_i
        rows.append({"image_id": s.image_id, "finding": f, "method": HUMAN, "gt": "chexlocalize", "gt_index": 0,
                     "split": split_of.get(s.image_id, ""), "prob": 1.0, "logit": float("nan"),
                     "height": H, "width": W, **rec})
    return rows


def write_chexlocalize_tables(out_dir: str | os.PathLike, segmentation: str = "otsu", cutoffs: str = "none",
                              mode: str = "true_positive", n_resamples: int = 1000, seed: int = 0,
                              findings_order: Sequence[str] = ()) -> Path:
    """``tables/chexlocalize.{md,csv,json}`` from the records in ``out_dir``
    (:func:`cxr_explain.results.chexlocalize.chexlocalize_tables`; its settings are kept beside the
    records so the report redraws the same table); returns the Markdown's path."""
    check_settings(segmentation, cutoffs, mode)
    group = chexlocalize_tables(out_dir, segmentation, cutoffs, mode, n_resamples, seed, findings_order)
    save_settings(out_dir, segmentation, cutoffs, mode, n_resamples, seed, findings_order)
    return group.write(Path(out_dir) / TABLES_DIR)["md"]


def run_chexlocalize(model: nn.Module, dataset: Any, methods: Sequence[str], out_dir: str | os.PathLike, *,
                     segmentation: str = "otsu", cutoffs: str = "none", mode: str = "true_positive",
                     split: Optional[str] = None, max_images: Optional[int] = None, batch_size: int = 8,
                     device: str = "cpu", workers: Optional[int] = None, progress: bool = True,
                     method_options: Optional[dict[str, dict[str, Any]]] = None, exclude: Collection[str] = ()) -> Path:
    """Records (scoring every finding of every image when the full set or cut-off tuning needs them;
    with ``split`` and tuning, the ``val`` split is scored too, to tune on), then the tables.
    ``exclude``: image files to leave out (:func:`collect_records`). Returns the Markdown table's path."""
    if segmentation not in SEGMENTATIONS or cutoffs not in CUTOFF_CHOICES or mode not in IOU_MODES:
        raise CxrExplainError(f"CheXlocalize options: segmentation {segmentation!r} (otsu|tuned), cutoffs "
                              f"{cutoffs!r} (none|tune), mode {mode!r} (true_positive|full)")
    tuning = segmentation == "tuned" or cutoffs == "tune"
    splits = None
    if split is not None:
        splits = [split] + (["val"] if tuning and split != "val" else [])
    collect_records(model, dataset, methods, out_dir, all_pairs=(cutoffs == "tune" or mode == "full"), splits=splits,
                    max_images=max_images, batch_size=batch_size, device=device, workers=workers, progress=progress,
                    method_options=method_options, exclude=exclude)
    return write_chexlocalize_tables(out_dir, segmentation, cutoffs, mode, findings_order=tuple(dataset.findings))
