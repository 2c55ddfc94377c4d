"""Explanation methods: the protocol (:mod:`.base`), one registry, and the shipped methods.

``get_method("lrp-epsilon", epsilon=0.1)`` gives a configured method; ``available_methods()``
lists them; a new method is one file with a ``@register``-ed class (README, "Adding a method")."""
from . import builtin  # noqa: F401  (first: registration order is the listing order)
from .base import (Family, Method, Option, Request, available_methods, get_method, method_class, option,
                   parse_method_options, register, resolve_method_name, unregister)
from .propagation import PropagationMethod, attention_rules, structural_rules
from .gradient import GradientMethod
from .cam import CamMethod, GradCamFamily

__all__ = ["CamMethod", "Family", "GradCamFamily", "GradientMethod", "Method", "Option", "PropagationMethod",
           "Request", "available_methods", "get_method", "method_class", "option", "parse_method_options",
           "register", "resolve_method_name", "attention_rules", "structural_rules", "unregister"]
