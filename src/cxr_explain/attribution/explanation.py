"""The result of :func:`cxr_explain.explain`, and how methods lay their (K, B, …) results out."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .targets import Selection

Tensor = torch.Tensor


@dataclass
class Explanation:
    """The result of :func:`cxr_explain.explain`.

    ``maps``: heatmaps, (B, H, W) for one target per image or (B, K, H, W) when a list of targets
    per image was given; pixel-space methods sum the input relevance over colour channels,
    CAM-family methods give the class map upsampled (bilinear) to the input size.
    ``signed``: the maps are signed (red relevant / blue irrelevant) rather than CAM-like (≥ 0).
    ``raw_maps``: CAM-family maps at feature resolution (e.g. 7×7), same layout. ``targets``: the
    class each map is named after (−1: padding or a function target); ``target_names``: display
    names per image (``"Pneumonia-vs-No Finding"`` for a contrast); ``explained``: the explained
    output (the logit, a contrast, a probability; NaN for padding).
    ``layer_sums``: Σ relevance at each node's output (node name -> same layout as ``explained``).
    ``leaks``: per node, the relevance its rule lost (Σ at its output − Σ passed to its inputs).
    ``relevances``: the full relevance at the nodes named in ``keep_relevance``.
    ``conservation_error``: |Σ map − explained| / |explained| for conserving methods, else None.
    ``feature_layer`` / ``feature_layout``: for CAM-family methods, the layer whose map was used and
    its layout (``channels-first``, ``channels-last``, ``tokens``).
    """

    method: str
    maps: Tensor
    logits: Tensor
    targets: Tensor
    explained: Tensor
    signed: bool = True
    target_names: list = field(default_factory=list)
    input_relevance: Optional[Tensor] = None
    raw_maps: Optional[Tensor] = None
    layer_sums: dict[str, Tensor] = field(default_factory=dict)
    leaks: dict[str, Tensor] = field(default_factory=dict)
    relevances: dict[str, Tensor] = field(default_factory=dict)
    conservation_error: Optional[Tensor] = None
    feature_layer: Optional[str] = None
    feature_layout: Optional[str] = None

    def numpy(self):
        return self.maps.detach().cpu().numpy()


def finish(method: str, signed: bool, maps_kb: Tensor, logits: Tensor, sel: Selection, **extra: Any) -> Explanation:
    """Lay (K, B, …) results out as (B, K, …) — or (B, …) when one target per image was asked —
    and attach the explained outputs. Tensors in ``extra`` shaped (K, B, …) and dicts of them are
    laid out the same way; anything else is passed through."""
    per_image = sel.per_image
    kb = maps_kb.shape[:2]

    def layout(t: Tensor) -> Tensor:
        t = t.transpose(0, 1)
        return t if per_image else t[:, 0]

    out: dict[str, Any] = {}
    for key, v in extra.items():
        if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[:2] == kb:
            out[key] = layout(v)
        elif isinstance(v, dict):
            out[key] = {n: layout(t) if isinstance(t, Tensor) and t.shape[:2] == kb else t for n, t in v.items()}
        else:
            out[key] = v
    explained = sel.explained(logits)
    targets, names = sel.classes, sel.names
    if not per_image:
        explained, targets, names = explained[:, 0], targets[:, 0], [row[0] for row in names]
    return Explanation(method=method, maps=layout(maps_kb), logits=logits, targets=targets, explained=explained,
                       signed=signed, target_names=names, **out)
