"""Architectures (torchvision, random weights) with the label set and preprocessing they expect.

Every model built or loaded by cxr-explain outputs **logits** (no sigmoid / softmax inside) and
carries a :class:`ModelSpec` as the plain attribute ``model.cxr_spec``, so downstream code
(``explain``, ``evaluate``) can look up label names with :func:`label_index` instead of trusting
positions. Nothing here downloads weights: torchvision constructors are always called with
``weights=None``.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from torch import nn
from torchvision import models as tvm

from ..data.labels import BOX_FINDINGS, CHEXNET_FINDINGS, XRV_PATHOLOGIES
from ..data import labels as label_names
from ..errors import CxrExplainError

#: CheXNet / arnoweng / jrzech output order (NIH ChestX-ray14, 14 findings).
CHEXNET_LABELS: list[str] = list(CHEXNET_FINDINGS)
#: torchxrayvision output order (18); index by name, some checkpoints leave entries ''.
XRV_LABELS: list[str] = list(XRV_PATHOLOGIES)
#: Synthetic benchmark: the 8 NIH box findings in CheXNet order; "No Finding" = all zero.
BENCHMARK_LABELS: list[str] = list(BOX_FINDINGS)
#: Binary pneumonia model (RSNA): ONE logit, sigmoid / BCE, positive class "Pneumonia". A single
#: logit is chosen so the explained output is the same kind of quantity as in the multi-label case.
PNEUMONIA_LABELS: list[str] = ["Pneumonia"]

#: Two-logit (softmax) Normal-vs-Pneumonia head, accepted when a checkpoint has two outputs.
PNEUMONIA_SOFTMAX_LABELS: list[str] = ["Normal", "Pneumonia"]

#: Named label sets accepted wherever ``labels`` may be a string.
LABEL_SETS: dict[str, list[str]] = {
    "chexnet": list(CHEXNET_LABELS),
    "nih14": list(CHEXNET_LABELS),
    "xrv": list(XRV_LABELS),
    "pneumonia": list(PNEUMONIA_LABELS),
    "pneumonia-softmax": list(PNEUMONIA_SOFTMAX_LABELS),
    "benchmark": list(BENCHMARK_LABELS),
}

#: Names of the input preprocessing pipelines (implemented in ``data/images.py``).
#: imagenet-rgb: 3 channels, x/255 then ImageNet mean/std; xrv: 1 channel, (2x/255-1)*1024;
#: gray: 1 channel, x/255.
PREPROCESSING = ("imagenet-rgb", "xrv", "gray")

ARCHS = ("densenet121", "resnet18", "resnet34", "resnet50", "vgg16", "vgg16_bn")

#: The smallest model input side (px) every architecture in ARCHS takes: each downsamples by 32
#: (DenseNet-121: stem conv, max-pool and three transitions; ResNets: five stride-2 stages; VGG-16:
#: five max-pools), so its last feature map is 1×1 at 32 px and empty or undefined below.
MIN_INPUT_SIZE = 32

#: Label spellings that differ between files of the same dataset (BBox_List says "Infiltrate").
@dataclass
class ModelSpec:
    """What a model expects and predicts: architecture, output names, input pipeline, origin."""

    arch: str
    labels: list[str]
    preprocessing: str = "imagenet-rgb"
    input_size: int = 224
    multilabel: bool = True
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = [str(x) for x in self.labels]
        if self.preprocessing not in PREPROCESSING:
            raise CxrExplainError(
                f"unknown preprocessing {self.preprocessing!r}; use one of {', '.join(PREPROCESSING)}"
            )

    @property
    def num_classes(self) -> int:
        """Number of logits the model outputs (= len(labels))."""
        return len(self.labels)

    @property
    def in_channels(self) -> int:
        """Image channels the preprocessing produces: 3 for imagenet-rgb, else 1."""
        return 3 if self.preprocessing == "imagenet-rgb" else 1

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (strings, numbers, lists, dicts) for JSON or a weights_only checkpoint."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        keys = ("arch", "labels", "preprocessing", "input_size", "multilabel", "provenance")
        return cls(**{k: d[k] for k in keys if k in d})


def resolve_labels(labels: str | Sequence[str] | None, num_classes: int | None) -> list[str]:
    """Label list from a label-set name, an explicit list, or (if neither) the class count.

    Without labels: 14 → CheXNet, 18 → xrv, 8 → benchmark, 1 → pneumonia, 2 → Normal/Pneumonia,
    anything else → ``class_0 … class_{C-1}``; neither given → CheXNet 14.
    """
    if isinstance(labels, str):
        key = labels.lower()
        if key not in LABEL_SETS:
            raise CxrExplainError(
                f"unknown label set {labels!r}; use one of {', '.join(LABEL_SETS)} or pass a list of names"
            )
        out = list(LABEL_SETS[key])
    elif labels is not None:
        out = [str(x) for x in labels]
    elif num_classes is None:
        out = list(CHEXNET_LABELS)
    else:
        out = default_labels(num_classes)
    if num_classes is not None and num_classes != len(out):
        raise CxrExplainError(
            f"num_classes={num_classes} but {len(out)} labels were given; make them agree"
        )
    if not out:
        raise CxrExplainError("a model needs at least one label (num_classes >= 1)")
    return out


def default_labels(num_classes: int) -> list[str]:
    """Best guess of the label names for a head with ``num_classes`` outputs (see resolve_labels)."""
    by_count = {14: CHEXNET_LABELS, 18: XRV_LABELS, 8: BENCHMARK_LABELS,
                1: PNEUMONIA_LABELS, 2: PNEUMONIA_SOFTMAX_LABELS}
    if num_classes in by_count:
        return list(by_count[num_classes])
    return [f"class_{i}" for i in range(num_classes)]


def _first_conv(in_channels: int, like: nn.Conv2d) -> nn.Conv2d:
    """A copy of ``like``'s geometry with ``in_channels`` inputs (fresh random weights)."""
    return nn.Conv2d(in_channels, like.out_channels, like.kernel_size, like.stride,
                     like.padding, bias=like.bias is not None)


