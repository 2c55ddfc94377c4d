"""Class activation maps, on the traced graph (this module) or on the model's modules (:mod:`.hooks`).

* CAM (Zhou et al. 2016): ``M_t = Σ_c w_tc A_c`` with ``A`` the feature map that the global average
  pool reads (after DenseNet's final functional ReLU) and ``w`` the classifier weights (no bias).
  Defined only for GAP → Linear heads.
* Grad-CAM (Selvaraju et al. 2017): ``M_t = ReLU(Σ_c α_c A_c)``, ``α_c = mean_hw ∂y_t/∂A_c``.
* Grad-CAM++ (Chattopadhay et al. 2018): ``α_c = Σ_hw ReLU(g) · g²/(2g² + Σ_hw A · g³)`` with
  ``g = ∂y_t/∂A`` and 1e-6 added to the denominator (the exponential-free closed form).

``A`` is read in its layout (:mod:`.layouts`: channels-first, channels-last or tokens) and viewed as
``(B, C, h, w)`` before the formulas apply. The backward stops at ``A`` (the forward detaches it
there), runs on the out-of-place graph (no in-place ReLU hook crash on DenseNet) and never leaves torch.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import CxrExplainError
from .gradients import Choose, per_target_gradients
from .graph import LayerNode, TracedModel, record_forward
from .layouts import CHANNELS_FIRST, Candidate, Layout, choose_feature, layout_of
from .targets import Selection

Tensor = torch.Tensor
ChannelWeights = Callable[[Tensor, Tensor], Tensor]  # (A, ∂v/∂A) (B, C, h, w) -> α (B, C, 1, 1)


def gradcam_weights(A: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM: ``α_c = mean_hw ∂v/∂A_c``."""
    return g.mean((2, 3), keepdim=True)


