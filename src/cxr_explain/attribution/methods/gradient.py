"""The gradient family: autograd from the explained output to the input pixels, through the traced
graph, or through the model itself when torch.fx cannot trace it (:mod:`..hooks`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ...errors import CxrExplainError
from .base import Family, Method, Request, option, register

if TYPE_CHECKING:  # the engine is imported when a method runs, not when the registry is listed
    from torch import Tensor

    from .. import gradients
    from ..explanation import Explanation


@dataclass(frozen=True)
class GradientMethod(Method):
    """Base of the gradient family: :meth:`attribute` turns the input gradient into a per-channel
    attribution; the map is its sum over colour channels."""

    family: ClassVar[Family] = Family.GRADIENT

    @staticmethod
    def logits_of(request: Request) -> gradients.LogitsOf:
        """``x -> logits``: the traced graph where torch.fx traces the model, else the model itself
        (a final sigmoid / softmax skipped either way; the same numbers where both run)."""
        from .. import gradients
        from ..graph import try_trace
        from ..hooks import model_logits

        traced = try_trace(request.model)
        if traced is not None:
            return gradients.traced_logits(traced)
        return lambda x: model_logits(request.model, x)

    def attribute(self, grad: Tensor, x: Tensor) -> Tensor:
        """(K, B, C, H, W) attribution from the input gradient ``∂v/∂x`` of the same shape."""
        raise NotImplementedError

    def explain(self, request: Request) -> Explanation:
        from .. import gradients
        from ..explanation import finish
        from ..targets import select

        x = request.x
        g, logits, sel = gradients.input_gradients(self.logits_of(request), x, lambda y: select(request.target, y, request.labels))
        rel = self.attribute(g, x) * sel.valid.T.reshape(*sel.valid.T.shape, 1, 1, 1)
        return finish(self.name, self.signed, rel.sum(2), logits, sel, input_relevance=rel)


@register
@dataclass(frozen=True)
class Gradient(GradientMethod):
    """``∂v/∂x`` (Simonyan et al. 2014)."""

    name = "gradient"
    aliases = ("saliency",)
    description = "input gradient ∂y/∂x (Simonyan et al. 2014), signed"

    def attribute(self, grad, x):
        return grad


@register
@dataclass(frozen=True)
class GradientXInput(GradientMethod):
    """``x ⊙ ∂v/∂x`` (Shrikumar et al. 2016; equals LRP-0 on bias-free ReLU networks)."""

    name = "gradient-x-input"
    aliases = ("gxi", "input-x-gradient")
    description = "gradient × input x ⊙ ∂y/∂x"

    def attribute(self, grad, x):
        return grad * x.unsqueeze(0)


@register
@dataclass(frozen=True)
class IntegratedGradients(GradientMethod):
    """``(x − x̄) ⊙ (1/m) Σ_{k=1..m} ∂v/∂x |_{x̄ + (k−½)/m (x − x̄)}`` (Sundararajan et al. 2017;
    midpoint rule, baseline x̄ = 0: the mean image for ImageNet-normalised inputs)."""

    name = "integrated-gradients"
    aliases = ("ig",)
    description = "integrated gradients from a zero baseline (midpoint rule, `steps` points)"
    steps: int = option(32, "points on the path from the baseline to the image")

    def explain(self, request: Request) -> Explanation:
        if self.steps < 1:
            raise CxrExplainError(f"integrated-gradients: steps={self.steps}; use at least 1")
        import torch

        from .. import gradients
        from ..explanation import finish
        from ..targets import select

        logits_of = self.logits_of(request)
        x = request.x
        with torch.no_grad():
            logits = logits_of(x)
        sel = select(request.target, logits, request.labels)
        rel = gradients.integrated_gradients(logits_of, x, sel, steps=self.steps)
        rel = rel * sel.valid.T.reshape(*sel.valid.T.shape, 1, 1, 1)
        return finish(self.name, self.signed, rel.sum(2), logits, sel, input_relevance=rel)
