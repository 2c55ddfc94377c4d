"""``evaluate``: explain every lesion of a dataset with several methods and score the maps.

One row per (image, ground truth, method) goes to ``results.csv`` as it is produced
(:mod:`cxr_explain.results`, which owns its schema). The protocol is the paper's (``docs/evaluation.md`` §1): the explained output is
the logit of the box's finding whatever the model predicted; the map is resized to the original
image size (``resize``), negatives set to 0 and divided by its maximum; the region ``h > T`` is
compared with the box (or exact mask) in original pixel space. The same row carries the
CheXlocalize (§2) and XAI-literature (§3) scores of
:func:`cxr_explain.metrics.localization.localization_scores`, computed through its
:class:`~cxr_explain.metrics.localization.MapScorer` so that each explained map is resized,
normalised and sorted once, however many regions of its finding the image has.

Scale: a ``DataLoader`` (``workers`` processes) decodes and preprocesses images; ``device="cuda"``
runs the model on a GPU; under ``torchrun`` each rank evaluates every ``world_size``-th image into
``results.rank{r}.csv`` and rank 0 merges them into ``results.csv`` at the end.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..attribution import explain
from ..attribution.methods import Method, get_method, resolve_method_name
from ..attribution.targets import Contrast, Index
from ..data.images import Preprocessing, get_preprocessing
from ..data.labels import find_label, label_index
from ..data.types import Box, Sample
from ..errors import CxrExplainError, failure_reason
from ..models.checkpoints import weights_sha256
from ..metrics.localization import (EMPTY_REGION_MODES, OPTIONAL_SCORES, PAPER_THRESHOLDS, RESIZE_MODES, MapScorer,
                                    check_scores, normalize_map,
                                    resize_map, resize_maps)
from ..runtime import init_distributed, loader_workers, resolve_device
from ..results.maps import map_file as map_file_of
from ..results.maps import save_maps as write_maps
from ..results.csvlog import FAILURES_COLUMNS, FAILURES_FILE, CsvLog, merge_logs
from ..results.logits import LOGITS_NAME, LogitsLog, merge_rank_logits
from ..results.run import record_run
from ..results.schema import RESULTS_NAME, results_columns
from ..results.store import ResultsWriter, complete_pairs, merge_results, read_results
from .timing import NO_TIMER, StageTimer

DEFAULT_METHODS = ("cam", "lrp", "rap")


# --------------------------------------------------------------------------- ground truth
@dataclass(frozen=True)
class GroundTruth:
    """One scored region of an image: a box (``gt="box"``, ``gt_index`` = its position in the
    sample's box list) or an exact mask of a finding (``gt="mask"``, ``gt_index`` 0)."""

    finding: str
    gt: str
    gt_index: int
    box: Optional[Box] = None


def ground_truths(dataset: Any, i: int, labels: Sequence[str], use_masks: bool = True) -> list[GroundTruth]:
    """The boxes (and, with ``use_masks``, the masks) of sample ``i`` whose finding the model outputs."""
    s = dataset.samples[i]
    out = [GroundTruth(b.finding, "box", k, b) for k, b in enumerate(s.boxes)
           if find_label(b.finding, labels) is not None]
    if use_masks:
        out += [GroundTruth(f, "mask", 0) for f in dataset.mask_findings(i)
                if find_label(f, labels) is not None]
    return out


def select_images(dataset: Any, labels: Sequence[str], split: Optional[str] = None, use_masks: bool = True,
                  max_images: Optional[int] = None) -> dict[int, list[GroundTruth]]:
    """The images an evaluation scores, in dataset order: ``{index: its ground truths}`` for every
    image with a box or mask of a finding in ``labels`` (of ``split`` when given; the first
    ``max_images`` of them when given)."""
    splits = dataset.splits()
    if split is not None and not splits:
        raise CxrExplainError(f"split={split!r} requested but {type(dataset).__name__} has no split file")
    gts: dict[int, list[GroundTruth]] = {}
    for i in range(len(dataset)):
        if split is not None and splits.get(dataset.samples[i].image_id) != split:
            continue
        g = ground_truths(dataset, i, labels, use_masks)
        if g:
            gts[i] = g
        if max_images is not None and len(gts) >= max_images:
            break
    return gts


def findings_of(gts: Sequence[GroundTruth]) -> list[str]:
    """An image's explained findings: each finding of its ground truths once, in their order."""
    return list(dict.fromkeys(g.finding for g in gts))


def batch_plan(indices: Sequence[int], gts: dict[int, list[GroundTruth]], batch_size: int) -> list[list[int]]:
    """The batches ``evaluate`` explains ``indices`` in (lists of dataset indices): images grouped by
    their number of explained findings (groups in order of first appearance, images in their order),
    each group cut into batches of ``batch_size``. Every image of a batch then has as many targets
    as the others, so no padded target (−1) is ever propagated: a batch of one image with three
    findings and seven with one costs 8 × 3 propagations, two batches by count cost 1 × 3 + 7 × 1."""
    groups: dict[int, list[int]] = {}
    for i in indices:
        groups.setdefault(len(findings_of(gts[i])), []).append(i)
    return [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]


def explain_targets(gts: Sequence[GroundTruth], labels: Sequence[str], versus: Optional[int] = None) -> list:
    """The targets one image is explained for: the class of each of its findings (``findings_of``),
    or ``Contrast(finding, versus)`` when a ``versus`` output is given."""
    classes = [find_label(f, labels) for f in findings_of(gts)]
    return [Contrast(Index(c), Index(versus)) if versus is not None else c for c in classes]


# --------------------------------------------------------------------------- data loading
class _EvalItems(torch.utils.data.Dataset):
    """Decode + preprocess one image (in a DataLoader worker): the model input, the sample with
    its masks, the original size."""

    def __init__(self, dataset: Any, indices: Sequence[int], pre: Preprocessing):
        self.dataset, self.indices, self.pre = dataset, list(indices), pre

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        """The item, or ``{"index", "file", "failed": reason}`` when the film (or its masks) cannot
        be read: a corrupt file is a failure of stage ``read``, not the end of the run."""
        t0 = time.perf_counter()
        i = self.indices[k]
        try:
            xr = self.dataset.read_image(i)
            x, _, _ = self.pre(xr)
            sample = self.dataset[i]
        except Exception as exc:  # noqa: BLE001 - decoders raise anything on odd files; the run goes on
            path = self.dataset.samples[i].path
            return {"index": i, "file": str(path), "failed": failure_reason(exc, path),
                    "decode_s": time.perf_counter() - t0}
        return {"index": i, "x": x, "sample": sample, "height": xr.height, "width": xr.width,
                "decode_s": time.perf_counter() - t0}


def _collate(items: list[dict]) -> list[dict]:
    return items


# --------------------------------------------------------------------------- run settings
def _spec_info(model: nn.Module) -> dict:
    spec = getattr(model, "cxr_spec", None)
    if spec is None:
        raise CxrExplainError(
            f"{type(model).__name__} has no .cxr_spec (labels, preprocessing); build it with "
            "cxr_explain.models.build_model / load_checkpoint or set model.cxr_spec = ModelSpec(...)")
    return {"arch": spec.arch, "labels": list(spec.labels), "preprocessing": spec.preprocessing,
            "input_size": int(spec.input_size), "multilabel": bool(spec.multilabel),
            "provenance": {k: v for k, v in dict(spec.provenance).items()
                           if isinstance(v, (str, int, float, bool)) or v is None}}


def _dataset_info(dataset: Any) -> dict:
    return {"type": type(dataset).__name__, "root": str(getattr(dataset, "root", "")),
            "split": getattr(dataset, "split", None), "findings": list(getattr(dataset, "findings", ())),
            "n_images": len(dataset)}


def _identity_geometry(pre: Preprocessing, h: int, w: int) -> bool:
    g = pre.geometry(h, w)
    return g.x0 == 0 and g.y0 == 0 and g.crop_w == w and g.crop_h == h


def _scoring_pool(batch_size: int) -> Optional[ThreadPoolExecutor]:
    """Threads that normalise, sort and score the films of a batch side by side (numpy only; its
    sort releases the GIL), one per torch thread (``--threads``): scoring then takes about
    1 / threads of its serial time. None when there is one thread or one film a batch."""
    n = min(torch.get_num_threads(), os.cpu_count() or 1, batch_size)
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="cxr-score") if n > 1 else None


