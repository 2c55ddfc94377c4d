"""torchxrayvision's classifiers as they are: a traceable view that outputs their logits.

``xrv.models.DenseNet`` and ``xrv.models.ResNet`` resize and range-check the input in their forward
(data-dependent checks that torch.fx cannot trace) and, with pretrained weights, map the logits
through ``sigmoid`` and ``op_norm`` (a per-finding calibration to the operating points). The views
here share the xrv model's own layers and compute the same logits without those steps:

* DenseNet: ``classifier(flatten(adaptive_avg_pool(relu(features(x)))))`` — ``features2`` + classifier;
* ResNet: its torchvision ``model`` (``conv1`` … ``layer4`` → ``avgpool`` → ``fc``).

Module paths stay xrv's (``features.denseblock4``, ``model.layer4``), so ``layer=`` names read the
same on the view and on the xrv model. torchxrayvision itself is never imported here.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CxrExplainError
from .zoo import ModelSpec

Tensor = torch.Tensor


def is_xrv_model(model: object) -> bool:
    """A torchxrayvision DenseNet or ResNet classifier object."""
    cls = type(model)
    return (isinstance(model, nn.Module) and cls.__module__.split(".")[0] == "torchxrayvision"
            and cls.__name__ in ("DenseNet", "ResNet"))


class XrvDenseNetLogits(nn.Module):
    """xrv DenseNet up to its logits: ``classifier(flatten(GAP(relu(features(x)))))``."""

    def __init__(self, xrv_model: nn.Module):
        super().__init__()
        self.features = xrv_model.features
        self.classifier = xrv_model.classifier

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.features(x))
        out = F.adaptive_avg_pool2d(out, (1, 1))
        return self.classifier(torch.flatten(out, 1))

    def shares(self, xrv_model: nn.Module) -> bool:
        return self.features is xrv_model.features and self.classifier is xrv_model.classifier


class XrvResNetLogits(nn.Module):
    """xrv ResNet up to its logits: its torchvision ``model`` (kept under the same name)."""

    def __init__(self, xrv_model: nn.Module):
        super().__init__()
        self.model = xrv_model.model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def shares(self, xrv_model: nn.Module) -> bool:
        return self.model is xrv_model.model


def xrv_labels(model: nn.Module) -> list[str]:
    """The output names: ``model.pathologies`` (``""`` for outputs the weights do not train)."""
    names = getattr(model, "pathologies", None)
    if names is None:
        names = getattr(model, "targets")
    return [str(n) for n in names]


def xrv_spec(model: nn.Module) -> ModelSpec:
    """What an xrv model expects and predicts: its labels, xrv's preprocessing (1 channel,
    [−1024, 1024]) at its native resolution (224 when it declares none)."""
    kind = type(model).__name__
    weights = getattr(model, "weights", None)
    thr = getattr(model, "op_threshs", None)
    provenance = {"source": f"torchxrayvision {kind}", "weights": str(weights) if weights else "none",
                  "explained_output": "logits (before xrv's sigmoid and op_norm calibration)"}
    if isinstance(thr, Tensor):
        provenance["op_threshs"] = [float(v) for v in thr.flatten().tolist()]
    arch = "densenet121" if kind == "DenseNet" else "resnet50"
    if kind == "ResNet" and isinstance(weights, str) and weights.startswith("resnet101"):
        arch = "resnet101"
    return ModelSpec(arch=arch, labels=xrv_labels(model), preprocessing="xrv",
                     input_size=int(getattr(model, "input_resolution", 224)), multilabel=True, provenance=provenance)


_VIEWS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def xrv_logits_view(model: nn.Module) -> nn.Module:
    """The traceable logits view of an xrv model (cached per model; rebuilt if its layers were
    replaced), carrying ``cxr_spec``."""
    view = _VIEWS.get(model)
    if view is None or not view.shares(model):
        view = XrvDenseNetLogits(model) if type(model).__name__ == "DenseNet" else XrvResNetLogits(model)
        view.train(model.training)
        _VIEWS[model] = view
    view.cxr_spec = xrv_spec(model)
    return view


def explainable_model(model: nn.Module, images: Optional[Tensor] = None) -> nn.Module:
    """``model``, or for a torchxrayvision classifier its logits view (:func:`xrv_logits_view`).

    An xrv model with a native resolution resizes other inputs inside its forward; maps must be in
    the images' own pixels, so ``images`` of another size are refused with what to do instead."""
    if not is_xrv_model(model):
        return model
    res = getattr(model, "input_resolution", None)
    if images is not None and res is not None and tuple(images.shape[-2:]) != (res, res):
        h, w = images.shape[-2:]
        raise CxrExplainError(
            f"torchxrayvision {type(model).__name__} works at {res}×{res} and would resize these {h}×{w} images "
            f"inside its forward; give {res}×{res} images (load_images(paths, model) prepares them) so the "
            "maps are in the images' pixels")
    return xrv_logits_view(model)


def model_spec(model: nn.Module) -> Optional[ModelSpec]:
    """``model.cxr_spec``, the spec of an xrv model, or None."""
    spec = getattr(model, "cxr_spec", None)
    if isinstance(spec, ModelSpec):
        return spec
    return xrv_spec(model) if is_xrv_model(model) else None
