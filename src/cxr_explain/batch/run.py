"""``cxr-explain explain`` as a batch: check every option, load the model once, explain every
readable image, record each failure and go on, resume what an earlier run with the same settings did.

Order of work (each step only when the previous one passed):

1. :func:`check_options` — methods and their options, targets, ``--size`` (at least
   :data:`~cxr_explain.models.zoo.MIN_INPUT_SIZE`), ``--device``, ``--dtype``, ``--preprocessing``,
   ``--out`` (a folder, created), ``--checkpoint`` (a file ``torch.load`` could read), ``--boxes``.
   Nothing is loaded; a bad option is one line (exit status 2).
2. The inputs are listed (folders searched recursively) and named (:mod:`.inputs`); missing ones
   are failures of stage ``input``.
3. The model is loaded; what needs it is checked: targets against its outputs, the preprocessing's
   channels, and each method runs once on a small random input (:func:`_probe`), so that a method
   the model cannot take stops the run here rather than failing on every image.
4. The folder's record is checked (:mod:`.record`): same settings resume, other settings stop.
5. Each image: read (stage ``read``: decoding, at least :data:`~cxr_explain.data.images.MIN_IMAGE_SIZE`
   px), predict (``predictions.csv``), explain (stage ``explain``), write map and overlay (stage
   ``write``). A failure is one line on stderr and a row of ``failures.csv``; the run goes on unless
   ``stop_on_error``.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .. import api
from ..errors import CxrExplainError, failure_reason
from .inputs import InputFile, collect_inputs
from .record import (FAILURES_COLUMNS, FAILURES_FILE, MAPS_COLUMNS, MAPS_FILE, PREDICTIONS_COLUMNS,
                     PREDICTIONS_FILE, RECORD_FORMAT, CsvLog, check_record, read_record, read_rows, write_record)

STAGES = ("input", "read", "explain", "write")


@dataclass
class ExplainOptions:
    """What ``cxr-explain explain`` was asked to do (its options, by the same names)."""

    inputs: Sequence[str]
    out: str = "cxr_explain_out"
    checkpoint: Optional[str] = None
    arch: Optional[str] = None
    num_classes: Optional[int] = None
    labels: Optional[str] = None
    trust_pickle: bool = False
    methods: str = "lrp,rap,cam"
    method_options: Sequence[str] = ()
    target: str = "predicted"
    preprocessing: Optional[str] = None
    size: Optional[int] = None
    dtype: str = "float32"
    layer: Optional[str] = None
    device: str = "cpu"
    boxes: Optional[str] = None
    overwrite: bool = False
    stop_on_error: bool = False
    progress: bool = True


@dataclass
class Failure:
    """One row of ``failures.csv``."""

    file: str
    stage: str
    reason: str


@dataclass
class BatchResult:
    """What a run did: maps written, images explained / already done, failures, warnings given."""

    out: Path
    maps: int = 0
    images: int = 0
    already_done: int = 0
    failures: list[Failure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every input was explained, 1 when some failed (see ``failures.csv``)."""
        return 1 if self.failures else 0


@dataclass
class _Plan:
    methods: list
    target_parts: list[str]
    target: Any
    dtype: Any
    device: Any
    out: Path
    boxes: dict


# --------------------------------------------------------------------------- 1. options
def _parse_targets(text: str):
    """``--target``: one target, or a comma list explained together for each image."""
    from ..attribution.targets import as_target, parse_target

    parts = [t.strip() for t in str(text).split(",") if t.strip()]
    if not parts:
        raise CxrExplainError("--target is empty; give a class index, a finding name or 'predicted'")
    try:
        for p in parts:
            parse_target(p)  # each part on its own: a negative index is named here
        return parts, as_target(parts[0] if len(parts) == 1 else [parts])
    except CxrExplainError as exc:
        raise CxrExplainError(f"--target {text!r}: {exc}") from None


