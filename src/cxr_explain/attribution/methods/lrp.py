"""LRP composites (each a rule map; docs/rules.md §3). ``lrp`` is the RAP authors' LRP-α1β0."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ...errors import CxrExplainError
from .base import option, register
from .propagation import PropagationMethod, classic_graph, structural_rules

if TYPE_CHECKING:
    from ..graph import LayerNode, TracedModel

#: Why a bias-free rule (z⁺, αβ) loses relevance at a hidden Conv / Linear node.
BIAS_ONLY = ("its units that are active only through their bias (no positive input contribution, z⁺ = 0) "
             "have no input to pass their relevance to under a bias-free rule, so the map holds only the "
             "part of the output its inputs carry; use rap for a map that sums to the explained logit "
             "(or lrp's zero_denominators='flat')")


def _bias_only(node: "LayerNode") -> Optional[str]:
    return BIAS_ONLY if node.kind in ("conv", "linear") and node.role != "first" else None


@register
@dataclass(frozen=True)
class Lrp(PropagationMethod):
    """The authors' LRP-α1β0 (docs/rules.md §3): z⁺ without bias on hidden and head layers, zᴮ with
    the image's min/max and ``Z + 1e-9`` on the first layer, BN pass-through, pools and ``+``
    proportional, start relevance = the explained logit.

    ``zero_denominators``: what an output with no positive contribution (z⁺ denominator 0) does with
    the relevance it still receives (a normalisation's bias after the layer made it active):
    ``"lose"`` it (the authors' code; reported as a leak), spread it evenly over the inputs it reads
    (``"flat"``, ours, docs/rules.md §9.6), or ``"auto"`` (default): lose on the graphs the authors'
    code handled (VGG, ResNet, DenseNet: there it is rare and the map stays theirs), flat on the
    others (depthwise and narrow 1×1 convolutions make it common: 45 % of the logit was lost on a
    random MobileNetV2)."""

    name = "lrp"
    aliases = ("lrp-a1b0",)
    description = "LRP-α1β0 as the RAP authors' code: z⁺ without bias, zᴮ first layer, starts at the logit"
    zero_denominators: str = option("auto", "where a z⁺ denominator is 0: 'lose' (the authors'), 'flat' (spread "
                                            "evenly, conserving), 'auto' (lose on VGG/ResNet/DenseNet, else flat)")

    def loss_cause(self, node):
        return _bias_only(node)

    def rules(self):
        from .. import rules as R

        if self.zero_denominators not in ("auto", "flat", "lose"):
            raise CxrExplainError(f"method {self.name!r}: zero_denominators={self.zero_denominators!r}; "
                                  "use 'auto', 'flat' or 'lose'")
        zplus = R.zplus("flat" if self.zero_denominators == "flat" else None)
        rules = structural_rules(conv=zplus, linear=zplus)
        rules[("conv", "first")] = R.zbox("plus-epsilon", 1e-9)
        rules[("linear", "first")] = R.zbox("plus-epsilon", 1e-9)
        return rules

    def graph_rules(self, traced: "TracedModel"):
        from .. import rules as R

        if self.zero_denominators != "auto" or classic_graph(traced):
            return {}
        zplus = R.zplus("flat")
        return {kind: zplus for kind in ("conv", "linear", "layernorm", "groupnorm")}


@register
@dataclass(frozen=True)
class LrpEpsilon(PropagationMethod):
    """LRP-ε with biases on every Conv/Linear, zᴮ on the first layer (zennit's ``EpsilonGammaBox``
    with γ = 0)."""

    name = "lrp-epsilon"
    description = "LRP-ε on every layer (biases kept), zᴮ first layer"
    conserving = False
    epsilon: float = option(0.25, "ε added to each denominator with the sign of z")

    def rules(self):
        from .. import rules as R

        rules = structural_rules(conv=R.epsilon(self.epsilon), linear=R.epsilon(self.epsilon),
                                 constant_add=R.ConstantAdd(absorb=True))
        rules[("conv", "first")] = R.zbox("safe")
        rules[("linear", "first")] = R.zbox("safe")
        return rules


@register
@dataclass(frozen=True)
class LrpEpsilonPlus(PropagationMethod):
    """zennit's ``EpsilonPlus`` recipe: z⁺ on convolutions, ε on linear layers, zᴮ on the first."""

    name = "lrp-epsilon-plus"
    description = "LRP z⁺ on convolutions, ε on linear layers, zᴮ first layer"
    conserving = False
    epsilon: float = option(0.25, "ε of the linear layers' rule")

    def rules(self):
        from .. import rules as R

        rules = structural_rules(conv=R.zplus(), linear=R.epsilon(self.epsilon),
                                 constant_add=R.ConstantAdd(absorb=True))
        rules[("conv", "first")] = R.zbox("safe")
        return rules


@register
@dataclass(frozen=True)
class LrpZPlusFlat(PropagationMethod):
    """z⁺ everywhere, the flat rule on the first layer (relevance spread over its receptive field)."""

    name = "lrp-zplus-flat"
    description = "LRP z⁺ on hidden layers, flat rule on the first layer"

    def loss_cause(self, node):
        return _bias_only(node)

    def rules(self):
        from .. import rules as R

        rules = structural_rules(conv=R.zplus(), linear=R.zplus())
        rules[("conv", "first")] = R.flat()
        rules[("linear", "first")] = R.flat()
        return rules


@register
@dataclass(frozen=True)
class LrpAlphaBeta(PropagationMethod):
    """LRP-αβ (each part normalised on its own, no bias) on hidden layers, zᴮ on the first layer;
    conserving when α − β = 1."""

    name = "lrp-a2b1"
    description = "LRP-αβ (α=2, β=1 by default) on hidden layers, zᴮ first layer"
    alpha: float = option(2.0, "weight of the positive contributions")
    beta: float = option(1.0, "weight of the negative contributions")

    def loss_cause(self, node):
        return _bias_only(node)

    @property
    def conserving(self) -> bool:  # type: ignore[override]
        return self.alpha - self.beta == 1

    def rules(self):
        from .. import rules as R

        rule = R.alpha_beta(self.alpha, self.beta)
        rules = structural_rules(conv=rule, linear=rule)
        rules[("conv", "first")] = R.zbox("safe")
        return rules
