"""Load the chest X-ray checkpoints users have, strictly, and save our own format.

Formats recognised by :func:`load_checkpoint` (details in ``docs/data_formats.md`` §2):

* ``arnoweng-chexnet`` — ``{"state_dict": …}`` with ``module.densenet121.`` keys, legacy dense-layer
  names (``norm.1``), head ``classifier.0`` (Linear + Sigmoid) and no ``num_batches_tracked``.
* ``jrzech-chexnet`` — ``{"model": <pickled torchvision DenseNet>, "best_loss", "epoch", …}``; a pickle,
  so it loads only with ``trust_pickle=True``.
* ``torchxrayvision`` — xrv DenseNet weights: a pickled xrv module (``trust_pickle=True``; xrv need not
  be installed) or a plain state dict with a 1-channel ``features.conv0`` and 18 outputs; an
  ``op_threshs`` entry is dropped (its values are kept in the spec's provenance).
* ``torchvision-state-dict`` — a plain (possibly ``module.``-prefixed) state dict of a supported
  architecture; arch, class count and input channels are inferred from key names and shapes.
* ``pickled-module`` — any other pickled torchvision module (``trust_pickle=True``).
* ``cxr-explain/1`` — written by :func:`save_checkpoint`; loads with ``weights_only=True``.

Loading never uses ``strict=False``: after the key remap, every key of the model must be in the file
and vice versa, with equal shapes, or :class:`~cxr_explain.errors.CheckpointError` is raised. The one
tolerated gap is a legacy state dict that lacks *all* ``num_batches_tracked`` counters (PyTorch < 0.4.1);
they are filled with 0 and listed in the :class:`LoadReport`.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import pickletools
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, CxrExplainError
from .zoo import (
    ARCHS,
    CHEXNET_LABELS,
    XRV_LABELS,
    ModelSpec,
    build_model,
    default_labels,
    get_spec,
    resolve_labels,
)

OWN_FORMAT = "cxr-explain/1"

#: torchvision's own pattern for pre-0.4 DenseNet layer names (``norm.1`` → ``norm1``).
_LEGACY_DENSE = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
#: First-level module names of the supported torchvision architectures.
_ROOTS = {"features", "classifier", "conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc",
          "op_threshs"}
_FIRST_CONV = {"densenet": "features.conv0.weight", "resnet": "conv1.weight", "vgg": "features.0.weight"}
_HEAD = {"densenet": "classifier.weight", "resnet": "fc.weight", "vgg": "classifier.6.weight"}
_RESNETS = {(False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34",
            (True, (3, 4, 6, 3)): "resnet50"}
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` found and changed: format, key renames, fills and drops."""

    path: str
    format: str
    arch: str
    num_classes: int
    in_channels: int
    n_keys: int = 0
    remapped: dict[str, int] = field(default_factory=dict)
    filled: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Human-readable multi-line summary (for the CLI and logs)."""
        lines = [f"{self.path}: {self.format} -> {self.arch}, {self.num_classes} outputs, "
                 f"{self.in_channels} input channel(s), {self.n_keys} tensors loaded strictly"]
        lines += [f"  renamed {n} key(s): {rule}" for rule, n in self.remapped.items()]
        if self.filled:
            lines.append(f"  filled {len(self.filled)} missing key(s) with 0: "
                         f"{_preview(self.filled, 2)} (legacy state dict without num_batches_tracked)")
        if self.dropped:
            lines.append(f"  dropped {len(self.dropped)} key(s): {_preview(self.dropped, 5)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _preview(keys: list[str], n: int = 5) -> str:
    """``a, b, c, … (+N more)`` for error messages that must stay on one line."""
    head = ", ".join(keys[:n])
    return head + (f", … (+{len(keys) - n} more)" if len(keys) > n else "")


def _one_line(text: str, limit: int = 200) -> str:
    first = " ".join(str(text).split())
    return first if len(first) <= limit else first[: limit - 1] + "…"


# ----------------------------------------------------------------------------- reading the file
def _stub_pickle_module(stubbed: list[str]) -> types.ModuleType:
    """A ``pickle``-like module whose Unpickler replaces classes of uninstalled packages by stubs.

    A stub is an empty ``nn.Module`` subclass, enough to restore a pickled module tree and call
    ``state_dict()`` on it (e.g. a torchxrayvision DenseNet without torchxrayvision installed).
    """
    cache: dict[tuple[str, str], type] = {}

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
            try:
                return super().find_class(module, name)
            except ModuleNotFoundError:
                key = (module, name)
                if key not in cache:
                    cache[key] = type(name, (nn.Module,), {"__module__": module, "_cxr_stub": True})
                    stubbed.append(f"{module}.{name}")
                return cache[key]

    mod = types.ModuleType("cxr_explain_stub_pickle")
    mod.__dict__.update({k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
    mod.Unpickler = _Unpickler  # type: ignore[attr-defined]

    def load(file: Any, **kw: Any) -> Any:
        return _Unpickler(file, **kw).load()

    mod.load = load  # type: ignore[attr-defined]
    return mod


def checkpoint_container(path: str | os.PathLike[str]) -> str:
    """What kind of file ``torch.load`` would read: ``"zip"`` (``torch.save`` since 1.6), ``"pickle"``
    (the legacy format: a pickle stream), ``"tar"`` (the oldest format); raise
    :class:`CheckpointError` "not a PyTorch checkpoint" for anything else (text, images, random bytes).

    Only the first bytes are read: a zip starts with ``PK\\x03\\x04``, a pickle with the PROTO
    opcode ``\\x80`` and a protocol number 2..5, a tar has ``ustar`` at byte 257."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}; check the path")
    if p.is_dir():
        raise CheckpointError(f"checkpoint path {p} is a directory; give the weights file inside it")
    try:
        with open(p, "rb") as fh:
            head = fh.read(262)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {p} ({_one_line(exc, 80)}); check its permissions") from None
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head[257:262] == b"ustar":
        return "tar"
    what = "an empty file" if not head else f"first bytes {head[:8]!r}"
    raise CheckpointError(f"not a PyTorch checkpoint: {p} ({what}; torch.save writes a zip archive or, "
                          "before PyTorch 1.6, a pickle); check the path")