def build_model(
    arch: str,
    num_classes: int | None = None,
    labels: str | Sequence[str] | None = None,
    in_channels: int = 3,
    *,
    preprocessing: str | None = None,
    input_size: int = 224,
    multilabel: bool | None = None,
    provenance: dict[str, Any] | None = None,
) -> nn.Module:
    """A torchvision ``arch`` with random weights whose head outputs ``len(labels)`` logits.

    The head is ``classifier`` (DenseNet, Linear(1024, C)), ``fc`` (ResNet) or ``classifier[6]``
    (VGG). ``in_channels=1`` replaces the first conv by a 1-channel one (torchxrayvision style).
    ``preprocessing`` defaults to "imagenet-rgb" for 3 channels and "gray" for 1; ``multilabel``
    defaults to True except for the two-logit Normal/Pneumonia head (softmax). The result carries
    ``model.cxr_spec`` (a :class:`ModelSpec`).
    """
    if arch not in ARCHS:
        close = difflib.get_close_matches(str(arch), ARCHS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CxrExplainError(f"unknown architecture {arch!r}{hint}; supported: {', '.join(ARCHS)}")
    if in_channels not in (1, 3):
        raise CxrExplainError(f"in_channels must be 1 or 3, got {in_channels}")
    names = resolve_labels(labels, num_classes)
    c = len(names)
    if preprocessing is None:
        preprocessing = "imagenet-rgb" if in_channels == 3 else "gray"
    spec = ModelSpec(
        arch=arch, labels=names, preprocessing=preprocessing, input_size=int(input_size),
        multilabel=(names != PNEUMONIA_SOFTMAX_LABELS) if multilabel is None else bool(multilabel),
        provenance=dict(provenance) if provenance is not None else {"weights": "random"},
    )
    if spec.in_channels != in_channels:
        raise CxrExplainError(
            f"preprocessing {preprocessing!r} gives {spec.in_channels}-channel images but "
            f"in_channels={in_channels}; make them agree"
        )

    model: nn.Module = getattr(tvm, arch)(weights=None)
    if arch.startswith("densenet"):
        model.classifier = nn.Linear(model.classifier.in_features, c)
        if in_channels != 3:
            model.features.conv0 = _first_conv(in_channels, model.features.conv0)
    elif arch.startswith("resnet"):
        model.fc = nn.Linear(model.fc.in_features, c)
        if in_channels != 3:
            model.conv1 = _first_conv(in_channels, model.conv1)
    else:  # vgg16 / vgg16_bn
        model.classifier[6] = nn.Linear(model.classifier[6].in_features, c)
        if in_channels != 3:
            model.features[0] = _first_conv(in_channels, model.features[0])
    model.cxr_spec = spec
    return model


def get_spec(model_or_spec: nn.Module | ModelSpec) -> ModelSpec:
    """The :class:`ModelSpec` of a model built or loaded by cxr-explain (or the spec itself)."""
    if isinstance(model_or_spec, ModelSpec):
        return model_or_spec
    spec = getattr(model_or_spec, "cxr_spec", None)
    if not isinstance(spec, ModelSpec):
        raise CxrExplainError(
            f"{type(model_or_spec).__name__} has no label names (no .cxr_spec); build it with "
            "cxr_explain.models.build_model / load_checkpoint, or set model.cxr_spec = ModelSpec(...)"
        )
    return spec


def label_index(model_or_spec: nn.Module | ModelSpec, name: str) -> int:
    """Output index of finding ``name`` (:func:`cxr_explain.data.labels.label_index`)."""
    return label_names.label_index(name, get_spec(model_or_spec).labels)