"""``explain(model, images, method, target)``: the public entry point of the engine.

It prepares the model (eval mode, the working dtype, TF32 off on CUDA) and the input, turns
``target`` into a :class:`~.targets.Target` and ``method`` into a configured
:class:`~.methods.Method`, and lets the method run itself (:meth:`Method.explain`).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

from ..errors import CxrExplainError
from .methods import Method, Request, get_method

if TYPE_CHECKING:  # torch is imported on the first call (the package imports this module)
    import torch
    import torch.nn as nn
    from torch import Tensor

    from .explanation import Explanation
    from .targets import TargetSpec


def model_labels(model: nn.Module) -> Optional[list[str]]:
    spec = getattr(model, "cxr_spec", None)
    labels = getattr(spec, "labels", None) if spec is not None else getattr(model, "labels", None)
    return list(labels) if labels else None


class _EvalMode:
    """Put a model in eval mode for the duration of a call, then restore its flags."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = {m: m.training for m in self.model.modules()}
        self.model.eval()

    def __exit__(self, *exc):
        for m, flag in self.flags.items():
            m.training = flag


def _model_in(model: nn.Module, dtype: Optional[torch.dtype]) -> nn.Module:
    p = next(model.parameters(), None)
    if dtype is None or p is None or p.dtype == dtype:
        return model
    return copy.deepcopy(model).to(dtype)


@contextmanager
def full_fp32(device: torch.device) -> Iterator[None]:
    """Turn TF32 off for cuDNN convolutions and CUDA matrix products while explaining on a GPU, and
    restore the user's settings afterwards. TF32 keeps 10 mantissa bits; relevance ratios amplify
    that: on an H100 with TF32 on, float32 LRP maps of a trained DenseNet-121 differed from the CPU's
    by 85 % of max|map| (plain gradients by 1 %), where CPU float32 stays within 5 % of float64."""
    if device.type != "cuda":
        yield
        return
    import torch

    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def explain(
    model: nn.Module,
    images: Tensor,
    method: Union[str, Method] = "lrp",
    target: TargetSpec = "predicted",
    *,
    dtype: Optional[torch.dtype] = None,
    layer: Optional[str] = None,
    return_input_relevance: bool = False,
    check_conservation: bool = True,
    method_options: Optional[dict[str, Any]] = None,
    keep_relevance: Sequence[str] = (),
    **options: Any,
) -> Explanation:
    """Explain ``model``'s outputs on ``images`` (B, C, H, W) — or (C, H, W) — with ``method``.

    ``method``: a name (``cxr-explain methods`` lists them) or a configured method object;
    its options as ``method_options={"epsilon": 0.1}`` or keywords (``epsilon=0.1``).
    ``target``: ``"predicted"`` (arg-max logit), a class index, a label name, a contrast
    ``"Pneumonia-vs-No Finding"`` (explains ``y_a − y_b``), ``"prob:Pneumonia"``, one target per image,
    a list of targets per image (all explained in one pass; ragged lists padded with −1), a
    :class:`~.targets.Target`, or a function of the logits (gradient-family methods).
    ``dtype``: e.g. ``torch.float64`` for reference-grade numbers (the model is copied).
    ``layer``: the CAM family's feature layer (module path or node name; default: the last spatial map).
    ``keep_relevance``: layers (module path or node name) whose output relevance to return.

    A torchxrayvision ``DenseNet`` / ``ResNet`` is explained through its logits (before xrv's
    sigmoid and ``op_norm``), with its ``pathologies`` as label names (:mod:`cxr_explain.models.xrv`).
    """
    import torch

    from ..models.xrv import explainable_model
    from .targets import as_target

    m = get_method(method, **{**(method_options or {}), **options})
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise CxrExplainError(f"images must be (B, C, H, W); got shape {tuple(images.shape)}")
    tgt = as_target(target)
    model = explainable_model(model, images)  # torchxrayvision classifiers: their logits, traceable
    labels = model_labels(model)
    net = _model_in(model, dtype)
    p = next(net.parameters(), None)
    x = images.to(device=p.device if p is not None else images.device,
                  dtype=dtype or (p.dtype if p is not None else images.dtype))
    if not torch.isfinite(x).all():
        raise CxrExplainError("the input images contain NaN or Inf values; check the preprocessing")
    request = Request(net, x, tgt, labels, layer=layer, keep_relevance=tuple(keep_relevance),
                      check_conservation=check_conservation)
    with _EvalMode(net), full_fp32(x.device):
        exp = m.explain(request)
    if not return_input_relevance:
        exp.input_relevance = None
    if not torch.isfinite(exp.maps).all():
        raise CxrExplainError(f"method {m.name!r} produced NaN/Inf relevance; try dtype=torch.float64 or another method")
    return exp