def _scoring_lag(dev: torch.device, batch_size: int, n_methods: int) -> int:
    """How many (film, method) scorings may wait behind the engine. On a GPU the scoring threads run
    beside it, up to about two batches behind (the CPU is otherwise idle while the GPU explains). On
    the CPU they would take cores from the engine's own threads (measured on 2 cores, 24 films:
    explanations 15.5 s -> 18.3 s, the run 19.5 s -> 20.6 s), so there the engine waits for each
    method's films to be scored, in parallel, before it goes on (0)."""
    return 2 * batch_size * n_methods if dev.type == "cuda" else 0


def _probe(model: nn.Module, methods: Sequence[Method], channels: int, size: int, device: torch.device) -> None:
    """Each method once on a random input (first output): a method the model cannot take
    (attention rules on a CNN, a CAM without a spatial map) stops the run here with one line,
    rather than failing on every film (:func:`~cxr_explain.attribution.probe.probe_methods`)."""
    from ..attribution.probe import probe_methods

    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    probe_methods(model, methods, channels, size, device, dtype)


class _Failures:
    """This run's failures: each one row of ``failures.csv`` and one line on stderr, or, with
    ``stop``, the error that ends the run."""

    def __init__(self, path: Path, stop: bool):
        self.log = CsvLog(path, FAILURES_COLUMNS, fresh=True)
        self.stop = stop

    def __call__(self, file: str, stage: str, reason: str) -> None:
        self.log.append([{"file": file, "stage": stage, "reason": reason}])
        if self.stop:
            raise CxrExplainError(f"{file}: {stage} failed: {reason}")
        print(f"cxr-explain evaluate: {file}: {stage} failed: {reason}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- main loop
def evaluate(
    model: nn.Module,
    dataset: Any,
    methods: Sequence[str] = DEFAULT_METHODS,
    thresholds: Sequence[float] = PAPER_THRESHOLDS,
    out_dir: str | os.PathLike = "cxr-explain-eval",
    batch_size: int = 8,
    device: str = "cpu",
    workers: Optional[int] = None,
    split: Optional[str] = None,
    resize: str = "bilinear",
    empty_region: str = "zero",
    save_maps: bool = True,
    faithfulness: bool = False,
    progress: bool = True,
    *,
    use_masks: bool = True,
    scaling: str = "clip",
    faithfulness_images: int = 8,
    max_images: Optional[int] = None,
    stop_after_batches: Optional[int] = None,
    method_options: Optional[dict[str, dict[str, Any]]] = None,
    versus: Optional[str] = None,
    timer: Optional[StageTimer] = None,
    stop_on_error: bool = False,
    dtype: str = "float32",
    notes: Optional[Sequence[str]] = None,
    metrics: Optional[Sequence[str]] = None,
) -> Path:
    """Evaluate ``methods`` on every box (and exact mask) of ``dataset``; returns ``out_dir``.

    Writes ``results.csv`` (one row per image × ground truth × method; columns in
    :func:`cxr_explain.results.results_columns`), ``maps/<method>/<image>.npz`` (float16 maps at the
    model's input resolution, one array per finding; :mod:`cxr_explain.results.maps`) and ``run.json``
    (settings). Tables, figures and ``report.html`` are :func:`cxr_explain.report.write_report`'s job.
    A rerun skips (image, method) pairs already complete. ``split`` keeps only images of that split
    (the dataset's ``splits()``); the ``split`` column always names each image's split where one is known. ``max_images`` keeps
    the first N images with ground truth (dataset order). ``stop_after_batches`` stops early (to
    test resuming). ``faithfulness`` adds deletion / insertion and the randomisation check on the
    first ``faithfulness_images`` images (:mod:`.faithfulness`). ``method_options``: per method name,
    its options (``{"lrp-epsilon": {"epsilon": 0.1}}``). ``versus``: explain each finding against this
    output (``logit_finding − logit_versus``, e.g. "No Finding") instead of its logit alone.
    ``timer``: a :class:`~.timing.StageTimer` to fill with the time of each stage (benchmarks).

    A film that cannot be read, explained or scored is a failure: one line on stderr and one row of
    ``failures.csv`` (file, stage ``read`` / ``explain`` / ``score``, reason), and the run goes on
    (a rerun retries it); ``stop_on_error`` raises at the first one instead. ``dtype``: ``"float64"``
    explains in double precision (the model is converted in place, as it is moved to ``device``).
    ``notes``: warning lines recorded in ``run.json`` (default: the synthetic-model warning when a
    model trained on the synthetic benchmark meets other films). ``metrics``: the scores besides
    IoU at T to compute (:data:`~cxr_explain.metrics.localization.OPTIONAL_SCORES`; default all);
    the others' columns stay empty. Without ``rank`` and ``auprc`` no map is sorted (about half
    the scoring time).
    """
    tm = timer if timer is not None else NO_TIMER
    t_start = time.perf_counter() if tm.enabled else 0.0
    methods = [resolve_method_name(m) for m in methods]
    opts = {resolve_method_name(k): v for k, v in (method_options or {}).items()}
    configured: dict[str, Method] = {m: get_method(m, **opts.get(m, {})) for m in methods}
    if not methods:
        raise CxrExplainError("no explanation method given; pass e.g. --methods cam lrp rap")
    thresholds = [float(t) for t in thresholds]
    if not thresholds or any(not 0.0 <= t < 1.0 for t in thresholds):
        raise CxrExplainError(f"thresholds {thresholds} must lie in [0, 1)")
    if resize not in RESIZE_MODES:
        raise CxrExplainError(f"unknown --resize {resize!r}; use one of {', '.join(RESIZE_MODES)}")
    if empty_region not in EMPTY_REGION_MODES:
        raise CxrExplainError(f"unknown --empty-region {empty_region!r}; use 'zero' or 'nan'")
    if batch_size < 1:
        raise CxrExplainError("--batch-size must be at least 1")
    if dtype not in ("float32", "float64"):
        raise CxrExplainError(f"--dtype {dtype!r}: use float32 or float64")
    metrics = list(check_scores(OPTIONAL_SCORES if metrics is None else metrics))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = _spec_info(model)
    labels = info["labels"]
    versus_index = label_index(versus, labels) if versus else None
    pre = get_preprocessing(info["preprocessing"], info["input_size"])
    dev = resolve_device(device)
    d = init_distributed(dev, timeout=timedelta(hours=24))  # rank 0 may merge and score faithfulness for long
    rank, world = d.rank, d.world
    columns = results_columns(thresholds)

    splits = dataset.splits()
    gts = select_images(dataset, labels, split, use_masks, max_images)
    if not gts:
        raise CxrExplainError(
            f"{_dataset_info(dataset)['root'] or 'the dataset'}: no image{' of split ' + repr(split) if split else ''} "
            f"has a box or mask of a finding "
            f"the model outputs ({', '.join(labels)}); check the box file and the model's labels")
    if notes is None:
        from ..models.default import synthetic_model_warning

        note = synthetic_model_warning(model, [_dataset_info(dataset)["root"]])
        notes = [note] if note else []
    settings = {"thresholds": thresholds, "resize": resize, "empty_region": empty_region, "scaling": scaling,
                "masks": use_masks, "model": info, "methods": methods, "dataset": _dataset_info(dataset),
                "method_settings": {m: configured[m].settings() for m in methods}, "versus": versus,
                "split_filter": split, "batch_size": batch_size, "device": str(dev), "world_size": world,
                "dtype": dtype, "warnings": list(notes), "metrics": metrics,
                "protocol": "docs/evaluation.md §1 (IoU of h>T vs box in original pixel space) + §2 Otsu/hit "
                            "+ §3 mass/rank/AUPRC"}
    if rank == 0:
        settings = record_run(out, settings)
    d.barrier()

    ids = {i: dataset.samples[i].image_id for i in gts}
    expected = {(ids[i], m): len(g) for i, g in gts.items() for m in methods}
    main_path = out / RESULTS_NAME
    if world > 1:
        done_main = complete_pairs(main_path, columns, expected)
        writer = ResultsWriter(out / f"results.rank{rank}.csv", columns, expected)
        writer.done |= done_main
    else:
        writer = ResultsWriter(main_path, columns, expected)
    fail = _Failures(out / (FAILURES_FILE if world == 1 else f"failures.rank{rank}.csv"), stop_on_error)
    shard = sorted(gts)[rank::world]
    todo = [i for i in shard if any((ids[i], m) not in writer.done for m in methods)]

    model = model.to(device=dev, dtype=torch.float64 if dtype == "float64" else torch.float32)
    model.eval()
    logits_log = LogitsLog(out / (LOGITS_NAME if world == 1 else f"logits.rank{rank}.csv"), labels,
                           weights_sha256(model))
    if todo:
        _probe(model, [configured[m] for m in methods], pre.channels, info["input_size"], dev)
    plan = batch_plan(todo, gts, batch_size)
    pos = {i: k for k, i in enumerate(todo)}
    loader = torch.utils.data.DataLoader(
        _EvalItems(dataset, todo, pre), batch_sampler=[[pos[i] for i in b] for b in plan],
        num_workers=loader_workers(workers, len(plan), dev), collate_fn=_collate, persistent_workers=False,
        pin_memory=dev.type == "cuda")
    bar = None
    if progress:
        from ..progress import progress_bar

        bar = progress_bar(total=len(shard), initial=len(shard) - len(todo), unit="img",
                           desc="evaluate" + (f" rank {rank}" if world > 1 else ""))
    ctx = {"labels": labels, "pre": pre, "thresholds": thresholds, "resize": resize, "multilabel": info["multilabel"],
           "empty_region": empty_region, "scaling": scaling, "splits": splits, "out": out, "save_maps": save_maps,
           "use_masks": use_masks, "versus": versus_index, "timer": tm, "dtype": dtype,
           "pool": _scoring_pool(batch_size), "logits": logits_log, "logged": set(), "metrics": metrics}
    pending = _PendingRows(writer, fail, tm)
    in_flight = _scoring_lag(dev, batch_size, len(methods))
    if tm.enabled:
        tm.add("start-up", time.perf_counter() - t_start)
    try:
        batches = iter(loader)
        nb = 0
        while True:
            with tm.stage("wait for data"):
                batch = next(batches, None)
            if batch is None or (stop_after_batches is not None and nb >= stop_after_batches):
                break
            nb += 1
            if tm.enabled:
                tm.add("decode", sum(it["decode_s"] for it in batch), len(batch))
            readable = []
            for it in batch:
                if "failed" in it:
                    fail(it["file"], "read", it["failed"])
                else:
                    readable.append(it)
            for m in methods:
                items = [it for it in readable if (ids[it["index"]], m) not in writer.done]
                if items:
                    for it, scored in _score_items(model, configured[m], items, gts, ctx, fail):
                        pending.put(it, m, scored)
                    pending.write(keep=in_flight)  # what the threads finished; the rest scores on
            with tm.stage("rows"):
                writer.flush()
            if bar:
                bar.update(len(batch))
        pending.write(keep=0)
    finally:
        pending.write(keep=0, quiet=True)  # rows already scored are kept even when the run stops
        writer.close()
        if ctx["pool"] is not None:
            ctx["pool"].shutdown(cancel_futures=True)
        if bar:
            bar.close()
    t_end = time.perf_counter() if tm.enabled else 0.0
    d.barrier()
    if world > 1 and rank == 0:
        merge_results(main_path, [out / f"results.rank{r}.csv" for r in range(world)], columns)
        merge_logs(out / FAILURES_FILE, [out / f"failures.rank{r}.csv" for r in range(world)], FAILURES_COLUMNS)
        merge_rank_logits(out, world, labels)
    d.barrier()
    if rank == 0 and stop_after_batches is None and faithfulness:
        from .faithfulness import run_faithfulness

        scored = set(read_results(main_path, columns)["image_id"])  # films that failed have no rows
        chosen = [i for i in sorted(gts) if ids[i] in scored][:faithfulness_images]
        run_faithfulness(model, dataset, out, methods, chosen, gts, pre, progress=progress)
    if tm.enabled:
        tm.add("finish", time.perf_counter() - t_end)
    return out


def _gt_mask(sample: Sample, gt: GroundTruth, h: int, w: int) -> np.ndarray:
    if gt.gt == "box":
        return gt.box.to_mask(h, w)
    m = np.asarray(sample.masks[gt.finding], dtype=bool)
    if m.shape != (h, w):
        raise CxrExplainError(
            f"{sample.image_id}: the {gt.finding} mask is {m.shape[1]}x{m.shape[0]} but the image is {w}x{h}; "
            "masks must be in the original pixel space")
    return m


def _bbox_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    if not ys.size:
        return (float("nan"),) * 4
    return float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)


