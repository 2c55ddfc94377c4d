"""The CAM family: a weighted low-resolution feature map, upsampled (bilinear) to the input.

A Grad-CAM variant is one subclass of :class:`GradCamFamily` overriding :meth:`channel_weights`.
Every method runs on the traced graph where torch.fx traces the model, else on the model itself
with forward hooks (:mod:`..hooks`); the result states the feature layer and its layout."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ...errors import CxrExplainError
from .base import Family, Method, Request, register

if TYPE_CHECKING:  # the engine is imported when a method runs, not when the registry is listed
    from torch import Tensor

    from ..explanation import Explanation
    from ..targets import Selection


@dataclass(frozen=True)
class CamMethod(Method):
    """Base of the CAM family: maps are non-negative or CAM-like (shown blended, not signed)."""

    family: ClassVar[Family] = Family.CAM
    signed: ClassVar[bool] = False

    def finish(self, raw: Tensor, logits: Tensor, sel: Selection, x: Tensor, layer: str = None,
               layout: str = "channels-first") -> Explanation:
        """Upsample the (K, B, h, w) maps to the input size and lay them out."""
        import torch.nn.functional as F

        from ..explanation import finish

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
        from .. import cam as cam_maps
        from .. import hooks
        from ..graph import try_trace
        from ..targets import select

        choose = lambda y: select(request.target, y, request.labels)  # noqa: E731
        traced = try_trace(request.model)
        if traced is not None:
            try:
                head, gap = cam_maps.cam_head(traced)
            except CxrExplainError:
                traced = None  # e.g. a channels-last mean: the module path below may still find the GAP
        if traced is None:
            raw, logits, sel, pool, layout = hooks.cam(request.model, request.x, choose)
            return self.finish(raw, logits, sel, request.x, layer=f"input of {pool}", layout=layout.kind)
        raw, logits, sel = cam_maps.cam(traced, request.x, choose)
        src = gap.inputs[0]
        return self.finish(raw, logits, sel, request.x, layer=traced.name_of(src))


@dataclass(frozen=True)
class GradCamFamily(CamMethod):
    """``ReLU(Σ_c α_c A_c)`` at the last spatial map (or ``layer``) with ``α = channel_weights(A, g)``,
    ``g = ∂v/∂A``."""

    def channel_weights(self, A: Tensor, g: Tensor) -> Tensor:
        raise NotImplementedError

    def explain(self, request: Request) -> Explanation:
        from .. import cam as cam_maps
        from .. import hooks
        from ..graph import try_trace
        from ..layouts import declared_prefix_tokens
        from ..targets import select

        choose = lambda y: select(request.target, y, request.labels)  # noqa: E731
        prefix = declared_prefix_tokens(request.model)
        traced = try_trace(request.model)
        if traced is None:
            raw, logits, sel, name, layout = hooks.gradcam(request.model, request.x, choose, layer=request.layer,
                                                           channel_weights=self.channel_weights, prefix_tokens=prefix)
        else:
            raw, logits, sel, feat, layout = cam_maps.gradcam(traced, request.x, choose, layer=request.layer,
                                                              channel_weights=self.channel_weights, prefix_tokens=prefix)
            name = traced.name_of(feat)
        return self.finish(raw, logits, sel, request.x, layer=name, layout=layout.kind)


@register
@dataclass(frozen=True)
class GradCam(GradCamFamily):
    """Grad-CAM (Selvaraju et al. 2017): ``α_c = mean_hw g_c``."""

    name = "gradcam"
    aliases = ("grad-cam",)
    description = "Grad-CAM: ReLU(Σ_c mean(∂y/∂A_c) A_c) at the last spatial map or --layer"

    def channel_weights(self, A, g):
        from .. import cam as cam_maps

        return cam_maps.gradcam_weights(A, g)


@register
@dataclass(frozen=True)
class GradCamPlusPlus(GradCamFamily):
    """Grad-CAM++ (Chattopadhay et al. 2018), the exponential-free closed form."""

    name = "gradcam++"
    aliases = ("grad-cam++", "gradcampp")
    description = "Grad-CAM++: second-order channel weights Σ ReLU(g)·g²/(2g² + ΣA·g³)"

    def channel_weights(self, A, g):
        from .. import cam as cam_maps

        return cam_maps.gradcampp_weights(A, g)
