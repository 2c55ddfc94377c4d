"""The transformer composite after AttnLRP (Achtibat et al., ICML 2024), with CP-LRP (Ali et al.,
ICML 2022) as an option (docs/rules.md §10.8)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .base import option, register
from .propagation import PropagationMethod, attention_rules, structural_rules


@register
@dataclass(frozen=True)
class AttnLrp(PropagationMethod):
    """LRP-ε on every Conv / Linear (biases kept; ε = 0 is the z-rule with safe division), softmax
    linearised at its input, the uniform rule on products of two data tensors (q kᵀ, A v), the
    structural rules elsewhere; ``cp``: CP-LRP's attention (weights held constant, relevance only
    through the values). Starts at the logit; the result reports Σ map against it (biases, ε and
    the softmax expansion absorb some relevance, so the method does not promise conservation)."""

    name = "attnlrp"
    aliases = ("lrp-transformer",)
    description = "AttnLRP (Achtibat et al. 2024): LRP-ε, softmax linearised, uniform rule on q·kᵀ and A·v; cp: CP-LRP"
    conserving = False
    report_conservation = True
    epsilon: float = option(1e-6, "ε of the Conv / Linear and product rules (0: z-rule, safe division)")
    cp: bool = option(False, "CP-LRP: attention weights held constant, relevance only through the values")

    def rules(self):
        from .. import rules as R

        if self.epsilon:
            lin = R.epsilon(self.epsilon)
        else:
            lin = R.ZRule([R.Term("id", "id")], "safe", use_bias=True, name="z")
        # learned constants added to the data (position embeddings) keep their share, as biases do
        return structural_rules(conv=lin, linear=lin, constant_add=R.ConstantAdd(absorb=True),
                                **attention_rules(self.cp, self.epsilon))

    def check_graph(self, traced) -> Optional[str]:
        """LRP-ε on every layer of a deep CNN lets relevance grow without bound through BatchNorm and
        near-zero denominators (Σ map reached 1e40 × the logit on EfficientNet-B0 and ResNet-50), so
        the composite runs only on models with attention."""
        if not any(n.kind in ("attention", "matmul") for n in traced.nodes):
            return ("the transformer composite needs a model with attention, and this one has none; "
                    "on a CNN use lrp (LRP-α1β0) or lrp-epsilon-plus")
        return None