def _explain_items(model: nn.Module, configured: Method, items: list[dict], gts: dict, ctx: dict):
    """Explain ``items`` with ``configured`` (all findings of an image in one pass)."""
    labels, versus = ctx["labels"], ctx["versus"]
    x = torch.stack([it["x"] for it in items])
    targets = [explain_targets(gts[it["index"]], labels, versus) for it in items]
    with warnings.catch_warnings(), ctx["timer"].stage(f"explain {configured.name}"):
        warnings.simplefilter("ignore", RuntimeWarning)  # conservation notes: the rows carry the error
        return explain(model, x, method=configured, target=targets)


def _done(value: Any) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class _PendingRows:
    """Films being scored by the pool's threads (on a GPU while the engine explains the next method
    or batch); their rows are written in the order the films were explained, a film whose rows could
    not be made fails at stage ``score``. ``write(keep=k)`` writes every finished film at the head
    of the queue and waits for the oldest while more than ``k`` are pending."""

    def __init__(self, writer: ResultsWriter, fail, timer: StageTimer | Any):
        self.queue: deque[tuple[dict, str, Future]] = deque()
        self.writer, self.fail, self.timer = writer, fail, timer

    def put(self, item: dict, method: str, scored: Future) -> None:
        self.queue.append((item, method, scored))

    def write(self, keep: int, quiet: bool = False) -> None:
        """``quiet``: after an error, write what is finished and report nothing more."""
        while self.queue and (len(self.queue) > keep or self.queue[0][2].done()):
            if quiet and not self.queue[0][2].done():
                return
            it, method, scored = self.queue.popleft()
            if scored.done():
                rows, exc = scored.result()
            else:
                with self.timer.stage("wait for scoring"):
                    rows, exc = scored.result()
            if exc is not None:
                if not quiet:
                    path = it["sample"].path
                    self.fail(str(path), "score", f"{method}: {failure_reason(exc, path)}")
                continue
            with self.timer.stage("rows"):
                self.writer.write_group(rows)