def check_options(opts: ExplainOptions) -> _Plan:
    """Every check that needs no model (module docstring, step 1); creates the output folder."""
    import torch

    from ..attribution.methods import get_method, parse_method_options
    from ..data.images import get_preprocessing
    from ..models.zoo import MIN_INPUT_SIZE
    from ..runtime import check_device

    names = [m for m in str(opts.methods).split(",") if m.strip()]
    if not names:
        raise CxrExplainError("--method is empty; give one or more methods (see `cxr-explain methods`)")
    options = parse_method_options(names, list(opts.method_options or []))
    methods = [get_method(name, **o) for name, o in options.items()]
    parts, target = _parse_targets(opts.target)
    if opts.size is not None and int(opts.size) < MIN_INPUT_SIZE:
        who = opts.arch or "every supported network"
        raise CxrExplainError(f"--size {opts.size}: {who} needs inputs of at least {MIN_INPUT_SIZE} px (it downsamples "
                              "by 32); leave --size out to use the checkpoint's size")
    if opts.num_classes is not None and int(opts.num_classes) < 1:
        raise CxrExplainError(f"--num-classes {opts.num_classes}: a model has at least 1 output")
    if opts.dtype not in ("float32", "float64"):
        raise CxrExplainError(f"--dtype {opts.dtype!r}: use float32 or float64")
    if opts.preprocessing is not None:
        get_preprocessing(opts.preprocessing, MIN_INPUT_SIZE)  # the name; channels are checked with the model
    device = check_device(opts.device)
    if opts.checkpoint is not None and opts.checkpoint != "default":
        from ..models.checkpoints import checkpoint_container

        checkpoint_container(opts.checkpoint)
    boxes: dict = {}
    if opts.boxes:
        from ..data.nih import read_bbox_list

        boxes = read_bbox_list(opts.boxes, image_size=None)
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise CxrExplainError(f"--out {out} is a file; give a folder for the maps (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CxrExplainError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    dtype = torch.float64 if opts.dtype == "float64" else torch.float32
    return _Plan(methods, parts, target, dtype, device, out, boxes)


# --------------------------------------------------------------------------- 3. with the model
def _resolve_targets(plan: _Plan, labels: Optional[list[str]], n: int) -> list[str]:
    """The targets as the record keeps them (names resolved, ``predicted`` as is); out-of-range
    indices and unknown names fail here, before any image."""
    import torch

    from ..attribution.targets import Predicted, as_target, parse_target

    out = []
    try:
        for part in plan.target_parts:
            t = parse_target(part)
            if isinstance(t, Predicted):
                out.append("predicted")
                continue
            sel = as_target(t).select(torch.zeros(1, n), labels)
            out.append(sel.names[0][0])
    except CxrExplainError as exc:
        raise CxrExplainError(f"--target {','.join(plan.target_parts)!r}: {exc}") from None
    return out


def _probe(model, plan: _Plan, opts: ExplainOptions, channels: int, size: int) -> None:
    """Each method once on a random input, so that what cannot run on this model fails here, once
    (:func:`~cxr_explain.attribution.probe.probe_methods`)."""
    from ..attribution.probe import probe_methods

    probe_methods(model, plan.methods, channels, size, plan.device, plan.dtype, target=plan.target, layer=opts.layer)


def _model_identity(model, opts: ExplainOptions) -> dict[str, Any]:
    """Checkpoint file and SHA-256 (or the weights' digest for random weights), architecture, labels."""
    import hashlib

    from ..models.checkpoints import file_sha256
    from ..models.xrv import model_spec

    spec = model_spec(model)
    ident: dict[str, Any] = {}
    if opts.checkpoint not in (None, "default"):
        ident = {"checkpoint": Path(opts.checkpoint).name, "sha256": file_sha256(opts.checkpoint)}
    elif opts.arch is None:
        from ..models.default import DEFAULT_ASSET, default_checkpoint_path

        ident = {"checkpoint": f"shipped default ({DEFAULT_ASSET})", "sha256": file_sha256(default_checkpoint_path())}
    else:
        h = hashlib.sha256()
        for k, t in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(t.detach().to("cpu", dtype=t.dtype).contiguous().numpy().tobytes())
        ident = {"checkpoint": None, "weights_sha256": h.hexdigest()}
    return {**ident, "arch": spec.arch, "labels": list(spec.labels)}


# --------------------------------------------------------------------------- 5. per image
def _one_line(exc: BaseException, path: Path) -> str:
    """The reason of a failure: the error's message without the file name it starts with."""
    return failure_reason(exc, path)


class _Run:
    """The per-image loop's state: the tables, what is done, what failed."""

    def __init__(self, plan: _Plan, opts: ExplainOptions, result: BatchResult):
        self.plan, self.opts, self.result = plan, opts, result
        out = plan.out
        self.maps = CsvLog(out / MAPS_FILE, MAPS_COLUMNS)
        self.predictions = CsvLog(out / PREDICTIONS_FILE, PREDICTIONS_COLUMNS)
        self.failures = CsvLog(out / FAILURES_FILE, FAILURES_COLUMNS, fresh=True)
        self.done: dict[tuple[str, str], bool] = {}
        for row in self.maps.rows():
            ok = all((out / row[c]).is_file() for c in ("map", "overlay"))
            key = (row["file"], row["method"])
            self.done[key] = self.done.get(key, True) and ok
        self.predicted = {row["file"] for row in self.predictions.rows()}
        self.stated: set[str] = set()  # CAM-family methods whose feature layer was named

    def fail(self, file: Path, stage: str, reason: str) -> None:
        f = Failure(str(file), stage, reason)
        self.result.failures.append(f)
        self.failures.append([vars(f)])
        if self.opts.stop_on_error:
            raise CxrExplainError(f"{file}: {reason}")
        print(f"cxr-explain explain: {file}: {stage} failed: {reason}", file=sys.stderr)

    def todo(self, inp: InputFile) -> list:
        return [m for m in self.plan.methods if not self.done.get((inp.key, m.name), False)]


def _probabilities(logits, multilabel: bool):
    import torch

    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=-1)


