"""``explain(model, images, method, target)``: the public entry point of the engine."""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CxrExplainError
from . import cam as cam_mod
from . import gradients
from .graph import TracedModel, record_forward, trace
from .methods import (CAM_METHODS, GRADIENT_METHODS, PROPAGATION_METHODS, get_propagation_method,
                      resolve_method_name)
from .propagation import propagate

Tensor = torch.Tensor
TargetSpec = Union[int, str, Sequence[int], Sequence[Sequence[int]], Tensor]

CONSERVATION_TOLERANCE = 1e-3


@dataclass
class Explanation:
    """The result of :func:`explain`.

    ``maps``: signed heatmaps, (B, H, W) for one target per image or (B, K, H, W) when a list of
    targets per image was given; pixel-space methods sum the input relevance over colour channels,
    CAM-type methods give the class map upsampled (bilinear) to the input size.
    ``raw_maps``: CAM-type maps at feature resolution (e.g. 7×7), same layout. ``targets`` /
    ``explained``: the explained class per map and its logit (−1 / NaN for padding).
    ``layer_sums``: Σ relevance at each node's output (node name -> same layout as ``explained``).
    ``leaks``: per node, the relevance its rule lost (Σ at its output − Σ passed to its inputs).
    ``relevances``: the full relevance at the nodes named in ``keep_relevance`` (module path or
    node name), laid out like ``maps`` with the node's own shape.
    ``conservation_error``: |Σ map − logit| / |logit| for conserving methods, else None.
    """

    method: str
    maps: Tensor
    logits: Tensor
    targets: Tensor
    explained: Tensor
    input_relevance: Optional[Tensor] = None
    raw_maps: Optional[Tensor] = None
    layer_sums: dict[str, Tensor] = field(default_factory=dict)
    leaks: dict[str, Tensor] = field(default_factory=dict)
    relevances: dict[str, Tensor] = field(default_factory=dict)
    conservation_error: Optional[Tensor] = None

    def numpy(self):
        return self.maps.detach().cpu().numpy()