def _score_items(model: nn.Module, configured: Method, items: list[dict], gts: dict, ctx: dict, fail):
    """Explain ``items`` with ``configured`` and yield, per image, ``(item, future rows)``: the
    scoring runs in the pool's threads (at once without a pool); on a GPU the engine goes on with
    the next method while the maps are resized and scored. A batch the method refuses is explained
    film by film, so that only the film at fault fails (stage ``explain``)."""
    method = configured.name
    try:
        exp = _explain_items(model, configured, items, gts, ctx)
    except CxrExplainError as exc:
        if len(items) > 1:
            for it in items:
                yield from _score_items(model, configured, [it], gts, ctx, fail)
            return
        path = items[0]["sample"].path
        fail(str(path), "explain", f"{method}: {failure_reason(exc, path)}")
        return
    fdt = torch.float64 if ctx["dtype"] == "float64" else torch.float32
    maps = exp.maps.detach().cpu().to(fdt)
    raw = exp.raw_maps.detach().cpu().to(fdt) if exp.raw_maps is not None else None  # CAM family: low-res map
    logits = exp.logits.detach().cpu().to(fdt)
    cons = exp.conservation_error.detach().cpu().double() if exp.conservation_error is not None else None
    probs = torch.sigmoid(logits) if ctx["multilabel"] else torch.softmax(logits, dim=1)
    _log_logits(items, logits, ctx)

    def rows_of(b: int, resized: list[np.ndarray]) -> tuple[Optional[list[dict]], Optional[Exception]]:
        it = items[b]
        classes = [find_label(f, ctx["labels"]) for f in findings_of(gts[it["index"]])]
        try:
            return _image_rows(it, method, b, maps, resized, logits, probs, classes, gts[it["index"]], ctx,
                               cons), None
        except (CxrExplainError, OSError) as exc:
            return None, exc

    pool: Optional[ThreadPoolExecutor] = ctx.get("pool")
    with ctx["timer"].stage("resize"):
        resized = _original_size_maps(items, raw if raw is not None else maps, gts, ctx)
    for b, it in enumerate(items):
        if isinstance(resized[b], Exception):
            yield it, _done((None, resized[b]))
        else:
            yield it, (pool.submit(rows_of, b, resized[b]) if pool is not None else _done(rows_of(b, resized[b])))