def _explain_image(run: _Run, inp: InputFile, model, pre, labels: list[str], multilabel: bool, size: int) -> None:
    import torch

    from ..attribution import explain
    from ..data.images import check_image_size, read_image

    plan, opts = run.plan, run.opts
    try:
        xray = check_image_size(read_image(inp.path))
        x, _, _ = pre(xray)
    except CxrExplainError as exc:
        run.fail(inp.path, "read", _one_line(exc, inp.path))
        return
    except Exception as exc:  # noqa: BLE001 - decoders raise anything on odd files; the batch goes on
        run.fail(inp.path, "read", _one_line(exc, inp.path))
        return
    image = api.LoadedImage(inp.path, x, xray.pixels, pre)
    x = x.unsqueeze(0).to(device=plan.device, dtype=plan.dtype)
    with torch.no_grad():
        logits = model(x)[0].detach().double().cpu()
    probs = _probabilities(logits, multilabel)
    if inp.key not in run.predicted:
        run.predictions.append({"image": inp.name, "file": inp.key, "finding": labels[i], "logit": float(logits[i]),
                                "probability": float(probs[i])} for i in range(len(labels)))
        run.predicted.add(inp.key)
    boxes = plan.boxes.get(inp.path.name, [])
    for method in run.todo(inp):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                e = explain(model, x, method, target=plan.target, layer=opts.layer)
            except CxrExplainError as exc:
                run.fail(inp.path, "explain", f"{method.name}: {_one_line(exc, inp.path)}")
                continue
        for w in caught:  # conservation and other per-image warnings, with the image and size named
            warnings.warn(f"{inp.path.name} ({size} px): {w.message}", w.category, stacklevel=2)
        if e.feature_layer and method.name not in run.stated:  # CAM family: which map was read, once
            run.stated.add(method.name)
            print(f"{method.name}: feature map of layer {e.feature_layer} ({e.feature_layout})")
        maps = e.maps[0].reshape(-1, *e.maps.shape[-2:])
        names = e.target_names[0] if isinstance(e.target_names[0], list) else [e.target_names[0]]
        classes = e.targets[0].reshape(-1).tolist()
        explained = e.explained[0].reshape(-1).tolist()
        cons = e.conservation_error[0].reshape(-1).tolist() if e.conservation_error is not None else [None] * len(names)
        rows = []
        try:
            for h, label, cls, value, err in zip(maps, names, classes, explained, cons):
                if not label:
                    continue
                finding = labels[cls] if 0 <= cls < len(labels) else None
                drawn = [b for b in boxes if finding and b.finding.casefold() == finding.casefold()]
                npy, png = api.save_explanation(
                    image, h, plan.out, method.name, label, boxes=drawn, signed=method.signed, name=inp.name,
                    logit=float(logits[cls]) if finding else None, probability=float(probs[cls]) if finding else None,
                    explained=float(value), finding=finding)
                rows.append({"image": inp.name, "file": inp.key, "method": method.name, "target": label,
                             "explained": float(value), "conservation_error": None if err is None else float(err),
                             "map": npy.relative_to(plan.out).as_posix(), "overlay": png.relative_to(plan.out).as_posix()})
        except OSError as exc:
            run.fail(inp.path, "write", f"{method.name}: {exc.strerror or exc} ({exc.filename or plan.out})")
            continue
        run.maps.append(rows)
        run.done[(inp.key, method.name)] = True
        run.result.maps += len(rows)


