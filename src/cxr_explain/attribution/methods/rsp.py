"""RSP, Relative Sectional Propagation (Nam et al., AAAI 2021), VGG-style chains only
(docs/rules.md §4): starts at the last feature map with a Grad-CAM-like tensor."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import Request, register
from .propagation import PropagationMethod

if TYPE_CHECKING:
    from ..explanation import Explanation


@register
@dataclass(frozen=True)
class Rsp(PropagationMethod):
    """RSP as the authors' code computes it; the classifier is never traversed, so Σ map is the
    (normalised) start relevance, not the logit."""

    name = "rsp"
    description = "Relative Sectional Propagation (Nam et al. 2021), VGG only"
    conserving = False

    def rules(self):
        from ..rsp import RSP_RULES

        return dict(RSP_RULES)

    def explain(self, request: Request) -> Explanation:
        import torch

        from ..explanation import finish
        from ..graph import trace
        from ..propagation import RuleMap, propagate
        from ..rsp import rsp_start, rsp_start_node
        from ..targets import select

        traced = trace(request.model)
        rsp_start_node(traced)  # architecture check first: a clear error for ResNet / DenseNet
        node, start, logits, sel, record = rsp_start(traced, request.x,
                                                     lambda y: select(request.target, y, request.labels))
        rules = RuleMap(self.name, self.rules())
        lower = {n.name for n in traced.relevant_nodes() if n.index <= node.index}
        traced.check_supported(lambda n: n.name not in lower or n is node or rules.has_rule(n), self.name)
        with torch.no_grad():
            res = propagate(traced, record, rules, start, start_node=node)
        rel = res.input_relevance
        return finish(self.name, self.signed, rel.sum(2), logits, sel, input_relevance=rel,
                      layer_sums=res.layer_sums, leaks=res.leaks)