def _pickle_globals(path: Path, container: str) -> list[str] | None:
    """The classes and functions a checkpoint's pickle refers to (``module.name``), or None when the
    pickle cannot be parsed (a damaged file). Read with :mod:`pickletools`, which executes nothing."""
    if container == "zip":
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - a damaged archive: no name list
            return None
    if container != "pickle":
        return None
    names: list[str] = []
    try:
        with open(path, "rb") as fh:
            for _ in range(4):  # legacy layout: magic number, protocol, sys info, then the object
                strings: list[str] = []
                for op, arg, _pos in pickletools.genops(fh):
                    if op.name in ("GLOBAL", "INST"):
                        names.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
    except Exception:  # noqa: BLE001 - ValueError / EOFError / struct errors: not a well-formed pickle
        return None
    return names


def _commonness(name: str) -> int:
    """0 for a class of some package (the reason a pickle needs trust), 1 for torch classes, 2 for the
    plumbing every checkpoint pickle refers to (storages, tensor rebuilders, builtins)."""
    plumbing = ("__builtin__.", "builtins.", "collections.", "_codecs.", "copyreg.", "torch._utils.")
    if name.startswith(plumbing) or name.endswith("Storage") or name in ("torch.Size", "torch.device"):
        return 2
    return 1 if name.startswith("torch.") else 0


