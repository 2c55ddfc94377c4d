"""Architectures with their label sets (zoo) and strict loading of user checkpoints."""
from __future__ import annotations

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
    "ARCHS", "BENCHMARK_LABELS", "CHEXNET_LABELS", "LABEL_SETS", "PNEUMONIA_LABELS",
    "PNEUMONIA_SOFTMAX_LABELS", "PREPROCESSING", "XRV_LABELS", "ModelSpec",
    "build_model", "default_labels", "get_spec", "label_index",
    "resolve_labels",
]
