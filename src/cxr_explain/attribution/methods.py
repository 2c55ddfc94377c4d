"""Propagation methods as data: a mapping from (layer kind, role) to a rule.

A rule is looked up first by ``(kind, role)`` (role ∈ first / head / hidden) and then by ``kind``.
Adding a method is a few lines: name the rules per layer kind. The gradient-based methods live in
:mod:`.gradients`, the class activation maps in :mod:`.cam`; :func:`available_methods` lists all.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Union

from ..errors import CxrExplainError
from . import rules as R
from .graph import LayerNode

RuleKey = Union[str, tuple[str, str]]


@dataclass(frozen=True)
class PropagationMethod:
    """A relevance-propagation method.

    ``start``: ``"logit"`` starts from ``logit_t · onehot(t)`` (LRP), ``"one"`` from ``onehot(t)``
    (RAP: its first step rescales to the logit). ``conserving``: Σ map should equal the logit, and
    the engine checks it.
    """

    name: str
    description: str
    rules: Mapping[RuleKey, R.Rule]
    start: str = "logit"
    conserving: bool = True
    supports: Optional[Callable[["object"], Optional[str]]] = None  # traced -> error text or None
    graph_rules: Optional[Callable[["object"], Mapping[RuleKey, R.Rule]]] = None  # traced -> rule overrides

    def rule_for(self, node: LayerNode) -> Optional[R.Rule]:
        return self.rules.get((node.kind, node.role)) or self.rules.get(node.kind)

    def for_graph(self, traced) -> "PropagationMethod":
        """This method with the rule overrides ``graph_rules`` picks for one traced model (e.g. RAP's
        DenseNet extension); the method itself when it has none."""
        extra = self.graph_rules(traced) if self.graph_rules is not None else None
        return dataclasses.replace(self, rules={**self.rules, **extra}) if extra else self


def _structural(**overrides: R.Rule) -> dict[RuleKey, R.Rule]:
    """Rules for the parameter-free ops, shared by every method."""
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


def lrp_reference() -> PropagationMethod:
    """The authors' LRP-α1β0 (rap.md §3): z⁺ without bias on hidden and head layers, zᴮ with the
    image's min/max and ``Z + 1e-9`` on the first layer, BN pass-through, pools and ``+`` proportional,
    start relevance = the target logit."""
    rules = _structural(conv=R.zplus(), linear=R.zplus())
    rules[("conv", "first")] = R.zbox("plus-epsilon", 1e-9)
    rules[("linear", "first")] = R.zbox("plus-epsilon", 1e-9)
    return PropagationMethod("lrp", "LRP-α1β0 as the authors' code: z⁺ no bias, zᴮ first layer, starts at the logit",
                             rules, start="logit")


def lrp_epsilon(epsilon: float = 0.25) -> PropagationMethod:
    """LRP-ε (with biases) on every Conv/Linear, zᴮ on the first layer."""
    rules = _structural(conv=R.epsilon(epsilon), linear=R.epsilon(epsilon))
    rules[("conv", "first")] = R.zbox("safe")
    rules[("linear", "first")] = R.zbox("safe")
    return PropagationMethod("lrp-epsilon", f"LRP-ε (ε={epsilon:g}, biases kept), zᴮ first layer",
                             rules, start="logit", conserving=False)


def lrp_epsilon_plus(epsilon: float = 0.25) -> PropagationMethod:
    """zennit's EpsilonPlus recipe: z⁺ on convolutions, ε on linear layers, zᴮ on the first layer."""
    rules = _structural(conv=R.zplus(), linear=R.epsilon(epsilon))
    rules[("conv", "first")] = R.zbox("safe")
    return PropagationMethod("lrp-epsilon-plus", "z⁺ conv, ε linear, zᴮ first layer", rules,
                             start="logit", conserving=False)


def lrp_zplus_flat() -> PropagationMethod:
    """z⁺ everywhere, the flat rule on the first layer."""
    rules = _structural(conv=R.zplus(), linear=R.zplus())
    rules[("conv", "first")] = R.flat()
    rules[("linear", "first")] = R.flat()
    return PropagationMethod("lrp-zplus-flat", "z⁺ hidden layers, flat first layer", rules, start="logit")


def lrp_alpha_beta(alpha: float = 2.0, beta: float = 1.0) -> PropagationMethod:
    """LRP-αβ (each part normalised separately, no bias) on hidden layers, zᴮ on the first layer."""
    rule = R.alpha_beta(alpha, beta)
    rules = _structural(conv=rule, linear=rule)
    rules[("conv", "first")] = R.zbox("safe")
    return PropagationMethod(f"lrp-a{alpha:g}b{beta:g}", f"LRP-α{alpha:g}β{beta:g}, zᴮ first layer", rules,
                             start="logit", conserving=alpha - beta == 1)