def _original_size_maps(items: list[dict], src: torch.Tensor, gts: dict, ctx: dict) -> list:
    """Each film's maps (one per finding) in its original pixel space, not yet normalised, as numpy
    arrays (or the film's error). Runs in the engine's thread: torch called from the scoring threads
    would give each its own OpenMP team, and with more OpenMP threads than cores libgomp stops
    spinning between parallel regions, slowing every operation of the engine (measured: 20 %).
    Films the preprocessing kept whole are resized together, one interpolation per original size
    (:func:`~cxr_explain.metrics.localization.resize_maps`: the values of one call per map); a
    cropped film is first mapped back through ``Preprocessing.to_original``
    (docs/evaluation.md §1 step 1)."""
    pre: Preprocessing = ctx["pre"]
    out: list = [None] * len(items)
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for b, it in enumerate(items):
        H, W = int(it["height"]), int(it["width"])
        n = len(findings_of(gts[it["index"]]))
        if _identity_geometry(pre, H, W):
            groups.setdefault((H, W), []).extend((b, k) for k in range(n))
            out[b] = [None] * n
            continue
        try:
            out[b] = [resize_map(pre.to_original(src[b, k], H, W), (H, W), ctx["resize"]) for k in range(n)]
        except (CxrExplainError, OSError) as exc:
            out[b] = exc
    for (H, W), pairs in groups.items():
        arrays = resize_maps(torch.stack([src[b, k] for b, k in pairs]), (H, W), ctx["resize"])
        for (b, k), a in zip(pairs, arrays):
            out[b][k] = a
    return out


