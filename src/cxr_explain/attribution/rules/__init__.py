"""Relevance rules: one class per rule, each a small piece of data plus a backward formula.

:mod:`.base` (Step, Rule, safe division), :mod:`.structural` (parameter-free ops), :mod:`.linear`
(Conv/Linear maps and the modified-z family of LRP), :mod:`.rap` (RAP's first step and hidden rule).
"""
from .base import Rule, Step, merge_kb, per_sample_sum, safe_inverse, sdiv, split_kb
from .linear import (WEIGHT_MODS, Combined, LinearMap, Term, ZRule, alpha_beta, cached_for_weight, epsilon, flat,
                     modified_weights, ones_response, wsquare, zbox, zplus)
from .rap import RapFirstStep, RapHidden, uniform_shift
from .structural import MaskedPass, Pass, Proportional, Reshape, Slice, WinnerTakesAll

__all__ = ["WEIGHT_MODS", "Combined", "LinearMap", "MaskedPass", "Pass", "Proportional", "RapFirstStep", "RapHidden",
           "Reshape", "Rule", "Slice", "Step", "Term", "WinnerTakesAll", "ZRule", "alpha_beta", "cached_for_weight",
           "epsilon", "flat", "merge_kb", "modified_weights", "ones_response", "per_sample_sum", "safe_inverse",
           "sdiv", "split_kb", "uniform_shift", "wsquare", "zbox", "zplus"]