def resolve_targets(target: TargetSpec, logits: Tensor, labels: Optional[Sequence[str]] = None) -> tuple[Tensor, bool]:
    """Targets as a (B, K) long tensor (−1 = padding) and whether the caller asked for K per image."""
    b, n = logits.shape
    if isinstance(target, str):
        if target == "predicted":
            return logits.argmax(1, keepdim=True), False
        return torch.full((b, 1), _label_index(target, labels, n), dtype=torch.long), False
    if isinstance(target, Tensor):
        t = target.detach().cpu().long()
        if t.dim() == 0:
            return t.view(1, 1).expand(b, 1).clone(), False
        if t.dim() == 1:
            if t.numel() != b:
                raise CxrExplainError(f"got {t.numel()} targets for {b} images: give one target per image")
            return t.view(b, 1), False
        if t.shape[0] != b:
            raise CxrExplainError(f"got target lists for {t.shape[0]} images but the batch has {b}")
        _check_range(t, n)
        return t, True
    if isinstance(target, int):
        _check_range(torch.tensor([[target]]), n)
        return torch.full((b, 1), target, dtype=torch.long), False
    target = list(target)
    if len(target) != b:
        raise CxrExplainError(f"got {len(target)} targets for {b} images: give one target (or one list) per image")
    if all(isinstance(t, (int, str)) for t in target):
        t = torch.tensor([[_label_index(x, labels, n) if isinstance(x, str) else x] for x in target])
        _check_range(t, n)
        return t, False
    lists = [[_label_index(x, labels, n) if isinstance(x, str) else int(x) for x in row] for row in target]
    k = max(len(r) for r in lists)
    if k == 0:
        raise CxrExplainError("empty target lists: give at least one class per image")
    t = torch.full((b, k), -1, dtype=torch.long)
    for i, row in enumerate(lists):
        t[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    _check_range(t, n)
    return t, True


def _check_range(t: Tensor, n: int) -> None:
    bad = t[(t >= n) | (t < -1)]
    if bad.numel():
        raise CxrExplainError(f"target class {int(bad[0])} is out of range: the model has {n} outputs (0..{n - 1})")


def _label_index(name: str, labels: Optional[Sequence[str]], n: int) -> int:
    if name.lstrip("-").isdigit():
        return int(name)
    if not labels:
        raise CxrExplainError(f"target {name!r} is a name but the model has no label names; give a class index")
    lower = [l.lower() for l in labels]
    if name.lower() in lower:
        return lower.index(name.lower())
    import difflib

    close = difflib.get_close_matches(name, labels, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise CxrExplainError(f"unknown target {name!r}{hint} (labels: {', '.join(labels)})")


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
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def explain(
    model: nn.Module,
    images: Tensor,
    method: str = "lrp",
    target: TargetSpec = "predicted",
    *,
    dtype: Optional[torch.dtype] = None,
    layer: Optional[str] = None,
    return_input_relevance: bool = False,
    check_conservation: bool = True,
    method_options: Optional[dict] = None,
    ig_steps: int = 32,
    keep_relevance: Sequence[str] = (),
) -> Explanation:
    """Explain ``model``'s outputs on ``images`` (B, C, H, W) — or (C, H, W) — with ``method``.

    ``target``: ``"predicted"`` (arg-max logit), a class index, a label name, one index per image,
    or a list of classes per image (all explained in one pass; ragged lists are padded with −1).
    ``dtype``: e.g. ``torch.float64`` for reference-grade numbers (the model is copied).
    ``layer``: Grad-CAM's feature layer (module path or node name; default: the last spatial map).
    ``keep_relevance``: layers (module path or node name) whose output relevance to return.
    """
    name = resolve_method_name(method)
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise CxrExplainError(f"images must be (B, C, H, W); got shape {tuple(images.shape)}")
    labels = model_labels(model)
    net = _model_in(model, dtype)
    p = next(net.parameters(), None)
    x = images.to(device=p.device if p is not None else images.device,
                  dtype=dtype or (p.dtype if p is not None else images.dtype))
    if not torch.isfinite(x).all():
        raise CxrExplainError("the input images contain NaN or Inf values; check the preprocessing")
    with _EvalMode(net), full_fp32(x.device):
        traced = trace(net)
        if name in PROPAGATION_METHODS:
            keep = frozenset(traced.find(k).name for k in keep_relevance)
            exp = _explain_propagation(traced, x, name, target, labels, method_options or {}, check_conservation, keep)
        elif name in GRADIENT_METHODS:
            exp = _explain_gradient(traced, x, name, target, labels, ig_steps)
        elif name in CAM_METHODS:
            exp = _explain_cam(traced, x, name, target, labels, layer)
        elif name == "rsp":
            exp = _explain_rsp(traced, x, target, labels)
        else:  # pragma: no cover - resolve_method_name guards this
            raise CxrExplainError(f"unknown method {method!r}")
    if not return_input_relevance:
        exp.input_relevance = None
    if not torch.isfinite(exp.maps).all():
        raise CxrExplainError(f"method {name!r} produced NaN/Inf relevance; try dtype=torch.float64 or another method")
    return exp


def _finish(name, maps_kb, logits, targets, per_image, **extra) -> Explanation:
    """Lay (K, B, …) results out as (B, K, …) or (B, …) and gather the explained logits."""
    explained = logits.gather(1, targets.clamp(min=0)).to(logits.dtype)
    explained = torch.where(targets >= 0, explained, torch.full_like(explained, float("nan")))
    maps = maps_kb.transpose(0, 1)
    out = {}
    for key, v in extra.items():
        if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[:2] == maps_kb.shape[:2]:
            v = v.transpose(0, 1)
            out[key] = v if per_image else v[:, 0]
        elif isinstance(v, dict):
            out[key] = {n: (t.transpose(0, 1) if per_image else t.transpose(0, 1)[:, 0]) for n, t in v.items()}
        else:
            out[key] = v
    if not per_image:
        maps, targets, explained = maps[:, 0], targets[:, 0], explained[:, 0]
    return Explanation(method=name, maps=maps, logits=logits, targets=targets, explained=explained, **out)


def _explain_propagation(traced: TracedModel, x, name, target, labels, options, check, keep) -> Explanation:
    method = get_propagation_method(name, **options).for_graph(traced)
    traced.check_supported(lambda n: method.rule_for(n) is not None, name)
    if method.supports is not None:
        problem = method.supports(traced)
        if problem:
            raise CxrExplainError(f"{name}: {problem}")
    with torch.no_grad():
        record = record_forward(traced, x)
        logits = record[traced.logits]
        if logits.dim() != 2:
            raise CxrExplainError(f"the model's logits have shape {tuple(logits.shape)}; expected (batch, classes)")
        targets, per_image = resolve_targets(target, logits, labels)
        targets = targets.to(logits.device)
        tk = targets.T  # (K, B)
        onehot = F.one_hot(tk.clamp(min=0), logits.shape[1]).to(logits.dtype) * (tk >= 0).unsqueeze(-1)
        start = onehot * logits.unsqueeze(0) if method.start == "logit" else onehot
        res = propagate(traced, record, method, start, keep=keep)
        rel = res.input_relevance  # (K, B, C, H, W)
        maps = rel.sum(2)
        cons = None
        if method.conserving:
            explained = logits.gather(1, targets.clamp(min=0)).T  # (K, B)
            total = maps.flatten(2).sum(-1)
            cons = (total - explained).abs() / explained.abs().clamp(min=torch.finfo(explained.dtype).tiny)
            cons = torch.where(tk >= 0, cons, torch.zeros_like(cons))
            if check and bool((cons > CONSERVATION_TOLERANCE).any()):
                _warn_conservation(name, cons, res.leaks)
    return _finish(name, maps, logits, targets, per_image, input_relevance=rel, layer_sums=res.layer_sums,
                   leaks=res.leaks, relevances=res.kept, conservation_error=cons)


def _warn_conservation(name: str, cons: Tensor, leaks: dict[str, Tensor]) -> None:
    worst = max(leaks.items(), key=lambda kv: float(kv[1].abs().max()), default=(None, None))
    where = f"; most relevance was lost at node {worst[0]!r} (Σ leak {float(worst[1].abs().max()):.3g})" if worst[0] else ""
    warnings.warn(
        f"{name}: Σ map differs from the explained logit by up to {float(cons.max()):.3g} (relative){where}",
        RuntimeWarning, stacklevel=3,
    )


def _resolver(target, labels, device):
    """A ``logits -> targets`` function for methods that resolve targets from their own forward;
    the returned dict receives ``per_image``."""
    box: dict = {}

    def resolve(logits):
        t, box["per_image"] = resolve_targets(target, logits, labels)
        return t.to(device)

    return resolve, box


def _explain_gradient(traced, x, name, target, labels, steps) -> Explanation:
    resolve, box = _resolver(target, labels, x.device)
    if name == "integrated-gradients":
        with torch.no_grad():
            logits = record_forward(traced, x, keep=set())[traced.logits]
        targets = resolve(logits)
        rel = gradients.integrated_gradients(traced, x, targets, steps=steps)
    else:
        g, logits, targets = gradients.input_gradients(traced, x, resolve)
        rel = g if name == "gradient" else g * x.unsqueeze(0)
    valid = (targets.T >= 0).view(*targets.T.shape, 1, 1, 1)
    rel = rel * valid
    return _finish(name, rel.sum(2), logits, targets, box["per_image"], input_relevance=rel)


def _explain_cam(traced, x, name, target, labels, layer) -> Explanation:
    resolve, box = _resolver(target, labels, x.device)
    if name == "cam":
        if layer is not None:
            raise CxrExplainError("CAM reads the feature map before the global pool; layer= is for gradcam")
        raw, logits, targets = cam_mod.cam(traced, x, resolve)
    else:
        raw, logits, targets = cam_mod.gradcam(traced, x, resolve, layer=layer, plusplus=name == "gradcam++")
    k, b, h, w = raw.shape
    up = F.interpolate(raw.reshape(k * b, 1, h, w), size=x.shape[-2:], mode="bilinear", align_corners=False)
    return _finish(name, up.reshape(k, b, *x.shape[-2:]), logits, targets, box["per_image"], raw_maps=raw)


def _explain_rsp(traced, x, target, labels) -> Explanation:
    from .rsp import rsp_method, rsp_start, rsp_start_node

    method = rsp_method()
    rsp_start_node(traced)  # architecture check first: a clear error for ResNet / DenseNet
    with torch.no_grad():
        logits = record_forward(traced, x, keep=set())[traced.logits]
    targets, per_image = resolve_targets(target, logits, labels)
    targets = targets.to(x.device)
    node, start, logits, record = rsp_start(traced, x, targets)
    lower = {n.name for n in traced.relevant_nodes() if n.index <= node.index}
    traced.check_supported(lambda n: n.name not in lower or n is node or method.rule_for(n) is not None, "rsp")
    with torch.no_grad():
        res = propagate(traced, record, method, start, start_node=node)
    rel = res.input_relevance
    return _finish("rsp", rel.sum(2), logits, targets, per_image, input_relevance=rel,
                   layer_sums=res.layer_sums, leaks=res.leaks)
