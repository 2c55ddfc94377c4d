"""RAP, Relative Attributing Propagation (Nam et al., AAAI 2020), as the authors' code computes it
(docs/rules.md §2), with our DenseNet extension; and ``rap-noshift`` for ablations."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

from .base import register
from .propagation import PropagationMethod, attention_rules, classic_graph, structural_rules

if TYPE_CHECKING:
    from ..graph import TracedModel


@register
@dataclass(frozen=True)
class Rap(PropagationMethod):
    """First step with absolute influence normalisation at the head, the relative-influence hidden
    rule with the uniform shift, zᴮ (safe division) on the first layer, BatchNorm masked
    pass-through (plain pass-through in DenseNet, :meth:`graph_rules`), pools and ``+`` proportional.
    Max-pools send the relevance of all-zero windows to the arg-max (DenseNet's stem: pool0 outputs
    equal to 0 that norm1's bias makes active; the authors' 0/0 = 0 lost it — identical elsewhere)."""

    name = "rap"
    description = "Relative Attributing Propagation (Nam et al. 2020), the authors' rules; Σ map = logit"
    start = "one"
    shift: ClassVar[bool] = True  # the uniform shift; rap-noshift is the method without it

    def rules(self):
        from .. import rules as R

        hidden = R.RapHidden(shift=self.shift)
        # attention (ours, docs/rules.md §10.9): CP-LRP's, the conserving one; AttnLRP's softmax rule
        # loses the share of its linearisation's bias, which RAP's Σ map = logit cannot absorb
        rules = structural_rules(conv=hidden, linear=hidden, batchnorm=R.MaskedPass(),
                                 maxpool=R.WinnerTakesAll(zero_windows="argmax"), **attention_rules(cp=True))
        rules[("linear", "head")] = R.RapFirstStep()
        rules[("conv", "first")] = R.zbox("safe")
        rules[("linear", "first")] = R.zbox("safe")
        return rules

    def graph_rules(self, traced: TracedModel):
        """BatchNorm is the identity (``Pass``) in DenseNets (our extension, docs/rules.md §2.11),
        recognised by a BatchNorm that reads a concatenation (a dense layer's norm1; GoogLeNet-style
        branch concatenations do not count), and in every graph with an op the authors' code never
        handled: a grouped / depthwise convolution or any op of §9 (§9.5). The authors' mask
        ``R ⊙ [x ≠ 0]`` (§2.7) is kept for the graphs they ran (VGG, ResNet), where it is in practice
        all ones. Elsewhere it is not: a convolution outputs exactly 0 where its whole input window is
        0 (a dense layer's 1×1 conv, a 3×3 depthwise conv after ReLU), the BatchNorm's bias makes that
        unit active, the next layer sends it relevance and the mask drops it (Σ map was 8× the logit
        on a trained DenseNet, 2× on a random MobileNetV2). Passed through, it reaches the
        convolution, whose uniform shift conserves it."""
        from .. import rules as R

        from ..graph import NON_TENSOR_KINDS

        dense = any(n.kind == "batchnorm" and n.inputs and n.inputs[0].kind == "cat" for n in traced.nodes)
        rules = {"batchnorm": R.Pass()} if dense or not classic_graph(traced) else {}
        # a learned token concatenated to the data (a ViT's class token): its share is shifted back
        # onto the data, as RAP does for the biases it leaves out (docs/rules.md §10.9)
        if any(n.kind == "cat" and not all(i.data for i in n.inputs if i.kind not in NON_TENSOR_KINDS)
               for n in traced.relevant_nodes()):
            rules["cat"] = R.RapConstantCat()
        return rules

    def check_graph(self, traced: TracedModel) -> Optional[str]:
        head = [n for n in traced.nodes if n.role == "head"]
        if not head or head[0].kind != "linear":
            return "RAP needs a model whose logits come from a Linear layer (its first step happens there)"
        return None


@register
@dataclass(frozen=True)
class RapNoShift(Rap):
    """RAP without the uniform shift (ours, for ablations: not conserving)."""

    name = "rap-noshift"
    description = "RAP without the uniform shift (ours, for ablations; not conserving)"
    conserving = False
    shift = False