def _read(path: Path, trust_pickle: bool, notes: list[str]) -> Any:
    """``torch.load`` with ``weights_only=True``; a full unpickle only when ``trust_pickle``.

    The ``trust_pickle`` hint is given only for a well-formed pickle that refers to classes a
    weights-only load refuses; a damaged or foreign file is "not a PyTorch checkpoint"."""
    container = checkpoint_container(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise CheckpointError(
                f"not a PyTorch checkpoint: {path} ({_one_line(exc, 80)}); check the path") from None
        names = _pickle_globals(path, container)
        if not names:
            raise CheckpointError(
                f"not a PyTorch checkpoint: {path} (a {container} file torch.load cannot read: it is "
                "truncated or damaged); check the path or copy the file again") from None
        if not trust_pickle:
            names = sorted(set(names), key=lambda n: (_commonness(n), n))  # the unusual ones first
            raise CheckpointError(
                f"{path} holds pickled Python objects ({_preview(names, 3)}), and unpickling can run "
                "arbitrary code; if you trust its source, pass trust_pickle=True (CLI: --trust-pickle)") from None
    except Exception as exc:  # noqa: BLE001 - EOFError, KeyError, RuntimeError … all mean "not a checkpoint"
        raise CheckpointError(
            f"not a PyTorch checkpoint: {path} (torch.load: {type(exc).__name__}: {_one_line(exc, 80)}); "
            "check the path or copy the file again") from None
    stubbed: list[str] = []
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False,
                         pickle_module=_stub_pickle_module(stubbed))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"{path} could not be unpickled ({type(exc).__name__}: {_one_line(exc, 100)}); "
            "re-save it as a state dict with torch.save(model.state_dict(), path)") from None
    notes.append("loaded with a full unpickle (trust_pickle=True)")
    if stubbed:
        notes.append(f"classes of uninstalled packages replaced by stubs: {_preview(stubbed, 3)}")
    return obj


def _is_densenet_like(model: nn.Module) -> bool:
    return hasattr(model, "features") and isinstance(getattr(model, "classifier", None), nn.Module)


