"""What every rule shares: the :class:`Step` it sees, the :class:`Rule` base class, and the tensor
helpers (safe division, the (K, B) target × batch layout).

Conventions (``docs/rules.md`` §1): a rule receives the relevance ``R`` at a node's output and returns
the relevance at each of its tensor inputs. Relevance tensors carry a leading *target* axis:
``R`` has shape ``(K, B, *feature_shape)`` for K explained targets of a batch of B images, while the
stored activations have shape ``(B, *feature_shape)`` and are broadcast over K. So a forward pass and
every per-image quantity (z⁺ denominators, first-layer bounds) is computed once for all targets.

``sdiv(n, d)`` is the *safe division*: ``n/d`` where ``d != 0`` and exactly 0 where ``d == 0``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from ..graph import ForwardRecord, LayerNode

Tensor = torch.Tensor


def safe_inverse(d: Tensor) -> Tensor:
    """``1/d`` where ``d != 0``, exactly 0 where ``d == 0`` (computed once per layer and image, then
    multiplied into the relevance of every target)."""
    return torch.reciprocal(d).masked_fill_(d == 0, 0)


def sdiv(n: Tensor, d: Tensor) -> Tensor:
    """Safe division: ``n/d`` where ``d != 0``, exactly 0 where ``d == 0``."""
    return (n / d).masked_fill_(d == 0, 0)


def merge_kb(t: Tensor) -> Tensor:
    """(K, B, *s) -> (K*B, *s)."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def split_kb(t: Tensor, k: int) -> Tensor:
    """(K*B, *s) -> (K, B, *s)."""
    return t.reshape(k, t.shape[0] // k, *t.shape[1:])


#: Relevance at a node: a tensor (K, B, …), or for a node whose output is a tuple of tensors
#: (chunk, split) a tuple with one relevance (or None) per item.
Relevance = Union[Tensor, tuple]


def per_sample_sum(t: Relevance) -> Tensor:
    """Sum over all feature axes of a (K, B, ...) tensor -> (K, B); of a tuple, over its items."""
    if isinstance(t, (tuple, list)):
        parts = [per_sample_sum(r) for r in t if r is not None]
        return sum(parts[1:], parts[0])
    return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)


def carries_data(value: Any) -> bool:
    """A recorded value that can carry relevance: a tensor, or a tuple / list of tensors."""
    if isinstance(value, Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(isinstance(v, Tensor) for v in value)


def add_relevance(a: Optional[Relevance], b: Optional[Relevance]) -> Optional[Relevance]:
    """Fan-out: the sum of two relevances at one node (tuples item by item, None as zero)."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, tuple):
        return tuple(add_relevance(x, y) for x, y in zip(a, b))
    return a + b


@dataclass
class Step:
    """What a rule sees at one node."""

    node: LayerNode
    inputs: list[Tensor]  # the node's tensor inputs (forward values), shape (B, ...)
    output: Tensor  # the node's forward output, shape (B, ...)
    record: ForwardRecord
    n_targets: int
    cache: dict[Any, Any] = field(default_factory=dict)  # modified weights, kept with the traced model
    leak: Optional[Tensor] = None  # (K, B) relevance the rule lost, when the rule knows it
    input_nodes: Sequence[LayerNode] = ()  # the graph nodes of ``inputs``, same order
    local: dict[Any, Any] = field(default_factory=dict)  # what the rule computes once at this node (weights)

    @property
    def x(self) -> Tensor:
        return self.inputs[0]

    @property
    def x_nonnegative(self) -> bool:
        """The first input is ≥ 0 by construction (known from the graph, no pass over the data)."""
        return bool(self.node.inputs and self.node.inputs[0].nonnegative)


class Rule:
    """A relevance rule. Subclasses implement :meth:`backward`.

    ``exact``: the rule passes on exactly the relevance it receives, by construction, so the engine
    does not spend a reduction checking it. A rule that knows its own loss cheaply may set
    ``step.leak`` (K, B) instead of letting the engine sum input and output relevance.
    """

    name = "rule"
    exact = False
    #: the rule reads the contents of its recorded tensors (inputs and output), not only their shape
    #: and dtype; a rule that does not lets the engine keep shape-only stand-ins (:meth:`reads_output`)
    reads_values = True

    def backward(self, step: Step, R: Tensor) -> list[Optional[Tensor]]:
        raise NotImplementedError

    def reads_output(self, node: LayerNode, inputs: Sequence[Any]) -> bool:
        """Whether :meth:`backward` at ``node`` will read the contents of the node's recorded output,
        given its recorded tensor inputs (asked once, during the forward pass). When no rule reads a
        node's output, the engine keeps only its shape (the recorded forward then holds what the rules
        use, not every activation)."""
        return self.reads_values

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