def _log_logits(items: list[dict], logits: torch.Tensor, ctx: dict) -> None:
    """Every output of the films not yet logged this run, into ``logits.csv`` (the AUROC step
    reads them instead of a second forward pass over the films)."""
    log, logged = ctx.get("logits"), ctx.get("logged")
    if log is None:
        return
    new = [b for b, it in enumerate(items) if it["sample"].image_id not in logged]
    if new:
        with ctx["timer"].stage("rows"):
            log.append([items[b]["sample"].image_id for b in new], logits[new].double().numpy())
        logged.update(items[b]["sample"].image_id for b in new)


def _image_rows(it: dict, method: str, b: int, maps: torch.Tensor, resized: Sequence[np.ndarray],
                logits: torch.Tensor, probs: torch.Tensor, classes: list[int], gts: list[GroundTruth], ctx: dict,
                cons: Optional[torch.Tensor] = None) -> list[dict]:
    """The result rows of one image for one method (and its saved maps): numpy only, so that it
    can run in a scoring thread. ``resized[k]``: the map of the image's k-th finding in the
    original pixel space (:func:`_original_size_maps`), normalised here (``normalize_map``: negatives
    to 0, divided by the maximum) and sorted once (:class:`MapScorer`) whatever the number of its
    regions.
    ``cons``: (B, K) conservation errors |Σ map − explained| / |explained| (propagation methods), as
    ``explain`` reports them; None leaves the column empty."""
    tm = ctx["timer"]
    s: Sample = it["sample"]
    H, W = int(it["height"]), int(it["width"])
    fs = findings_of(gts)
    map_file = ""
    if ctx["save_maps"]:
        map_file = map_file_of(method, s.image_id)
        with tm.stage("maps"):
            write_maps(ctx["out"] / map_file, {f: maps[b, k].numpy() for k, f in enumerate(fs)})
    n_boxes = sum(1 for g in gts if g.gt == "box")
    scorers: dict[int, MapScorer] = {}
    rows = []
    for g in gts:
        k = fs.index(g.finding)
        cls = classes[k]
        mask = _gt_mask(s, g, H, W)
        if k not in scorers:
            with tm.stage("metrics"):
                scorers[k] = MapScorer(normalize_map(resized[k], scaling=ctx["scaling"]), ctx["metrics"])
        with tm.stage("metrics"):
            sc = scorers[k].scores(mask, ctx["thresholds"], ctx["empty_region"])
        bx = (g.box.x, g.box.y, g.box.w, g.box.h) if g.box is not None else _bbox_of(mask)
        rows.append({
            "image_id": s.image_id, "finding": g.finding, "method": method, "gt": g.gt, "gt_index": g.gt_index,
            "logit": float(logits[b, cls]), "prob": float(probs[b, cls]), "n_boxes": n_boxes, **sc,
            "split": ctx["splits"].get(s.image_id, ""), "map_file": map_file, "image_path": str(s.path),
            "height": H, "width": W, "box_x": bx[0], "box_y": bx[1], "box_w": bx[2], "box_h": bx[3],
            "conservation_error": float(cons[b, k]) if cons is not None else None,
        })
    return rows
