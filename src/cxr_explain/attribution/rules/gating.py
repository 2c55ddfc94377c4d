"""Products and constant additions (docs/rules.md §9.4).

How a node is classified (``graph.py`` / ``kinds.py``, from the operands, before any data is seen):

* ``gated_mul``: ``x * g`` where ``g`` is a *gate* — the output of a sigmoid or hard sigmoid,
  possibly reshaped / permuted / expanded on its way (squeeze-excitation, ECA, GLU's σ) — and ``x``
  is not; or ``x * c`` / ``x / c`` with ``c`` not computed from the input (layer scale γ, a number).
  The gate or constant is held fixed, so the node is the linear map ``x ↦ g ⊙ x`` and the z-rule
  gives ``R_x = g x R / (g x) = R``: all relevance to the gated signal, exactly.
* ``mul``: a product of two data tensors neither or both of which is a gate (attention-like): the
  uniform rule, ``R_a = R_b = R/2`` (AttnLRP's rule for a product of two inputs).
* ``constant_add``: ``x + c`` (``x − c``, ``c − x``) with ``c`` a learned constant (positional
  embedding, an unfolded bias) or a number.
"""
from __future__ import annotations

import operator

import torch

from .base import Rule, sdiv
from .shape import unbroadcast

_SUBTRACTIONS = (operator.sub, operator.isub, torch.sub, "sub")


class GatedProduct(Rule):
    """``y = x ⊙ g`` with the gate (or constant) ``g`` held fixed: ``R_x = R`` (summed back over any
    broadcast axes), nothing to the gate. Exact."""

    name = "gated-product"
    exact = True
    reads_values = False  # the operands' shapes only

    def backward(self, step, R):
        passive = step.node.passive
        out = []
        for node, value in zip(step.input_nodes, step.inputs):
            out.append(unbroadcast(R, value.shape) if node.data and node.name not in passive else None)
        if all(r is None for r in out):
            raise ValueError(f"gated product {step.node!r} has no data operand")
        return out


class UniformProduct(Rule):
    """``y = a ⊙ b`` of two data tensors: ``R_a = R_b = R/2`` (summed back over broadcast axes). Exact."""

    name = "uniform-product"
    exact = True
    reads_values = False  # the operands' shapes only

    def backward(self, step, R):
        half = R / 2
        return [unbroadcast(half, v.shape) if n.data else None for n, v in zip(step.input_nodes, step.inputs)]


class ConstantAdd(Rule):
    """``y = x + c`` with ``c`` not computed from the input (a learned constant or a number).

    ``absorb=False`` (the default of the bias-free composites: ``lrp``, RAP): the constant is treated
    like a layer bias those rules leave out, ``R_x = R`` (exact). ``absorb=True`` (the ε composites,
    which keep biases): the z-rule, ``R_x = ±x · R / y``, the constant's share ``c · R / y`` is
    absorbed and reported as the node's leak.
    """

    name = "constant-add"

    def __init__(self, absorb: bool = False):
        self.absorb = absorb
        self.exact = not absorb
        self.reads_values = absorb  # without absorbing: the operands' shapes only

    def backward(self, step, R):
        s = sdiv(R, step.output) if self.absorb else None
        out = []
        for node, value in zip(step.input_nodes, step.inputs):
            if not node.data:
                out.append(None)
            elif not self.absorb:
                out.append(unbroadcast(R, value.shape))
            else:
                sign = -1.0 if _is_subtrahend(step.node, node) else 1.0
                out.append(unbroadcast(sign * value * s, value.shape))
        return out


def _is_subtrahend(node, operand) -> bool:
    """``c − x``: the data operand is the one subtracted."""
    args = node.fx_node.args
    return (node.fx_node.target in _SUBTRACTIONS and len(args) > 1
            and getattr(args[1], "name", None) == operand.name)
