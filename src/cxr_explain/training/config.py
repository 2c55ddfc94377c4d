"""``TrainConfig``: every setting of a training run, listed once.

The dataclass is the single list: its fields (type, default, ``help`` in the field's metadata)
drive the ``cxr-explain train`` options (:func:`add_train_arguments`, one ``--kebab-case``
option per field; a boolean that defaults to on gets a ``--no-...`` switch) and are read back
field by field (:func:`config_from_args`); the same dict goes into the checkpoints' provenance.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..data.labels import BOX_FINDINGS
from ..errors import CxrExplainError
from ..models.zoo import ARCHS

__all__ = ["LAYOUTS", "TrainConfig", "add_train_arguments", "config_from_args"]

#: Dataset layouts a model can be trained on (a plain folder has no split and no label table).
LAYOUTS = ("nih", "rsna")
PREPROCESSINGS = ("imagenet-rgb", "gray", "xrv")


def _opt(default: Any, help: str, **cli: Any) -> Any:
    """A field with its command-line help (and optional ``flag`` / ``choices`` / ``cli_default``)."""
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help, **cli}, **kw)


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in the checkpoints' provenance).

    ``findings`` None = the 8 NIH box findings (layout "nih") or ``["Pneumonia"]`` (layout "rsna").
    ``hflip`` is off by default: a horizontal flip swaps the patient's left and right (heart on
    the wrong side, laterality markers mirrored), which is not an image a scanner produces.
    ``affine`` = small random rotation (±``rotate`` degrees), shift (±``translate`` of the side)
    and scale (1 ± ``scale``). ``device``: "cpu", "cuda" or "auto" (cuda if available).
    """

    data: str = field(metadata={"help": "dataset folder (NIH or RSNA layout, e.g. a phantom)"})
    out: str = field(metadata={"help": "output folder: best.pt, last.pt, history.jsonl"})
    layout: str = _opt("nih", "dataset layout; default: detected from the files", choices=LAYOUTS, cli_default=None)
    arch: str = _opt("densenet121", "architecture", choices=ARCHS)
    findings: Optional[list[str]] = _opt(
        None, "|-separated outputs; default: the 8 NIH box findings (nih) or Pneumonia (rsna)")
    size: int = _opt(224, "input side in pixels")
    preprocessing: str = _opt("imagenet-rgb", "input preprocessing", choices=PREPROCESSINGS)
    epochs: int = _opt(10, "training epochs")
    batch_size: int = _opt(16, "images per batch per process (rank)")
    lr: float = _opt(1e-3, "Adam learning rate")
    betas: tuple[float, float] = _opt((0.9, 0.999), "Adam's beta1 beta2")
    weight_decay: float = _opt(0.0, "Adam weight decay")
    lr_factor: float = _opt(0.1, "learning-rate factor when the validation loss stops improving")
    lr_patience: int = _opt(1, "epochs without improvement before the learning rate drops")
    affine: bool = _opt(True, "no random affine augmentation", flag="--no-augment")
    rotate: float = _opt(5.0, "random rotation range in degrees (±)")
    translate: float = _opt(0.04, "random shift range as a fraction of the side (±)")
    scale: float = _opt(0.05, "random scale range (1 ± scale)")
    hflip: bool = _opt(False, "random horizontal flips (swap laterality: off by default)")
    workers: int = _opt(2, "DataLoader worker processes")
    device: str = _opt("auto", "cpu, cuda or auto")
    amp: bool = _opt(True, "no mixed precision on GPU")
    seed: int = _opt(0, "training seed (weights, shuffling)")
    data_seed: int = _opt(0, "seed of a random train/val split (RSNA without split.csv)")
    val_fraction: float = _opt(0.1, "validation share of a random patient split (no split file)")
    resume: bool = _opt(False, "continue from OUT/last.pt")
    max_train_images: Optional[int] = _opt(None, "only the first N training images")
    max_val_images: Optional[int] = _opt(None, "only the first N validation images")
    shortcut_note: str = _opt("", "free text stored in the checkpoint's provenance")
    command: str = field(default="", metadata={"cli": False})  # the command line, filled in by the CLI
    progress: bool = _opt(True, "no progress bars")
    threads: Optional[int] = _opt(None, "torch CPU threads per process (default: torch's)")

    def resolved_findings(self) -> list[str]:
        """The label list the model outputs, in order."""
        if self.findings:
            return [str(f) for f in self.findings]
        return list(BOX_FINDINGS) if self.layout == "nih" else ["Pneumonia"]

    def validate(self) -> None:
        """Raise :class:`CxrExplainError` naming the bad field."""
        if self.layout not in LAYOUTS:
            raise CxrExplainError(f"TrainConfig.layout {self.layout!r}: use one of {', '.join(LAYOUTS)}")
        if self.arch not in ARCHS:
            raise CxrExplainError(f"TrainConfig.arch {self.arch!r}: use one of {', '.join(ARCHS)}")
        for name in ("epochs", "batch_size", "size"):
            if int(getattr(self, name)) < 1:
                raise CxrExplainError(f"TrainConfig.{name} = {getattr(self, name)} must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise CxrExplainError(f"TrainConfig.lr = {self.lr} must be a positive number")
        if self.device not in ("cpu", "cuda", "auto") and not str(self.device).startswith("cuda:"):
            raise CxrExplainError(f"TrainConfig.device {self.device!r}: use cpu, cuda or auto")
        if self.workers < 0:
            raise CxrExplainError(f"TrainConfig.workers = {self.workers} must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON and checkpoints (tuples become lists)."""
        d = asdict(self)
        d["betas"] = list(d["betas"])
        return d


def _cli_fields() -> list[tuple[dataclasses.Field, Any]]:
    """``(field, resolved type)`` of every field that is a command-line option."""
    hints = typing.get_type_hints(TrainConfig)
    return [(f, hints[f.name]) for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)]


def _findings(text: str) -> list[str]:
    return [f.strip() for f in str(text).split("|") if f.strip()]


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One option per :class:`TrainConfig` field (read back by :func:`config_from_args`)."""
    for f, tp in _cli_fields():
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help")
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            p.add_argument(flag, dest=f.name, required=True, help=help_text)
        elif tp is bool:
            if f.default:  # on by default: the option switches it off
                flag = f.metadata.get("flag") or "--no-" + f.name.replace("_", "-")
                p.add_argument(flag, dest=f.name, action="store_false", help=help_text)
            else:
                p.add_argument(flag, dest=f.name, action="store_true", help=help_text)
        else:
            kw: dict[str, Any] = {"dest": f.name, "help": help_text,
                                  "default": f.metadata.get("cli_default", f.default)}
            args = typing.get_args(tp)
            if f.name == "findings":
                kw["type"] = _findings
            elif typing.get_origin(tp) is tuple:
                kw.update(type=args[0], nargs=len(args), metavar=tuple(f"X{k + 1}" for k in range(len(args))))
            else:
                base = next((a for a in args if a is not type(None)), tp) if args else tp
                kw["type"] = base
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            p.add_argument(flag, **kw)
    return p


def config_from_args(args: argparse.Namespace, layout: Optional[str] = None) -> TrainConfig:
    """The :class:`TrainConfig` of parsed :func:`add_train_arguments` options; ``layout`` fills an
    undetected ``--layout``; ``command`` records the command line."""
    values = {f.name: getattr(args, f.name) for f, _ in _cli_fields() if hasattr(args, f.name)}
    if values.get("layout") is None:
        values["layout"] = layout or TrainConfig.layout
    if isinstance(values.get("findings"), str):
        values["findings"] = _findings(values["findings"])
    values["findings"] = values.get("findings") or None
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    command = getattr(args, "command_line", None) or "cxr-explain " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return TrainConfig(**values, command=command)
