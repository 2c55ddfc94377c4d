"""The model-agnostic explanation engine: one traced graph, one backward walk, many rules."""
from .explain import Explanation, explain
from .methods import available_methods

__all__ = ["Explanation", "explain", "available_methods"]