def rap() -> PropagationMethod:
    """RAP as the authors' code computes it (rap.md §2): first step with absolute influence
    normalisation at the head, relative-influence hidden rule with the uniform shift, zᴮ (safe
    division) on the first layer, BatchNorm masked pass-through (plain pass-through in DenseNet,
    see :func:`_rap_densenet_rules`), pools and ``+`` proportional."""
    rules = _structural(conv=R.RapHidden(), linear=R.RapHidden(), batchnorm=R.MaskedPass())
    rules[("linear", "head")] = R.RapFirstStep()
    rules[("conv", "first")] = R.zbox("safe")
    rules[("linear", "first")] = R.zbox("safe")
    return PropagationMethod("rap", "Relative Attributing Propagation (Nam et al. 2020), reference rules",
                             rules, start="one", supports=_rap_supports, graph_rules=_rap_densenet_rules)


def _rap_densenet_rules(traced) -> dict[RuleKey, R.Rule]:
    """RAP's DenseNet extension (rap.md §2.11: "norm/BN is identity"): BatchNorm is a plain pass-through
    in a graph with concatenations. The authors' mask ``R ⊙ [x ≠ 0]`` (§2.7) is not "practically always
    1" there: in a trained DenseNet-121 a dense layer's 1×1 conv can output exactly 0 where all its
    inputs are 0, norm2 turns that into a bias-only activation, and the mask drops its relevance
    (Σ map was 8× the logit on a trained model). Passed through, it reaches the conv's hidden rule,
    whose uniform shift conserves it."""
    return {"batchnorm": R.Pass()} if any(n.kind == "cat" for n in traced.nodes) else {}


def rap_noshift() -> PropagationMethod:
    """RAP without the uniform shift (ours, for ablations: not conserving)."""
    rules = dict(rap().rules)
    rules["conv"] = R.RapHidden(shift=False)
    rules["linear"] = R.RapHidden(shift=False)
    return PropagationMethod("rap-noshift", "RAP without the uniform shift (ours; not conserving)", rules,
                             start="one", conserving=False, supports=_rap_supports, graph_rules=_rap_densenet_rules)


def _rap_supports(traced) -> Optional[str]:
    head = [n for n in traced.nodes if n.role == "head"]
    if not head or head[0].kind != "linear":
        return "RAP needs a model whose logits come from a Linear layer (its first step happens there)"
    return None


PROPAGATION_METHODS: dict[str, Callable[..., PropagationMethod]] = {
    "lrp": lrp_reference,
    "lrp-a1b0": lrp_reference,
    "lrp-epsilon": lrp_epsilon,
    "lrp-epsilon-plus": lrp_epsilon_plus,
    "lrp-zplus-flat": lrp_zplus_flat,
    "lrp-a2b1": lrp_alpha_beta,
    "rap": rap,
    "rap-noshift": rap_noshift,
}

GRADIENT_METHODS = ("gradient", "gradient-x-input", "integrated-gradients")
CAM_METHODS = ("cam", "gradcam", "gradcam++")
OTHER_METHODS: dict[str, str] = {"rsp": "Relative Sectional Propagation (Nam et al. 2021), VGG only"}


def available_methods() -> list[str]:
    return list(PROPAGATION_METHODS) + list(GRADIENT_METHODS) + list(CAM_METHODS) + list(OTHER_METHODS)


def resolve_method_name(name: str) -> str:
    """Canonical method name, or a one-line error with the closest names."""
    key = name.strip().lower().replace("_", "-")
    aliases = {"grad-cam": "gradcam", "grad-cam++": "gradcam++", "gradcampp": "gradcam++", "ig": "integrated-gradients",
               "saliency": "gradient", "gxi": "gradient-x-input", "input-x-gradient": "gradient-x-input"}
    key = aliases.get(key, key)
    if key in available_methods():
        return key
    close = difflib.get_close_matches(key, available_methods(), n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise CxrExplainError(f"unknown method {name!r}{hint} (available: {', '.join(available_methods())})")


def get_propagation_method(name: str, **options) -> PropagationMethod:
    factory = PROPAGATION_METHODS[name]
    try:
        return factory(**options)
    except TypeError:
        raise CxrExplainError(f"method {name!r} does not take options {sorted(options)}") from None
