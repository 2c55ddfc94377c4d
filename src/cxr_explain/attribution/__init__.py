"""The model-agnostic explanation engine: one traced graph, one backward walk, many rules."""
from .explain import explain
from .explanation import Explanation
from .methods import Family, Method, available_methods, get_method, register
from .targets import Callable, Contrast, Finding, Index, Predicted, Probability, Target

__all__ = ["Callable", "Contrast", "Explanation", "Family", "Finding", "Index", "Method", "Predicted",
           "Probability", "Target", "available_methods", "explain", "get_method", "register"]