def _unwrap(obj: Any, path: Path, info: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The state dict inside ``obj`` and a format hint (None = decide from the keys)."""
    if isinstance(obj, nn.Module):
        cls = type(obj)
        info["class"] = f"{cls.__module__}.{cls.__qualname__}"
        if getattr(obj, "pathologies", None) is not None:
            info["pathologies"] = [str(x) for x in obj.pathologies]
        hint = "torchxrayvision" if cls.__module__.startswith("torchxrayvision") else "pickled-module"
        return dict(obj.state_dict()), hint
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict or model; save "
            "model.state_dict() with torch.save")
    if obj.get("format") == OWN_FORMAT:
        info["own"] = obj
        sd = obj.get("state_dict")
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"{path} is a damaged {OWN_FORMAT} file (no state_dict); re-save it")
        return dict(sd), OWN_FORMAT
    container: dict[str, Any] = {"keys": sorted(str(k) for k in obj.keys())}
    container.update({k: obj[k] for k in ("epoch", "arch", "best_auc", "best_loss")
                      if isinstance(obj.get(k), (int, float, str)) and not isinstance(obj.get(k), bool)})
    info["container"] = container
    inner = obj.get("model")
    if isinstance(inner, nn.Module):
        sd, hint = _unwrap(inner, path, info)
        seq_head = isinstance(getattr(inner, "classifier", None), nn.Sequential)
        if hint == "pickled-module" and _is_densenet_like(inner) and seq_head:
            hint = "jrzech-chexnet"
        return sd, hint
    if obj and all(isinstance(v, torch.Tensor) or v is None for v in obj.values()):
        return {str(k): v for k, v in obj.items() if v is not None}, None
    for key in _STATE_DICT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()):
            return {str(k): v for k, v in inner.items()}, None
    raise CheckpointError(
        f"{path} holds a dict with keys {_preview([str(k) for k in obj.keys()], 5)} but no state dict "
        f"(looked for a dict of tensors or one under {', '.join(_STATE_DICT_KEYS)}); "
        "save model.state_dict() with torch.save")


# ----------------------------------------------------------------------------- key normalisation
def _rename(sd: dict[str, Any], fn: Any, rule: str, report: LoadReport) -> dict[str, Any]:
    """Apply ``fn(key) -> new key`` to every key; count the renamed ones under ``rule``."""
    out: dict[str, Any] = {}
    n = 0
    for k, v in sd.items():
        nk = fn(k)
        n += nk != k
        if nk in out:
            raise CheckpointError(f"{report.path}: key remap '{rule}' maps two keys to {nk}; "
                                  "the file mixes naming schemes, re-save it from one model")
        out[nk] = v
    if n:
        report.remapped[rule] = report.remapped.get(rule, 0) + n
    return out


def _wrapper_prefix(keys: Any) -> str:
    """The dotted prefix every key shares (``module.``, ``module.densenet121.``) before a torchvision
    root (``features``, ``layer1``, …); '' if there is none or stripping would not reach such roots."""
    prefix, cur = "", list(keys)
    while cur and all("." in k for k in cur):
        firsts = {k.split(".", 1)[0] for k in cur}
        if len(firsts) != 1 or next(iter(firsts)) in _ROOTS:
            break
        first = firsts.pop()
        prefix += first + "."
        cur = [k[len(first) + 1:] for k in cur]
    return prefix if prefix and {k.split(".", 1)[0] for k in cur} <= _ROOTS else ""


def _normalise_keys(sd: dict[str, Any], report: LoadReport, info: dict[str, Any]) -> dict[str, Any]:
    """Strip wrapper prefixes, rename legacy DenseNet names and Sequential heads, drop op_threshs."""
    if "op_threshs" in sd:
        thr = sd.pop("op_threshs")
        report.dropped.append("op_threshs")
        info["op_threshs"] = [float(x) for x in torch.as_tensor(thr).flatten().tolist()]
        report.notes.append("op_threshs dropped: the model outputs raw logits (no xrv op_norm)")
    prefix = _wrapper_prefix(sd)
    if prefix:
        sd = _rename(sd, lambda k: k[len(prefix):], f"strip prefix '{prefix}'", report)
    sd = _rename(sd, lambda k: _LEGACY_DENSE.sub(r"\1\2", k),
                 "legacy DenseNet layer names (norm.1 -> norm1, conv.2 -> conv2)", report)
    dense = any(k.startswith("features.denseblock") for k in sd)
    if dense and "classifier.0.weight" in sd and not any(
            re.match(r"classifier\.[1-9]", k) for k in sd):
        sd = _rename(sd, lambda k: re.sub(r"^classifier\.0\.", "classifier.", k),
                     "Sequential head classifier.0 -> classifier", report)
        report.notes.append("the file's head was a Sequential (CheXNet: Linear + Sigmoid); the model "
                            "outputs logits, apply a sigmoid for probabilities")
    if "layer1.0.conv1.weight" in sd and "fc.0.weight" in sd and not any(
            re.match(r"fc\.[1-9]", k) for k in sd):
        sd = _rename(sd, lambda k: re.sub(r"^fc\.0\.", "fc.", k), "Sequential head fc.0 -> fc", report)
    return sd


def _family(arch: str) -> str:
    return "densenet" if arch.startswith("densenet") else "resnet" if arch.startswith("resnet") else "vgg"


def infer_architecture(sd: Mapping[str, Any]) -> tuple[str, int | None, int | None] | None:
    """(arch, num_classes, in_channels) from torchvision key names and shapes, or None if unknown.

    densenet121: ``features.denseblock1…4`` with (6, 12, 24, 16) layers; resnet18/34/50: ``layerN.M``
    block counts and ``conv3`` (bottleneck) presence; vgg16(_bn): 13 convs under ``features.`` with
    ``classifier.6``, ``_bn`` when ``features.1`` has running stats.
    """
    keys = list(sd)
    arch: str | None = None
    if any(k.startswith("features.denseblock") for k in keys):
        counts = tuple(len({m.group(1) for k in keys if (m := re.match(
            rf"features\.denseblock{b}\.denselayer(\d+)\.", k))}) for b in (1, 2, 3, 4))
        arch = "densenet121" if counts == (6, 12, 24, 16) else f"densenet(blocks={counts})"
    elif "layer1.0.conv1.weight" in sd:
        counts = tuple(len({m.group(1) for k in keys if (m := re.match(rf"layer{i}\.(\d+)\.", k))})
                       for i in (1, 2, 3, 4))
        bottleneck = "layer1.0.conv3.weight" in sd
        arch = _RESNETS.get((bottleneck, counts),
                            f"resnet({'bottleneck' if bottleneck else 'basic'} blocks={counts})")
    elif "features.0.weight" in sd and "classifier.6.weight" in sd:
        convs = [k for k in keys if re.match(r"features\.\d+\.weight$", k)
                 and getattr(sd[k], "ndim", 0) == 4]
        bn = "features.1.running_mean" in sd
        arch = ("vgg16_bn" if bn else "vgg16") if len(convs) == 13 else f"vgg({len(convs)} convs)"
    if arch is None:
        return None
    fam = _family(arch)
    head, conv = sd.get(_HEAD[fam]), sd.get(_FIRST_CONV[fam])
    n_cls = int(head.shape[0]) if isinstance(head, torch.Tensor) and head.ndim == 2 else None
    in_ch = int(conv.shape[1]) if isinstance(conv, torch.Tensor) and conv.ndim == 4 else None
    return arch, n_cls, in_ch


# ----------------------------------------------------------------------------- strict loading
def _strict_load(model: nn.Module, sd: dict[str, Any], report: LoadReport, hint: str) -> None:
    """``load_state_dict(strict=True)`` after checking keys and shapes ourselves (one-line errors)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    counters = [k for k in expected if k.endswith(".num_batches_tracked")]
    if counters and set(counters) <= set(missing) and not any(k.endswith(".num_batches_tracked") for k in sd):
        for k in counters:
            sd[k] = torch.zeros_like(expected[k])
        report.filled = counters
        missing = [k for k in missing if k not in set(counters)]
    bad_shape = [f"{k} file {list(sd[k].shape)} vs model {list(expected[k].shape)}"
                 for k in expected if k in sd and isinstance(sd[k], torch.Tensor)
                 and sd[k].shape != expected[k].shape]
    not_tensor = [k for k in sd if not isinstance(sd[k], torch.Tensor)]
    if missing or unexpected or bad_shape or not_tensor:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) [{_preview(missing)}]")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) [{_preview(unexpected)}]")
        if bad_shape:
            parts.append(f"{len(bad_shape)} shape mismatch(es) [{_preview(bad_shape, 3)}]")
        if not_tensor:
            parts.append(f"{len(not_tensor)} non-tensor value(s) [{_preview(not_tensor)}]")
        raise CheckpointError(
            f"{report.path} does not fit {report.arch} (num_classes={report.num_classes}, "
            f"in_channels={report.in_channels}) after key remapping: {'; '.join(parts)}; {hint}")
    if any(t.dtype == torch.float16 for t in sd.values() if isinstance(t, torch.Tensor)):
        report.notes.append("weights stored as float16, loaded into float32")
    model.load_state_dict(sd, strict=True)
    report.n_keys = len(sd)


