"""Gradient and CAM-family methods on the model itself: plain autograd and forward hooks, no trace.

Used when torch.fx cannot trace a model (data-dependent control flow). Every hook is removed in a
``finally`` block, whatever the forward raises.

* :func:`model_logits` runs the model and returns the tensor a final ``sigmoid`` / ``softmax`` /
  ``log_softmax`` read (module or function, seen through a :class:`~torch.overrides.TorchFunctionMode`),
  so the explained outputs are logits, as on the traced graph.
* :func:`gradcam` captures one module's output ``A`` with a forward hook that hands the rest of
  the forward a copy of a detached leaf: ``∂v/∂A`` is then exact (in-place ops downstream, such as
  DenseNet's ``relu_``, change the copy, not ``A``) and the backward stops at ``A``.
* :func:`cam` finds the GAP → Linear head from the modules: the Linear whose output is the logits,
  and the module (called once) whose output it reads and that averages a spatial map.
"""
from __future__ import annotations

import difflib
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import CxrExplainError
from .cam import ChannelWeights, gradcam_weights, seed_weighted_cam, weighted_maps
from .gradients import Choose
from .layouts import Candidate, Layout, choose_feature, layout_of, readings
from .targets import Selection

Tensor = torch.Tensor

#: Functions whose output, when it is the model's output, is stripped to get the logits.
OUTPUT_ACTIVATIONS = {
    torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid, torch.special.expit,
    torch.softmax, torch.Tensor.softmax, F.softmax, torch.special.softmax,
    torch.log_softmax, torch.Tensor.log_softmax, F.log_softmax, torch.special.log_softmax,
}


