"""The propagation family: a method is a mapping from (layer kind, role) to a rule, run by the one
engine (:func:`cxr_explain.attribution.propagation.propagate`).

A composite subclasses :class:`PropagationMethod` and returns its rule map from :meth:`rules`;
everything else — tracing, the recorded forward, the start relevance of the target, the
conservation check — is shared here.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

from ...errors import CxrExplainError
from .base import Family, Method, Request

if TYPE_CHECKING:
    from torch import Tensor

    from .. import rules as R
    from ..explanation import Explanation
    from ..graph import TracedModel
    from ..propagation import RuleKey, RuleMap
    from ..targets import Selection

CONSERVATION_TOLERANCE = 1e-3


def structural_rules(**overrides: R.Rule) -> dict[RuleKey, R.Rule]:
    """Rules for the parameter-free ops, shared by every composite (``overrides`` by kind)."""
    from .. import rules as R

    base: dict[RuleKey, R.Rule] = {
        "relu": R.Pass(),
        "identity": R.Pass(),
        "batchnorm": R.Pass(),
        "reshape": R.Reshape(),
        "cat": R.Slice(),
        "maxpool": R.WinnerTakesAll(),
        "avgpool": R.Proportional(),
        "adaptive_avgpool": R.Proportional(),
        "add": R.Proportional(),
    }
    base.update(overrides)
    return base


@dataclass(frozen=True)
class PropagationMethod(Method):
    """Relevance propagation with a rule per layer kind.

    ``start``: ``"logit"`` starts from ``s ⊙ y`` (LRP: the explained logit at its unit), ``"one"``
    from the seed ``s`` itself (RAP: its first step rescales to the logit). ``conserving``: Σ map
    should equal the explained output, and the result reports the relative error.
    """

    family: ClassVar[Family] = Family.PROPAGATION
    conserving: ClassVar[bool] = True
    start: ClassVar[str] = "logit"

    def rules(self) -> dict[RuleKey, R.Rule]:
        raise NotImplementedError

    def graph_rules(self, traced: TracedModel) -> dict[RuleKey, R.Rule]:
        """Rule overrides for one traced model (e.g. RAP's DenseNet BatchNorm); none by default."""
        return {}

    def check_graph(self, traced: TracedModel) -> Optional[str]:
        """Why this method cannot run on ``traced`` (one line), or None."""
        return None

    def rule_map(self, traced: TracedModel) -> RuleMap:
        from ..propagation import RuleMap

        return RuleMap(self.name, {**self.rules(), **self.graph_rules(traced)})

    def start_relevance(self, sel: Selection, logits: Tensor) -> Tensor:
        """(K, B, n) relevance at the logits: the seeds (``start="one"``) or seeds ⊙ logits."""
        seeds = sel.seeds().to(logits.dtype)
        return seeds if self.start == "one" else seeds * logits.unsqueeze(0)

    def explain(self, request: Request) -> Explanation:
        import torch

        from ..explanation import finish
        from ..graph import record_forward, trace
        from ..propagation import propagate
        from ..targets import select

        traced = trace(request.model)
        rules = self.rule_map(traced)
        traced.check_supported(rules.has_rule, self.name)
        problem = self.check_graph(traced)
        if problem:
            raise CxrExplainError(f"{self.name}: {problem}")
        keep = frozenset(traced.find(k).name for k in request.keep_relevance)
        with torch.no_grad():
            record = record_forward(traced, request.x)
            logits = record[traced.logits]
            if logits.dim() != 2:
                raise CxrExplainError(f"the model's logits have shape {tuple(logits.shape)}; expected (batch, classes)")
            sel = select(request.target, logits, request.labels)
            res = propagate(traced, record, rules, self.start_relevance(sel, logits), keep=keep)
            rel = res.input_relevance  # (K, B, C, H, W)
            maps = rel.sum(2)
            cons = None
            if self.conserving:
                explained = sel.values(logits).T  # (K, B)
                total = maps.flatten(2).sum(-1)
                cons = (total - explained).abs() / explained.abs().clamp(min=torch.finfo(explained.dtype).tiny)
                cons = torch.where(sel.valid.T, cons, torch.zeros_like(cons))
                if request.check_conservation and bool((cons > CONSERVATION_TOLERANCE).any()):
                    warn_conservation(self.name, cons, res.leaks)
        return finish(self.name, self.signed, maps, logits, sel, input_relevance=rel, layer_sums=res.layer_sums,
                      leaks=res.leaks, relevances=res.kept, conservation_error=cons)


def warn_conservation(name: str, cons: Tensor, leaks: dict[str, Tensor]) -> None:
    """One warning: how far Σ map is from the explained output and the node that lost the most."""
    worst = max(leaks.items(), key=lambda kv: float(kv[1].abs().max()), default=(None, None))
    where = f"; most relevance was lost at node {worst[0]!r} (Σ leak {float(worst[1].abs().max()):.3g})" if worst[0] else ""
    warnings.warn(
        f"{name}: Σ map differs from the explained logit by up to {float(cons.max()):.3g} (relative){where}",
        RuntimeWarning, stacklevel=4,
    )
