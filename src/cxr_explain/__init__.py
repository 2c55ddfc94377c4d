"""cxr-explain: why a chest X-ray classifier made its diagnosis, and whether that reason is the lesion.

The public API (imported lazily, so ``cxr-explain --help`` does not load torch):
``explain``, ``Explanation``, ``load_model``, ``load_images``, ``save_explanation``,
``available_methods``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import CxrExplainError

_API = {
    "explain": "attribution",
    "Explanation": "attribution",
    "available_methods": "attribution",
    "load_model": "api",
    "load_images": "api",
    "save_explanation": "api",
}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'cxr_explain' has no attribute {name!r}")


__all__ = ["CxrExplainError", "__version__", *_API]