class _ActivationInputs(TorchFunctionMode):
    """Remembers, for every sigmoid / softmax / log-softmax output of a forward, the tensor it read."""

    def __init__(self) -> None:
        super().__init__()
        self.read: dict[int, tuple[Tensor, Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in OUTPUT_ACTIVATIONS and isinstance(out, Tensor) and args and isinstance(args[0], Tensor):
            self.read[id(out)] = (out, args[0])
        return out

    def logits(self, out: Any, model: nn.Module) -> Tensor:
        if not isinstance(out, Tensor):
            raise CxrExplainError(
                f"{type(model).__name__} returns a {type(out).__name__}, not a tensor of logits; wrap it in an "
                "nn.Module whose forward returns the logits tensor")
        while id(out) in self.read and self.read[id(out)][0] is out:
            out = self.read[id(out)][1]
        if out.dim() != 2:
            raise CxrExplainError(f"the model's logits have shape {tuple(out.shape)}; expected (batch, classes)")
        return out


def model_logits(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` with a final sigmoid / softmax / log-softmax skipped: the logits (B, n)."""
    mode = _ActivationInputs()
    with mode:
        out = model(x)
    return mode.logits(out, model)


# ---------------------------------------------------------------------------------------------
# Capturing one module's output
# ---------------------------------------------------------------------------------------------


def module_named(model: nn.Module, name: str) -> nn.Module:
    """``model``'s sub-module at ``name``, or a one-line error suggesting the closest names."""
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise CxrExplainError(f"no layer named {name!r} in {type(model).__name__}{hint}")


@dataclass
class _Captured:
    value: Optional[Tensor] = None
    calls: int = 0


@contextmanager
def capture_output(module: nn.Module, name: str) -> Iterator[_Captured]:
    """While active, ``module``'s output is replaced by a copy of a detached leaf ``A`` (returned in
    ``.value``): ``∂(anything downstream)/∂A`` is the gradient at that layer. The module must run
    once per forward (a shared ReLU runs several times: name its block instead)."""
    box = _Captured()

    def hook(mod, inputs, out):
        box.calls += 1
        if box.calls > 1:
            raise CxrExplainError(f"layer {name!r} runs more than once per forward, so its map is not one "
                                  "feature map; name the block that contains it (e.g. its parent module)")
        if not isinstance(out, Tensor):
            raise CxrExplainError(f"layer {name!r} outputs a {type(out).__name__}, not a tensor; choose another layer")
        box.value = out.detach().requires_grad_(True)
        return box.value.clone()

    handle = module.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


@contextmanager
def _head_widths(model: nn.Module) -> Iterator[dict[int, int]]:
    """While active: id(output) -> in_features for every Linear layer's output."""
    widths: dict[int, int] = {}
    keep: list[Tensor] = []  # keeps ids unique while the forward runs

    def hook(mod, inputs, out):
        if isinstance(out, Tensor):
            widths[id(out)] = mod.in_features
            keep.append(out)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        yield widths
    finally:
        for h in handles:
            h.remove()
        keep.clear()


# ---------------------------------------------------------------------------------------------
# The default feature layer: one probe forward with every module hooked
# ---------------------------------------------------------------------------------------------


@dataclass
class _Output:
    producer: str  # the module that computed the tensor
    value: Tensor
    names: list[str] = field(default_factory=list)  # producer, then the modules that returned it as is


@contextmanager
def _all_outputs(model: nn.Module) -> Iterator[tuple[list[_Output], dict[str, int], dict[int, _Output]]]:
    """While active, every module's tensor output is recorded once (with the names of the modules
    that returned it unchanged) and the rest of the forward gets a copy, so an in-place op later on
    (``relu_``) cannot change a recorded map."""
    outputs: list[_Output] = []
    runs: dict[str, int] = {}
    by_id: dict[int, _Output] = {}
    copies: list[Tensor] = []  # alive until the end, so no id is reused

    def make(name: str):
        def hook(mod, inputs, out):
            runs[name] = runs.get(name, 0) + 1
            if not isinstance(out, Tensor):
                return None
            seen = by_id.get(id(out))
            if seen is not None:
                seen.names.append(name)
                return None
            rec = _Output(name, out, [name])
            outputs.append(rec)
            copy = out.clone()
            by_id[id(out)] = by_id[id(copy)] = rec
            copies.append(copy)
            return copy
        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in model.named_modules() if n]
    try:
        yield outputs, runs, by_id
    finally:
        for h in handles:
            h.remove()
        copies.clear()


def _display_name(rec: _Output, runs: dict[str, int]) -> Optional[str]:
    """The outermost module that contains the producer, returned this tensor and runs once (what
    ``layer=`` accepts), or None."""
    ok = [n for n in rec.names if runs.get(n) == 1 and (n == rec.producer or rec.producer.startswith(n + "."))]
    return ok[-1] if ok else None


_DEFAULT_LAYERS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def default_feature_layer(model: nn.Module, x: Tensor, prefix_tokens: Optional[int] = None) -> tuple[str, Layout]:
    """Module path and layout of the last spatial map the logits depend on
    (:func:`.layouts.choose_feature` on one image; cached per model and input size)."""
    cache = _DEFAULT_LAYERS.setdefault(model, {})
    key = (tuple(x.shape[1:]), prefix_tokens)
    if key in cache:
        return cache[key]
    with torch.enable_grad(), _all_outputs(model) as (outputs, runs, by_id):
        mode = _ActivationInputs()
        with mode:
            out = model(x[:1].detach().requires_grad_(True))
        if isinstance(out, Tensor) and id(out) in by_id:  # a final Sigmoid module's output, copied
            out = by_id[id(out)].value
        logits = mode.logits(out, model)
    head = by_id.get(id(logits))
    width = None
    if head is not None:
        m = dict(model.named_modules())[head.producer]
        width = m.in_features if isinstance(m, nn.Linear) else None
    total = logits.sum()
    cands = []
    for rec in outputs:
        name = _display_name(rec, runs)
        if name is not None and rec.value.requires_grad:
            cands.append(Candidate(name, rec.value))

    def gradient(c: Candidate) -> Optional[Tensor]:
        return torch.autograd.grad(total, c.value, retain_graph=True, allow_unused=True)[0]

    cand, layout = choose_feature(cands, tuple(x.shape[-2:]), gradient, width, prefix_tokens)
    cache[key] = (cand.name, layout)
    return cache[key]


# ---------------------------------------------------------------------------------------------
# Grad-CAM and CAM
# ---------------------------------------------------------------------------------------------


def gradcam(
    model: nn.Module, x: Tensor, choose: Choose, layer: Optional[str] = None,
    channel_weights: ChannelWeights = gradcam_weights, prefix_tokens: Optional[int] = None,
) -> tuple[Tensor, Tensor, Selection, str, Layout]:
    """Grad-CAM(-family) maps (K, B, h, w) at ``layer`` (default: :func:`default_feature_layer`),
    logits (B, n), the selection, the layer's module path and its layout."""
    layout = None
    if layer is None:
        layer, layout = default_feature_layer(model, x, prefix_tokens)
    module = module_named(model, layer)
    with torch.enable_grad(), capture_output(module, layer) as box, _head_widths(model) as widths:
        logits = model_logits(model, x.detach())
        if box.value is None:
            raise CxrExplainError(f"layer {layer!r} did not run in the forward pass; choose another layer")
        if layout is None:
            layout = layout_of(layer, tuple(box.value.shape), tuple(x.shape[-2:]), prefix_tokens,
                               widths.get(id(logits)))
        sel = choose(logits.detach())
        maps = weighted_maps(box.value, logits, sel, layout, channel_weights)
    return maps, logits.detach(), sel, layer, layout


def cam(model: nn.Module, x: Tensor, choose: Choose) -> tuple[Tensor, Tensor, Selection, str, Layout]:
    """CAM maps (K, B, h, w) from the modules: the Linear ``W`` whose output is the logits reads
    the output of a module that averages a spatial map ``A`` (channels-first or channels-last) over
    its positions; ``M = Σ_c (Σ_n s_n W_nc) A_c``. Returns maps, logits, selection, the pooling
    module's path and the layout of ``A``."""
    calls: list[tuple[str, nn.Module, Any, Any]] = []

    def make(name: str):
        def hook(mod, inputs, out):
            calls.append((name, mod, inputs[0] if inputs else None, out))
        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            logits = model_logits(model, x)
    finally:
        for h in handles:
            h.remove()
    heads = [c for c in calls if isinstance(c[1], nn.Linear) and c[3] is logits]
    if not heads:
        raise CxrExplainError(f"CAM needs logits from a Linear layer after global average pooling; "
                              f"{type(model).__name__}'s logits come from no Linear module: use gradcam")
    head_name, head, h, _ = heads[-1]
    counts: dict[str, int] = {}
    for c in calls:
        counts[c[0]] = counts.get(c[0], 0) + 1
    wanted = h  # walk back from the classifier's input through modules that only reshape it
    for name, mod, inp, out in reversed(calls):
        if counts[name] != 1 or not isinstance(inp, Tensor) or not isinstance(out, Tensor):
            continue
        if out.numel() != wanted.numel() or not torch.equal(out.reshape(wanted.shape), wanted):
            continue
        pooled = _global_average(inp, h, tuple(x.shape[-2:]))
        if pooled is not None:
            sel = choose(logits)
            if not sel.linear:
                raise CxrExplainError("CAM explains classes, findings and contrasts; use gradcam for function targets")
            A, layout = pooled
            return seed_weighted_cam(A, head.weight.detach(), sel), logits, sel, name, layout
        if inp.numel() != wanted.numel():
            break  # the head reads this module's output, and it is not a global average pool
        wanted = inp
    raise CxrExplainError(
        f"CAM needs global average pooling right before the classifier ({head_name} reads no module that "
        "averages a spatial map); use gradcam for this architecture")


def _global_average(inp: Tensor, h: Tensor, image_hw: tuple[int, int]) -> Optional[tuple[Tensor, Layout]]:
    """(A as (B, C, h, w), its layout) when ``h`` (B, C) is the mean of the spatial map ``inp`` over
    its positions, else None."""
    for layout in readings(tuple(inp.shape), image_hw):
        if layout.kind == "tokens" or layout.channels != h.shape[1]:
            continue
        A = layout.to_nchw(inp)
        scale = float(h.abs().max()) if h.numel() else 1.0
        if torch.allclose(A.mean((2, 3)), h.reshape(A.shape[:2]), rtol=1e-5, atol=1e-6 * max(scale, 1e-30)):
            return A, layout
    return None
