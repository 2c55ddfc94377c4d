"""The model-agnostic explanation engine: one traced graph, one backward walk, many rules.

Only :func:`explain` (whose module defers torch to its first call) is imported with the package;
the other names on first use, so listing the methods (``cxr-explain methods``) needs no torch."""
from __future__ import annotations

import importlib

from .explain import explain

_LAZY = {
    "Explanation": ".explanation",
    "Family": ".methods",
    "Method": ".methods",
    "available_methods": ".methods",
    "get_method": ".methods",
    "register": ".methods",
    "Callable": ".targets",
    "Contrast": ".targets",
    "Finding": ".targets",
    "Index": ".targets",
    "Predicted": ".targets",
    "Probability": ".targets",
    "Target": ".targets",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted([*_LAZY, "explain"])