# --------------------------------------------------------------------------- the run
def explain_batch(opts: ExplainOptions) -> BatchResult:
    """Run ``cxr-explain explain`` (module docstring); returns what was done. Option and settings
    problems raise :class:`CxrExplainError` before any image is read."""

    from ..attribution.explain import model_labels
    from ..data.images import get_preprocessing
    from ..models.default import synthetic_model_warning
    from ..models.xrv import model_spec
    from ..models.zoo import MIN_INPUT_SIZE
    from ..progress import progress_bar

    plan = check_options(opts)
    result = BatchResult(plan.out)
    old = None if opts.overwrite else read_record(plan.out)
    known = {}
    if old is not None:
        for log, cols in ((MAPS_FILE, MAPS_COLUMNS), (PREDICTIONS_FILE, PREDICTIONS_COLUMNS)):
            known.update({r["file"]: r["image"] for r in read_rows(plan.out / log, cols)})
    inputs, problems = collect_inputs(opts.inputs, known)
    if opts.stop_on_error and problems:
        raise CxrExplainError(f"{problems[0].path}: {problems[0].reason}")

    model = api.load_model(opts.checkpoint, arch=opts.arch, num_classes=opts.num_classes,
                           labels=opts.labels.split(",") if opts.labels and "," in opts.labels else opts.labels,
                           trust_pickle=opts.trust_pickle, verbose=opts.checkpoint not in (None, "default"))
    model = model.to(device=plan.device, dtype=plan.dtype).eval()
    spec = model_spec(model)
    size = int(opts.size or spec.input_size or 224)
    if size < MIN_INPUT_SIZE:
        raise CxrExplainError(f"the checkpoint's input size {size} px is below {MIN_INPUT_SIZE}; pass --size")
    pre = get_preprocessing(opts.preprocessing or spec.preprocessing, size)
    if pre.channels != spec.in_channels:
        raise CxrExplainError(f"--preprocessing {pre.name} gives {pre.channels}-channel inputs but the model takes "
                              f"{spec.in_channels}; leave --preprocessing out to use the checkpoint's ({spec.preprocessing})")
    labels = model_labels(model) or [f"class{i}" for i in range(spec.num_classes)]
    targets = _resolve_targets(plan, labels, len(labels))
    _probe(model, plan, opts, pre.channels, size)

    note = synthetic_model_warning(model, list(opts.inputs), shipped=opts.checkpoint in (None, "default")
                                   and opts.arch is None)
    settings = {"format": RECORD_FORMAT, "model": _model_identity(model, opts), "dtype": opts.dtype, "size": size,
                "preprocessing": pre.name, "targets": targets, "layer": opts.layer,
                "methods": {m.name: m.settings() for m in plan.methods}}
    from .. import __version__

    record = check_record(plan.out, settings, overwrite=opts.overwrite)
    record.update({"cxr_explain": __version__, "warnings": [note] if note else []})
    write_record(plan.out, record)
    if note:
        warnings.warn(note, UserWarning, stacklevel=2)
        result.warnings.append(note)

    run = _Run(plan, opts, result)
    for p in problems:
        run.fail(p.path, "input", p.reason)
    bar = progress_bar(inputs, desc="explaining", unit="image", disable=not opts.progress or len(inputs) < 2)
    for inp in bar:
        if not run.todo(inp) and inp.key in run.predicted:
            result.already_done += 1  # a rerun resumes: finished images are kept, not recomputed
            continue
        n_failed = len(result.failures)
        _explain_image(run, inp, model, pre, labels, bool(spec.multilabel), size)
        result.images += len(result.failures) == n_failed
    return result


__all__ = ["BatchResult", "ExplainOptions", "Failure", "STAGES", "check_options", "explain_batch"]
