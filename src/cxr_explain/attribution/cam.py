"""Class activation maps from the traced graph's last spatial feature map.

* CAM (Zhou et al. 2016): ``M_t = Σ_c w_tc A_c`` with ``A`` the feature map that the global average
  pool reads (after DenseNet's final functional ReLU) and ``w`` the classifier weights (no bias).
  Defined only for GAP → Linear heads.
* Grad-CAM (Selvaraju et al. 2017): ``M_t = ReLU(Σ_c α_c A_c)``, ``α_c = mean_hw ∂y_t/∂A_c``.
* Grad-CAM++ (Chattopadhay et al. 2018): ``α_c = Σ_hw ReLU(g) · g²/(2g² + Σ_hw A · g³)`` with
  ``g = ∂y_t/∂A`` and 1e-6 added to the denominator (the exponential-free closed form).

The backward stops at ``A`` (the forward detaches it there), runs on the out-of-place graph (no
in-place ReLU hook crash on DenseNet) and never leaves torch.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import CxrExplainError
from .gradients import Choose, per_target_gradients
from .graph import ForwardRecord, LayerNode, TracedModel, record_forward
from .targets import Selection

Tensor = torch.Tensor


def last_spatial_node(traced: TracedModel, record: ForwardRecord) -> LayerNode:
    """Walk back from the logits to the first node whose output is (B, C, H, W) with H·W > 1."""
    node = traced.logits
    seen = set()
    while node is not None and node.name not in seen:
        seen.add(node.name)
        v = record.values.get(node.name)
        if isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[-1] * v.shape[-2] > 1:
            return node
        tensor_inputs = [n for n in node.inputs if isinstance(record.values.get(n.name), torch.Tensor)]
        node = tensor_inputs[0] if tensor_inputs else None
    raise CxrExplainError("found no spatial feature map (B, C, H, W) feeding the logits; pass layer=…")


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


ChannelWeights = Callable[[Tensor, Tensor], Tensor]  # (A, ∂v/∂A) (B, C, h, w) -> α (B, C, 1, 1)


def cam(traced: TracedModel, x: Tensor, choose: Choose) -> tuple[Tensor, Tensor, Selection]:
    """CAM maps (K, B, h, w) at feature resolution, plus logits (B, n) and the selection.

    ``M = Σ_c (Σ_n s_n W_nc) A_c`` for seed ``s`` (a class: its classifier row; a contrast: the
    difference of two rows). One forward that keeps only the pooled feature map and the logits."""
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
        W = head.module.weight.detach()
        w = torch.einsum("bkn,nc->kbc", sel.weights.to(W.dtype), W)  # (K, B, C) seed-weighted rows
        maps = torch.einsum("kbc,bchw->kbhw", w, A)
    return maps, logits, sel


def default_feature_node(traced: TracedModel, x: Tensor) -> LayerNode:
    """The last spatial feature map for inputs of this size (found once per size, then cached)."""
    cache = traced.__dict__.setdefault("_spatial_node", {})
    key = tuple(x.shape[1:])
    if key not in cache:
        with torch.no_grad():
            probe = record_forward(traced, x[:1])
        cache[key] = last_spatial_node(traced, probe)
    return cache[key]


def gradcam_weights(A: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM: ``α_c = mean_hw ∂v/∂A_c``."""
    return g.mean((2, 3), keepdim=True)


def gradcampp_weights(A: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM++: ``α_c = Σ_hw ReLU(g) · g² / (2g² + Σ_hw A · g³ + 1e-6)`` (0 where g = 0)."""
    g2, g3 = g * g, g * g * g
    sum_a = A.sum((2, 3), keepdim=True)
    aij = torch.where(g != 0, g2 / (2 * g2 + sum_a * g3 + 1e-6), torch.zeros_like(g))
    return (F.relu(g) * aij).sum((2, 3), keepdim=True)


def gradcam(
    traced: TracedModel, x: Tensor, choose: Choose, layer: Optional[str] = None,
    channel_weights: ChannelWeights = gradcam_weights,
) -> tuple[Tensor, Tensor, Selection, LayerNode]:
    """``ReLU(Σ_c α_c A_c)`` with ``α = channel_weights(A, ∂v/∂A)``: maps (K, B, h, w) at the feature
    layer's resolution, logits (B, n), the selection and the feature node used."""
    feat = traced.find(layer) if layer is not None else default_feature_node(traced, x)
    with torch.enable_grad():
        record = record_forward(traced, x.detach(), detach_at=feat, keep={feat.name})
        A = record[feat]
        if not isinstance(A, Tensor) or A.dim() != 4:
            raise CxrExplainError(f"Grad-CAM layer {feat!r} does not output a (B, C, H, W) feature map")
        logits = record[traced.logits]
        sel = choose(logits.detach())
        maps = [F.relu((channel_weights(A, g) * A).sum(1)).detach() for _, g in per_target_gradients(logits, A, sel)]
    return torch.stack(maps), logits.detach(), sel, feat
