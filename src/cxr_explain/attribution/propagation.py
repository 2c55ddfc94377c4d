"""The one propagation engine: walk the traced graph backwards, applying each node's rule.

A tensor used by several consumers receives the sum of their relevances (fan-out); each node's
forward output is freed as soon as its rule has run, and an output no rule reads (an activation's
input under a pass-through rule) is recorded as its shape only (:func:`unread_outputs`). A node
whose output is a tuple of tensors (``chunk``, ``split``) carries a tuple of relevances (``None``
for an item no consumer read), summed item by item.
Per node we keep Σ R at its output (``layer_sums``) and the relevance its rule lost or created
(``leaks`` = Σ R_out − Σ R_in), which is how a conservation warning can say where relevance went.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import torch

from ..errors import CxrExplainError
from .graph import ForwardRecord, LayerNode, TracedModel
from .rules import Rule, Step, per_sample_sum
from .rules.base import Relevance, add_relevance, carries_data

Tensor = torch.Tensor
RuleKey = Union[str, tuple[str, str]]


@dataclass(frozen=True)
class RuleMap:
    """Which rule each node gets: looked up by ``(kind, role)`` (role ∈ first / head / hidden), then
    by ``kind``. What a propagation method hands the engine."""

    name: str
    rules: Mapping[RuleKey, Rule] = field(default_factory=dict)

    def rule_for(self, node: LayerNode) -> Optional[Rule]:
        return self.rules.get((node.kind, node.role)) or self.rules.get(node.kind)

    def has_rule(self, node: LayerNode) -> bool:
        return self.rule_for(node) is not None


@dataclass
class PropagationResult:
    input_relevance: Tensor  # (K, B, *input_shape)
    layer_sums: dict[str, Tensor]  # node name -> (K, B), for nodes whose rule is not exact by construction
    leaks: dict[str, Tensor]  # node name -> (K, B): Σ R at output − Σ R passed to inputs
    kept: dict[str, Tensor]  # node name -> (K, B, *shape): relevance at that node's output, on request


def unread_outputs(traced: TracedModel, method: RuleMap) -> Callable[[LayerNode, dict[str, Any]], bool]:
    """The ``unread`` plan of :func:`~.graph.record_forward` for a propagation with ``method``: a
    node's output is read during the backward walk only by its own rule (:meth:`Rule.reads_output`,
    asked with the recorded inputs) and by the rules of its relevant consumers that read their
    inputs (:attr:`Rule.reads_values`). Any other output (an activation only a pass-through rule
    sees, a linear layer's output under z⁺) is kept as its shape, so the recorded forward holds
    what the rules use rather than every activation: same maps, less memory."""
    relevant = {n.name for n in traced.relevant_nodes()}

    def reads_inputs(node: LayerNode) -> bool:
        rule = method.rule_for(node)
        return rule is None or rule.reads_values

    read_as_input = {n.name for n in traced.nodes
                     if any(c.name in relevant and reads_inputs(c) for c in traced.consumers(n))}
    keep = {traced.input.name, traced.logits.name}

    def unread(node: LayerNode, values: dict[str, Any]) -> bool:
        if node.name in keep or node.name in read_as_input:
            return False
        if node.name not in relevant:
            return True
        rule = method.rule_for(node)
        inputs = [values[n.name] for n in node.inputs if carries_data(values.get(n.name))]
        return rule is not None and not rule.reads_output(node, inputs)

    return unread


def propagate(
    traced: TracedModel,
    record: ForwardRecord,
    method: RuleMap,
    start: Tensor,
    keep_sums: bool = True,
    keep: frozenset[str] = frozenset(),
    start_node=None,
) -> PropagationResult:
    """Propagate ``start`` (K, B, n_outputs) at the logits node back to the input.

    ``keep``: node names whose full output relevance is returned in ``kept``.
    ``start_node``: where ``start`` is injected (default: the logits node; RSP starts lower).
    """
    relevant = traced.relevant_nodes()
    relevant_names = {n.name for n in relevant}
    pending: dict[str, Tensor] = {(start_node or traced.logits).name: start}
    layer_sums: dict[str, Tensor] = {}
    leaks: dict[str, Tensor] = {}
    kept: dict[str, Tensor] = {}
    cache = traced.__dict__.setdefault("weight_cache", {})
    k = start.shape[0]
    values = record.values
    result = None
    for node in reversed(relevant):
        R = pending.pop(node.name, None)
        if node is traced.input:
            result = R
            break
        if R is None:
            continue
        if node.name in keep:
            kept[node.name] = R
        rule = method.rule_for(node)
        if rule is None:  # check_supported() ran before; keep a clear message anyway
            raise CxrExplainError(f"method {method.name!r} has no rule for node {node!r}")
        tensor_inputs = [n for n in node.inputs if carries_data(values.get(n.name))]
        step = Step(node, [values[n.name] for n in tensor_inputs], values[node.name], record, k, cache,
                    input_nodes=tensor_inputs)
        outs = list(rule.backward(step, R))
        # a rule may leave out trailing operands that are not data (a norm's γ, β, running stats)
        if len(outs) > len(tensor_inputs) or any(n.data for n in tensor_inputs[len(outs):]):
            raise CxrExplainError(f"rule {rule!r} returned {len(outs)} relevances for {len(tensor_inputs)} "
                                  f"inputs at node {node!r}")
        if keep_sums and not rule.exact:
            out_sum = per_sample_sum(R)
            if step.leak is not None:
                leak = step.leak
            else:
                in_sum = torch.zeros_like(out_sum)
                for inp, r in zip(tensor_inputs, outs):
                    if r is not None and inp.name in relevant_names:
                        in_sum = in_sum + per_sample_sum(r)
                leak = out_sum - in_sum
            layer_sums[node.name] = out_sum
            leaks[node.name] = leak
        for inp, r in zip(tensor_inputs, outs):
            if r is None or inp.name not in relevant_names:
                continue
            pending[inp.name] = add_relevance(pending.get(inp.name), r)
        del values[node.name]  # every consumer of this node has been processed
    if result is None:
        raise CxrExplainError("no relevance reached the model input: is the input connected to the logits?")
    return PropagationResult(result, layer_sums, leaks, kept)