def gradcampp_weights(A: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM++: ``α_c = Σ_hw ReLU(g) · g² / (2g² + Σ_hw A · g³ + 1e-6)`` (0 where g = 0)."""
    g2, g3 = g * g, g * g * g
    sum_a = A.sum((2, 3), keepdim=True)
    aij = torch.where(g != 0, g2 / (2 * g2 + sum_a * g3 + 1e-6), torch.zeros_like(g))
    return (F.relu(g) * aij).sum((2, 3), keepdim=True)


def weighted_maps(A_raw: Tensor, logits: Tensor, sel: Selection, layout: Layout,
                  channel_weights: ChannelWeights) -> Tensor:
    """``ReLU(Σ_c α_c A_c)`` per target slot, (K, B, h, w): ``A_raw`` is the feature map in ``layout``
    (a leaf of the graph that produced ``logits``), viewed as (B, C, h, w) with its gradients."""
    A = layout.to_nchw(A_raw).detach()
    maps = []
    for _, g in per_target_gradients(logits, A_raw, sel):
        maps.append(F.relu((channel_weights(A, layout.to_nchw(g)) * A).sum(1)).detach())
    return torch.stack(maps)


def seed_weighted_cam(A: Tensor, W: Tensor, sel: Selection) -> Tensor:
    """CAM ``M = Σ_c (Σ_n s_n W_nc) A_c`` for seeds ``s`` (K, B, h, w) from A (B, C, h, w), W (n, C)."""
    w = torch.einsum("bkn,nc->kbc", sel.weights.to(W.dtype), W)  # (K, B, C) seed-weighted rows
    return torch.einsum("kbc,bchw->kbhw", w, A)


# ---------------------------------------------------------------------------------------------
# On the traced graph
# ---------------------------------------------------------------------------------------------


def head_width(traced: TracedModel) -> Optional[int]:
    """Input width of the Linear layer that produces the logits, or None."""
    head = next((n for n in traced.nodes if n.role == "head"), None)
    return getattr(head.module, "in_features", None) if head is not None and head.kind == "linear" else None


def cam_head(traced: TracedModel) -> tuple[LayerNode, LayerNode]:
    """(head linear, global-average-pool node) of a GAP → (flatten) → Linear head, or an error."""
    head = next((n for n in traced.nodes if n.role == "head"), None)
    if head is None or head.kind != "linear":
        raise CxrExplainError("CAM needs logits from a Linear layer after global average pooling; use gradcam")
    node = head.inputs[0]
    while node.kind in ("reshape", "identity"):
        node = node.inputs[0]
    if node.kind != "adaptive_avgpool":
        raise CxrExplainError(
            f"CAM needs global average pooling right before the classifier ({head.module_path} reads "
            f"{node.op}); use gradcam for this architecture"
        )
    return head, node


def cam(traced: TracedModel, x: Tensor, choose: Choose) -> tuple[Tensor, Tensor, Selection]:
    """CAM maps (K, B, h, w) at feature resolution, plus logits (B, n) and the selection.

    One forward that keeps only the pooled feature map and the logits."""
    head, gap = cam_head(traced)
    with torch.no_grad():
        record = record_forward(traced, x, keep={gap.inputs[0].name, gap.name})
        logits = record[traced.logits]
        sel = choose(logits)
        if not sel.linear:
            raise CxrExplainError("CAM explains classes, findings and contrasts; use gradcam for function targets")
        A = record[gap.inputs[0]]
        if A.dim() != 4:
            raise CxrExplainError(f"CAM: the pooled feature map at {gap.inputs[0].name!r} is not (B, C, H, W)")
        out = record[gap]
        if out.shape[-1] * out.shape[-2] != 1:
            raise CxrExplainError("CAM needs a global (1×1) average pool before the classifier; use gradcam")
        maps = seed_weighted_cam(A, head.module.weight.detach(), sel)
    return maps, logits, sel


def default_feature_node(traced: TracedModel, x: Tensor, prefix_tokens: Optional[int] = None) -> tuple[LayerNode, Layout]:
    """The last spatial feature map the logits depend on, for inputs of this size, and its layout
    (:func:`.layouts.choose_feature`; found once per input size on one image, then cached)."""
    cache = traced.__dict__.setdefault("_spatial_node", {})
    key = (tuple(x.shape[1:]), prefix_tokens)
    if key not in cache:
        with torch.enable_grad():
            probe = record_forward(traced, x[:1].detach().requires_grad_(True))
            total = probe[traced.logits].sum()
            cands = [Candidate(n.module_path or n.name, probe.values[n.name], n) for n in traced.relevant_nodes()
                     if n is not traced.input and isinstance(probe.values.get(n.name), Tensor)]

            def gradient(c: Candidate) -> Optional[Tensor]:
                if not c.value.requires_grad:
                    return None
                return torch.autograd.grad(total, c.value, retain_graph=True, allow_unused=True)[0]

            cand, layout = choose_feature(cands, tuple(x.shape[-2:]), gradient, head_width(traced), prefix_tokens)
        cache[key] = (cand.key, layout)
    return cache[key]


def gradcam(
    traced: TracedModel, x: Tensor, choose: Choose, layer: Optional[str] = None,
    channel_weights: ChannelWeights = gradcam_weights, prefix_tokens: Optional[int] = None,
) -> tuple[Tensor, Tensor, Selection, LayerNode, Layout]:
    """``ReLU(Σ_c α_c A_c)`` with ``α = channel_weights(A, ∂v/∂A)``: maps (K, B, h, w) at the feature
    layer's resolution, logits (B, n), the selection, the feature node used and its layout."""
    if layer is None:
        feat, layout = default_feature_node(traced, x, prefix_tokens)
    else:
        feat, layout = traced.find(layer), None
    with torch.enable_grad():
        record = record_forward(traced, x.detach(), detach_at=feat, keep={feat.name})
        A = record[feat]
        if not isinstance(A, Tensor):
            raise CxrExplainError(f"Grad-CAM layer {feat!r} does not output a tensor; choose another layer")
        if layout is None:
            layout = layout_of(layer, tuple(A.shape), tuple(x.shape[-2:]), prefix_tokens, head_width(traced))
        logits = record[traced.logits]
        sel = choose(logits.detach())
        maps = weighted_maps(A, logits, sel, layout, channel_weights)
    return maps, logits.detach(), sel, feat, layout


__all__ = ["CHANNELS_FIRST", "ChannelWeights", "cam", "cam_head", "default_feature_node", "gradcam",
           "gradcam_weights", "gradcampp_weights", "head_width", "seed_weighted_cam", "weighted_maps"]
