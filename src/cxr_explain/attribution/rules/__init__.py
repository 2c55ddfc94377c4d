"""Relevance rules: one class per rule, each a small piece of data plus a backward formula.

:mod:`.base` (Step, Rule, safe division), :mod:`.structural` (parameter-free ops), :mod:`.shape`
(permute, transpose, expand, getitem, chunk …), :mod:`.reductions` (sum / mean), :mod:`.gating`
(products and constant additions), :mod:`.linear` (Conv/Linear maps and the modified-z family of
LRP), :mod:`.norms` (LayerNorm / GroupNorm as σ-constant linear maps), :mod:`.rap` (RAP's first step
and hidden rule), :mod:`.attention` (softmax, matmul and attention after AttnLRP / CP-LRP;
reindexing ops). Element-wise activations (SiLU, GELU, …) use :class:`Pass`, the identity rule.
"""
from .attention import Attention, Blocked, Matmul, Reindex, SoftmaxLinearised
from .base import Rule, Step, merge_kb, per_sample_sum, safe_inverse, sdiv, split_kb
from .gating import ConstantAdd, GatedProduct, UniformProduct
from .linear import (WEIGHT_MODS, Combined, LinearMap, Term, ZRule, alpha_beta, cached_for_weight, epsilon, flat,
                     linear_map, modified_weights, ones_response, wsquare, zbox, zplus)
from .norms import NormMap
from .rap import RapConstantCat, RapFirstStep, RapHidden, uniform_shift
from .reductions import Reduce
from .shape import Expand, Permute, Rearrange, Transpose, unbroadcast
from .structural import MaskedPass, Pass, Proportional, Reshape, Slice, WinnerTakesAll

__all__ = ["WEIGHT_MODS", "Attention", "Blocked", "Combined", "ConstantAdd", "Expand", "GatedProduct", "LinearMap",
           "MaskedPass", "Matmul", "NormMap", "Pass", "Permute", "Proportional", "RapConstantCat", "RapFirstStep", "RapHidden",
           "Rearrange", "Reduce", "Reindex", "Reshape", "Rule", "Slice", "SoftmaxLinearised", "Step", "Term",
           "Transpose", "UniformProduct", "WinnerTakesAll", "ZRule", "alpha_beta", "cached_for_weight", "epsilon",
           "flat", "linear_map", "merge_kb", "modified_weights", "ones_response", "per_sample_sum", "safe_inverse",
           "sdiv", "split_kb", "unbroadcast", "uniform_shift", "wsquare", "zbox", "zplus"]
