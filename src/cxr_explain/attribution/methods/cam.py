"""The CAM family: a weighted low-resolution feature map, upsampled (bilinear) to the input.

A Grad-CAM variant is one subclass of :class:`GradCamFamily` overriding :meth:`channel_weights`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...errors import CxrExplainError
from .. import cam as cam_maps
from ..explanation import Explanation, finish
from ..graph import trace
from ..targets import Selection, select
from .base import Family, Method, Request, register

Tensor = torch.Tensor


@dataclass(frozen=True)
class CamMethod(Method):
    """Base of the CAM family: maps are non-negative or CAM-like (shown blended, not signed)."""

    family: ClassVar[Family] = Family.CAM
    signed: ClassVar[bool] = False

    def finish(self, raw: Tensor, logits: Tensor, sel: Selection, x: Tensor, layer: str = None,
               layout: str = "channels-first") -> Explanation:
        """Upsample the (K, B, h, w) maps to the input size and lay them out."""
        k, b, h, w = raw.shape
        up = F.interpolate(raw.reshape(k * b, 1, h, w), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return finish(self.name, self.signed, up.reshape(k, b, *x.shape[-2:]), logits, sel, raw_maps=raw,
                      feature_layer=layer, feature_layout=layout)


@register
@dataclass(frozen=True)
class Cam(CamMethod):
    """CAM (Zhou et al. 2016): ``M = Σ_c w_c A_c`` with the classifier row ``w`` of the explained
    class, on the map the global average pool reads; GAP → Linear heads only."""

    name = "cam"
    description = "class activation map: classifier weights × the last feature map (GAP → Linear heads)"

    def explain(self, request: Request) -> Explanation:
        if request.layer is not None:
            raise CxrExplainError("CAM reads the feature map before the global pool; layer= is for gradcam")
        traced = trace(request.model)
        raw, logits, sel = cam_maps.cam(traced, request.x, lambda y: select(request.target, y, request.labels))
        head, gap = cam_maps.cam_head(traced)
        src = gap.inputs[0]
        return self.finish(raw, logits, sel, request.x, layer=src.module_path or src.name)


@dataclass(frozen=True)
class GradCamFamily(CamMethod):
    """``ReLU(Σ_c α_c A_c)`` at the last spatial map (or ``layer``) with ``α = channel_weights(A, g)``,
    ``g = ∂v/∂A``."""

    def channel_weights(self, A: Tensor, g: Tensor) -> Tensor:
        raise NotImplementedError

    def explain(self, request: Request) -> Explanation:
        traced = trace(request.model)
        raw, logits, sel, feat = cam_maps.gradcam(traced, request.x, lambda y: select(request.target, y, request.labels),
                                                  layer=request.layer, channel_weights=self.channel_weights)
        return self.finish(raw, logits, sel, request.x, layer=feat.module_path or feat.name)


@register
@dataclass(frozen=True)
class GradCam(GradCamFamily):
    """Grad-CAM (Selvaraju et al. 2017): ``α_c = mean_hw g_c``."""

    name = "gradcam"
    aliases = ("grad-cam",)
    description = "Grad-CAM: ReLU(Σ_c mean(∂y/∂A_c) A_c) at the last spatial map or --layer"

    def channel_weights(self, A, g):
        return cam_maps.gradcam_weights(A, g)


@register
@dataclass(frozen=True)
class GradCamPlusPlus(GradCamFamily):
    """Grad-CAM++ (Chattopadhay et al. 2018), the exponential-free closed form."""

    name = "gradcam++"
    aliases = ("grad-cam++", "gradcampp")
    description = "Grad-CAM++: second-order channel weights Σ ReLU(g)·g²/(2g² + ΣA·g³)"

    def channel_weights(self, A, g):
        return cam_maps.gradcampp_weights(A, g)