def weights_sha256(model: nn.Module) -> str:
    """The SHA-256 of a model's state (each key, then its tensor's bytes, in ``state_dict`` order):
    the same weights in the same dtype give the same digest, wherever they were loaded from."""
    h = hashlib.sha256()
    for k, t in model.state_dict().items():
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes as 64 hex digits (``hashlib.file_digest``, read in chunks)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_checkpoint(
    path: str | os.PathLike[str],
    arch: str | None = None,
    num_classes: int | None = None,
    *,
    labels: str | list[str] | None = None,
    trust_pickle: bool = False,
) -> tuple[nn.Module, ModelSpec, LoadReport]:
    """Detect the checkpoint format, remap keys, build the model and load it strictly (eval mode).

    ``arch`` / ``num_classes`` default to what the keys and shapes say; ``labels`` default to the
    names stored in the file (own format, xrv ``pathologies``), else the format's label set, else a
    guess from the class count (noted in the report). Pickled files (jrzech, xrv objects) need
    ``trust_pickle=True``. Returns ``(model, spec, report)``; ``model.cxr_spec is spec``.
    """
    p = Path(path)
    notes: list[str] = []
    obj = _read(p, trust_pickle, notes)
    info: dict[str, Any] = {}
    sd, hint = _unwrap(obj, p, info)
    del obj
    if hint == OWN_FORMAT:
        return _load_own(p, sd, info["own"], arch, num_classes, labels, notes)

    report = LoadReport(path=str(p), format=hint or "torchvision-state-dict", arch=arch or "?",
                        num_classes=num_classes or 0, in_channels=3, notes=notes)
    raw_keys = list(sd)
    sd = _normalise_keys(sd, report, info)
    inferred = infer_architecture(sd)
    if inferred is not None and inferred[0] not in ARCHS and arch is None:
        raise CheckpointError(
            f"{p} looks like a {inferred[0]} checkpoint, which cxr-explain does not build; "
            f"supported: {', '.join(ARCHS)}")
    if inferred is None and arch is None:
        raise CheckpointError(
            f"cannot tell the architecture of {p} from its keys [{_preview(raw_keys)}]; "
            f"pass arch= (one of {', '.join(ARCHS)})")
    use_arch = arch or inferred[0]  # type: ignore[index]
    if use_arch not in ARCHS:
        build_model(use_arch)  # raises the zoo's one-line "unknown architecture" error
    fam = _family(use_arch)
    conv = sd.get(_FIRST_CONV[fam])
    in_ch = int(conv.shape[1]) if isinstance(conv, torch.Tensor) and conv.ndim == 4 else \
        (inferred[2] if inferred and inferred[2] else 3)
    in_ch = in_ch if in_ch in (1, 3) else 3  # anything else fails below as a shape mismatch
    head = sd.get(_HEAD[fam])
    n_file = int(head.shape[0]) if isinstance(head, torch.Tensor) and head.ndim == 2 else \
        (inferred[1] if inferred else None)
    n_cls = num_classes or n_file
    if n_cls is None:
        raise CheckpointError(f"{p} has no {_HEAD[fam]} to size the head from; pass num_classes=")

    # the format, from the hint or the key signature
    fmt = hint
    if fmt is None:
        if fam == "densenet" and _wrapper_prefix(raw_keys) == "module.densenet121.":
            fmt = "arnoweng-chexnet"
        elif "op_threshs" in info or (fam == "densenet" and in_ch == 1 and n_file == 18):
            fmt = "torchxrayvision"
        else:
            fmt = "torchvision-state-dict"
    if fmt == "pickled-module" and fam == "densenet" and in_ch == 1 and n_file == 18:
        fmt = "torchxrayvision"
    report.format, report.arch, report.num_classes, report.in_channels = fmt, use_arch, n_cls, in_ch

    # label names: explicit > stored in the file > the format's set > guess from the count
    if labels is None:
        stored = info.get("pathologies")
        if stored is not None and len(stored) == n_cls:
            labels, why = stored, None
        elif fmt in ("arnoweng-chexnet", "jrzech-chexnet") and n_cls == len(CHEXNET_LABELS):
            labels, why = list(CHEXNET_LABELS), None
        elif fmt == "torchxrayvision" and n_cls == len(XRV_LABELS):
            labels, why = list(XRV_LABELS), ("labels assumed to be the xrv 18 in xrv order; -nih / -rsna "
                                             "weights train only some of them: pass labels= to be sure")
        else:
            labels = default_labels(n_cls)
            why = f"labels guessed from the class count ({n_cls}): {_preview(labels, 3)}; pass labels="
        if why:
            report.notes.append(why)
    xrv = fmt == "torchxrayvision" and in_ch == 1
    preprocessing = "xrv" if xrv else ("gray" if in_ch == 1 else "imagenet-rgb")
    input_size = 512 if xrv and fam == "resnet" else 224  # xrv resnet50-res512-all
    provenance: dict[str, Any] = {"file": str(p.resolve()), "sha256": file_sha256(p), "format": fmt}
    if fmt in ("arnoweng-chexnet", "jrzech-chexnet"):
        provenance["original_output"] = "sigmoid (removed: the model outputs logits)"
    provenance.update({k: v for k, v in info.items() if k != "pathologies"})
    model = build_model(use_arch, n_cls, labels, in_ch, preprocessing=preprocessing,
                        input_size=input_size, provenance=provenance)
    why = f"the keys look like {inferred[0]} with {inferred[1]} outputs" if inferred else \
        "the keys match no supported architecture"
    _strict_load(model, sd, report,
                 f"{why}; pass the arch / num_classes the checkpoint was trained with")
    model.eval()
    return model, model.cxr_spec, report


