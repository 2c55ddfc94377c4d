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
    from ..graph import LayerNode, TracedModel
    from ..propagation import RuleKey, RuleMap
    from ..targets import Selection

CONSERVATION_TOLERANCE = 1e-3


def attention_rules(cp: bool = False, epsilon: float = 0.0) -> dict[RuleKey, R.Rule]:
    """Rules for softmax, matmul, whole attention calls and reindexing ops (docs/rules.md §10):
    AttnLRP's (softmax linearised, uniform rule on products of two data tensors), or with ``cp``
    CP-LRP's (attention weights held constant: relevance only through the values). ``epsilon``
    stabilises the products' divisions (0: safe division)."""
    from .. import rules as R

    return {
        "softmax": R.Blocked() if cp else R.SoftmaxLinearised(),
        "matmul": R.Matmul(cp=cp, epsilon=epsilon),
        "attention": R.Attention(cp=cp, epsilon=epsilon),
        "reindex": R.Reindex(),
    }


def structural_rules(**overrides: R.Rule) -> dict[RuleKey, R.Rule]:
    """Rules for the parameter-free ops, shared by every composite (``overrides`` by kind).

    Element-wise activations pass relevance unchanged (the identity rule, as zennit's ``Pass`` and
    AttnLRP); shape ops move it back along the same entries; sums, means and pools are proportional;
    a gated product gives everything to the gated signal (docs/rules.md §9). LayerNorm / GroupNorm
    get the method's own ``linear`` rule, applied to the norm as a σ-constant linear map (§9.3),
    unless ``overrides`` name them. A learned constant added to the data (``constant_add``) passes
    relevance to the data, like the biases the bias-free rules leave out. Attention gets AttnLRP's
    rules (:func:`attention_rules`, docs/rules.md §10).
    """
    from .. import rules as R

    base: dict[RuleKey, R.Rule] = {
        "relu": R.Pass(),
        "activation": R.Pass(),
        "sigmoid": R.Pass(),
        "identity": R.Pass(),
        "batchnorm": R.Pass(),
        "reshape": R.Reshape(),
        "permute": R.Permute(),
        "transpose": R.Transpose(),
        "expand": R.Expand(),
        "getitem": R.Rearrange(),
        "split": R.Rearrange(),
        "pad": R.Rearrange(exact=False),
        "cat": R.Slice(),
        "maxpool": R.WinnerTakesAll(),
        "avgpool": R.Proportional(),
        "adaptive_avgpool": R.Proportional(),
        "mean": R.Reduce(),
        "sum": R.Reduce(),
        "add": R.Proportional(),
        "sub": R.Proportional(),
        "constant_add": R.ConstantAdd(),
        "gated_mul": R.GatedProduct(),
        "mul": R.UniformProduct(),
        **attention_rules(),
    }
    base.update(overrides)
    linear = overrides.get("linear")
    if linear is not None:
        base.setdefault("layernorm", linear)
        base.setdefault("groupnorm", linear)
    return base


@dataclass(frozen=True)
class PropagationMethod(Method):
    """Relevance propagation with a rule per layer kind.

    ``start``: ``"logit"`` starts from ``s ⊙ y`` (LRP: the explained logit at its unit), ``"one"``
    from the seed ``s`` itself (RAP: its first step rescales to the logit). ``conserving``: Σ map
    should equal the explained output, and the result reports the relative error.
    ``report_conservation``: report that error also for a method that does not promise it (no
    warning then).
    """

    family: ClassVar[Family] = Family.PROPAGATION
    conserving: ClassVar[bool] = True
    report_conservation: ClassVar[bool] = False
    start: ClassVar[str] = "logit"

    def rules(self) -> dict[RuleKey, R.Rule]:
        raise NotImplementedError

    def graph_rules(self, traced: TracedModel) -> dict[RuleKey, R.Rule]:
        """Rule overrides for one traced model (e.g. RAP's DenseNet BatchNorm); none by default."""
        return {}

    def check_graph(self, traced: TracedModel) -> Optional[str]:
        """Why this method cannot run on ``traced`` (one line), or None."""
        return None

    def loss_cause(self, node: LayerNode) -> Optional[str]:
        """What it means when this method's rule loses relevance at ``node``, and what to use
        instead, when the cause is known (one clause for the conservation warning); else None."""
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
        from ..propagation import propagate, unread_outputs
        from ..targets import select

        traced = trace(request.model)
        rules = self.rule_map(traced)
        traced.check_supported(rules.has_rule, self.name, alternatives(traced))
        problem = self.check_graph(traced)
        if problem:
            raise CxrExplainError(f"{self.name}: {problem}")
        keep = frozenset(traced.find(k).name for k in request.keep_relevance)
        with torch.no_grad():
            record = record_forward(traced, request.x, unread=unread_outputs(traced, rules))
            logits = record[traced.logits]
            if logits.dim() != 2:
                raise CxrExplainError(f"the model's logits have shape {tuple(logits.shape)}; expected (batch, classes)")
            sel = select(request.target, logits, request.labels)
            res = propagate(traced, record, rules, self.start_relevance(sel, logits), keep=keep)
            rel = res.input_relevance  # (K, B, C, H, W)
            maps = rel.sum(2)
            cons = None
            if self.conserving or self.report_conservation:
                explained = sel.values(logits).T  # (K, B)
                total = maps.flatten(2).sum(-1)
                cons = (total - explained).abs() / explained.abs().clamp(min=torch.finfo(explained.dtype).tiny)
                cons = torch.where(sel.valid.T, cons, torch.zeros_like(cons))
                if self.conserving and request.check_conservation and bool((cons > CONSERVATION_TOLERANCE).any()):
                    warn_conservation(self, traced, cons, total, explained, res.leaks, res.layer_sums)
        return finish(self.name, self.signed, maps, logits, sel, input_relevance=rel, layer_sums=res.layer_sums,
                      leaks=res.leaks, relevances=res.kept, conservation_error=cons)


