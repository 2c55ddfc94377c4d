"""The gradient family: autograd from the explained output to the input pixels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import CxrExplainError
from .. import gradients
from ..explanation import Explanation, finish
from ..graph import record_forward, trace
from ..targets import select
from .base import Family, Method, Request, option, register

Tensor = torch.Tensor


@dataclass(frozen=True)
class GradientMethod(Method):
    """Base of the gradient family: :meth:`attribute` turns the input gradient into a per-channel
    attribution; the map is its sum over colour channels."""

    family: ClassVar[Family] = Family.GRADIENT

    def attribute(self, grad: Tensor, x: Tensor) -> Tensor:
        """(K, B, C, H, W) attribution from the input gradient ``∂v/∂x`` of the same shape."""
        raise NotImplementedError

    def explain(self, request: Request) -> Explanation:
        traced = trace(request.model)
        x = request.x
        g, logits, sel = gradients.input_gradients(traced, x, lambda y: select(request.target, y, request.labels))
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
        traced = trace(request.model)
        x = request.x
        with torch.no_grad():
            logits = record_forward(traced, x, keep=set())[traced.logits]
        sel = select(request.target, logits, request.labels)
        rel = gradients.integrated_gradients(traced, x, sel, steps=self.steps)
        rel = rel * sel.valid.T.reshape(*sel.valid.T.shape, 1, 1, 1)
        return finish(self.name, self.signed, rel.sum(2), logits, sel, input_relevance=rel)