# ----------------------------------------------------------------------------- our own format
def _load_own(p: Path, sd: dict[str, Any], raw: Mapping[str, Any], arch: str | None,
              num_classes: int | None, labels: Any, notes: list[str]) -> tuple[nn.Module, ModelSpec, LoadReport]:
    try:
        spec = ModelSpec.from_dict(raw)
    except (TypeError, KeyError, CxrExplainError) as exc:
        raise CheckpointError(f"{p} is a damaged {OWN_FORMAT} file ({_one_line(exc, 80)}); re-save it") from None
    if arch is not None and arch != spec.arch:
        raise CheckpointError(f"{p} holds a {spec.arch} model but arch={arch!r} was requested; "
                              "drop arch= or pass the right file")
    if num_classes is not None and num_classes != spec.num_classes:
        raise CheckpointError(f"{p} has {spec.num_classes} outputs ({_preview(spec.labels, 3)}) but "
                              f"num_classes={num_classes} was requested")
    if labels is not None:
        spec.labels = resolve_labels(labels, spec.num_classes)
    report = LoadReport(path=str(p), format=OWN_FORMAT, arch=spec.arch, num_classes=spec.num_classes,
                        in_channels=spec.in_channels, notes=notes)
    model = build_model(spec.arch, labels=spec.labels, in_channels=spec.in_channels,
                        preprocessing=spec.preprocessing, input_size=spec.input_size,
                        multilabel=spec.multilabel, provenance=spec.provenance)
    _strict_load(model, dict(sd), report, f"the {OWN_FORMAT} file does not match its own header; re-save it")
    model.eval()
    return model, model.cxr_spec, report


