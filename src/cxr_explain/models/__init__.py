"""Architectures with their label sets (zoo) and strict loading of user checkpoints."""
from __future__ import annotations

from .checkpoints import (
    OWN_FORMAT,
    LoadReport,
    infer_architecture,
    load_checkpoint,
    save_checkpoint,
)
from .xrv import explainable_model, is_xrv_model, model_spec, xrv_spec
from .zoo import (
    ARCHS,
    BENCHMARK_LABELS,
    CHEXNET_LABELS,
    LABEL_SETS,
    PNEUMONIA_LABELS,
    PNEUMONIA_SOFTMAX_LABELS,
    PREPROCESSING,
    XRV_LABELS,
    ModelSpec,
    build_model,
    default_labels,
    get_spec,
    label_index,
    resolve_labels,
)

__all__ = [
    "ARCHS", "BENCHMARK_LABELS", "CHEXNET_LABELS", "LABEL_SETS", "OWN_FORMAT", "PNEUMONIA_LABELS",
    "PNEUMONIA_SOFTMAX_LABELS", "PREPROCESSING", "XRV_LABELS", "LoadReport", "ModelSpec",
    "build_model", "default_labels", "explainable_model", "get_spec", "infer_architecture", "is_xrv_model",
    "label_index", "load_checkpoint", "model_spec", "resolve_labels", "save_checkpoint", "xrv_spec",
]