#: The node kinds of the paper's networks (VGG, ResNet, DenseNet): the ops the RAP authors' code handled.
CLASSIC_KINDS = {"input", "output", "constant", "meta", "conv", "linear", "batchnorm", "relu", "maxpool", "avgpool",
                 "adaptive_avgpool", "add", "cat", "reshape", "identity"}


def classic_graph(traced: TracedModel) -> bool:
    """The graph has only the ops the authors' code handled, and no grouped convolution
    (docs/rules.md §9.5, §9.6): where `rap` keeps the authors' BatchNorm mask and `lrp` their z⁺."""
    for n in traced.relevant_nodes():
        if n.kind not in CLASSIC_KINDS:
            return False
        if n.kind == "conv" and getattr(n.module, "groups", 1) != 1:
            return False
    return True


def alternatives(traced: TracedModel) -> str:
    """The methods that need no rules (gradient and CAM families), for an unsupported-op error;
    CAM only where the head is global average pool → Linear."""
    from .. import cam as cam_maps
    from .base import available_methods, method_class

    names = []
    for name in available_methods():
        fam = method_class(name).family
        if name == "cam":
            try:
                cam_maps.cam_head(traced)
            except CxrExplainError:
                continue
        if fam in (Family.GRADIENT, Family.CAM):
            names.append(name)
    return ", ".join(names)


def conservation_message(method: PropagationMethod, traced: TracedModel, cons: Tensor, total: Tensor,
                         explained: Tensor, leaks: dict[str, Tensor], layer_sums: dict[str, Tensor]) -> str:
    """One line on the worst-conserved map (all tensors (K, B)): Σ map against the explained output,
    the node whose rule lost or created the most of the difference, as a fraction of the explained
    output, and the method's :meth:`~PropagationMethod.loss_cause` there.

    A node's loss is Σ R at its output − Σ R passed to its inputs. For methods that start from the
    seed itself (``start="one"``, RAP) the head's first step rescales Σ = 1 to the logit by design, so
    there the loss counted is ``y − Σ R in`` (what the rescaling missed), not the rescaling."""
    k, b = divmod(int(cons.argmax()), cons.shape[1])
    y, s = float(explained[k, b]), float(total[k, b])
    msg = (f"{method.name}: Σ map = {s:.4g} but the explained output is {y:.4g} "
           f"(relative error {float(cons[k, b]):.2g})")
    losses: dict[str, float] = {}
    for name, leak in leaks.items():
        node = traced.by_name.get(name)
        v = float(leak[k, b])
        if method.start == "one" and node is not None and node.role == "head" and name in layer_sums:
            v -= float(layer_sums[name][k, b]) - y
        losses[name] = v
    if not losses:
        return msg
    name, v = max(losses.items(), key=lambda kv: abs(kv[1]))
    node = traced.by_name.get(name)
    where = (node.module_path or name) if node is not None else name
    kind = f"{node.kind}, " if node is not None else ""
    share = f"{abs(v / y):.2g} of the explained output" if y else f"{v:.3g}"
    msg += f"; most of the difference arises at {where} ({kind}{share} {'lost' if v * (y or 1) > 0 else 'added'})"
    cause = method.loss_cause(node) if node is not None else None
    return msg + (f": {cause}" if cause else "")


def warn_conservation(method: PropagationMethod, traced: TracedModel, cons: Tensor, total: Tensor, explained: Tensor,
                      leaks: dict[str, Tensor], layer_sums: dict[str, Tensor]) -> None:
    """Warn (RuntimeWarning) with :func:`conservation_message`."""
    warnings.warn(conservation_message(method, traced, cons, total, explained, leaks, layer_sums),
                  RuntimeWarning, stacklevel=4)