def _check_plain(value: Any, where: str) -> None:
    """Raise unless ``value`` is made of tensors, str, numbers, bool, None, lists and str-keyed dicts."""
    if isinstance(value, (torch.Tensor, str, int, float, bool)) or value is None:
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CxrExplainError(f"checkpoint field {where} has a non-string key {k!r}; use str keys")
            _check_plain(v, f"{where}.{k}")
        return
    raise CxrExplainError(f"checkpoint field {where} is a {type(value).__name__}, which a weights_only "
                          "load refuses; store plain str / number / list / dict / tensor values")


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    spec: ModelSpec | None = None,
    extra: dict[str, Any] | None = None,
    *,
    half: bool = False,
) -> Path:
    """Write ``model`` in the ``cxr-explain/1`` format (loadable with ``weights_only=True``).

    Fields: format, arch, labels, preprocessing, input_size, multilabel, provenance, state_dict,
    dtype, extra. ``half=True`` stores floating tensors as float16 (half the size); they load back
    into float32 as exactly the stored fp16 values. The file is written atomically.
    """
    spec = spec if spec is not None else get_spec(model)
    sd: dict[str, torch.Tensor] = {}
    for k, t in model.state_dict().items():
        t = t.detach().cpu()
        if half and t.is_floating_point():
            h = t.half()
            if bool(torch.isfinite(t).all()) and not bool(torch.isfinite(h).all()):
                raise CxrExplainError(f"{k} has values beyond float16's range (max |x| = "
                                      f"{float(t.abs().max()):.3g}); save with half=False")
            t = h
        sd[k] = t.clone()
    payload: dict[str, Any] = {"format": OWN_FORMAT, **spec.to_dict(), "state_dict": sd,
                               "dtype": "float16" if half else "float32", "extra": dict(extra or {})}
    _check_plain({k: v for k, v in payload.items() if k != "state_dict"}, "checkpoint")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    buf = io.BytesIO()
    torch.save(payload, buf)
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, p)
    return p
