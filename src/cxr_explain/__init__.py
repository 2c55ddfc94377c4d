"""cxr-explain: why a chest X-ray classifier made its diagnosis, and whether that reason is the lesion."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import CxrExplainError

__all__ = ["CxrExplainError", "__version__"]
