"""Trace a model once into a graph of layers and functional ops, and run its forward pass.

The graph is torch.fx's, annotated: every node gets a *kind* (``conv``, ``linear``, ``batchnorm``,
``relu``, ``maxpool``, ``avgpool``, ``add``, ``cat``, ``reshape`` …) whether it is a module
(``nn.ReLU``) or a function (``F.relu``, ``torch.flatten``, ``+=``), and a *role* (``first`` for the
layers that read the input image, ``head`` for the linear layer that produces the logits, else
``hidden``). Methods map (kind, role) to rules; the engine never looks at layer types itself.

:func:`record_forward` runs the graph out of place (in-place ReLUs and ``+=`` become their
out-of-place twins, so no stored activation is overwritten) and keeps every node's output plus the
max-pool indices, which is all the rules need: no layer forward is re-run during the backward walk.
"""
from __future__ import annotations

import difflib
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CxrExplainError, TraceError, UnsupportedOpError

# --------------------------------------------------------------------------------------------
# Op classification
# --------------------------------------------------------------------------------------------

MODULE_KINDS: dict[type, str] = {
    nn.Conv2d: "conv",
    nn.Linear: "linear",
    nn.BatchNorm2d: "batchnorm",
    nn.BatchNorm1d: "batchnorm",
    nn.ReLU: "relu",
    nn.MaxPool2d: "maxpool",
    nn.AvgPool2d: "avgpool",
    nn.AdaptiveAvgPool2d: "adaptive_avgpool",
    nn.Flatten: "reshape",
    nn.Dropout: "identity",
    nn.Identity: "identity",
    nn.Sigmoid: "output_activation",
    nn.Softmax: "output_activation",
    nn.LogSoftmax: "output_activation",
}

FUNCTION_KINDS: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu_: "relu",
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    torch.cat: "cat",
    torch.concat: "cat",
    torch.flatten: "reshape",
    torch.reshape: "reshape",
    torch.squeeze: "reshape",
    torch.unsqueeze: "reshape",
    F.adaptive_avg_pool2d: "adaptive_avgpool",
    F.avg_pool2d: "avgpool",
    F.max_pool2d: "maxpool",
    F.dropout: "identity",
    torch.sigmoid: "output_activation",
    F.sigmoid: "output_activation",
    F.softmax: "output_activation",
    torch.softmax: "output_activation",
    F.log_softmax: "output_activation",
    operator.getitem: "meta",
    getattr: "meta",
}

METHOD_KINDS: dict[str, str] = {
    "view": "reshape",
    "reshape": "reshape",
    "flatten": "reshape",
    "squeeze": "reshape",
    "unsqueeze": "reshape",
    "contiguous": "identity",
    "relu": "relu",
    "relu_": "relu",
    "add": "add",
    "add_": "add",
    "size": "meta",
    "dim": "meta",
    "sigmoid": "output_activation",
    "softmax": "output_activation",
}

# Kinds whose nodes carry no relevance (shape queries and the like).
NON_TENSOR_KINDS = {"meta"}

# In-place ops replaced by out-of-place twins when the graph is run by the engine.
_OUT_OF_PLACE_FUNCTIONS = {operator.iadd: operator.add, torch.relu_: torch.relu, F.relu_: F.relu}
_OUT_OF_PLACE_METHODS = {"relu_": "relu", "add_": "add"}


def _op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


# --------------------------------------------------------------------------------------------
# The traced graph
# --------------------------------------------------------------------------------------------


@dataclass
class LayerNode:
    """One node of the traced graph, annotated for the engine."""

    index: int
    name: str  # fx node name, unique
    kind: str
    role: str  # "first" | "head" | "hidden"
    op: str  # human-readable op name (module class or function name)
    fx_node: fx.Node
    module: Optional[nn.Module] = None
    module_path: Optional[str] = None
    inputs: list["LayerNode"] = field(default_factory=list)  # tensor inputs, in argument order
    nonnegative: bool = False  # output is ≥ 0 by construction (after a ReLU, pools / cat of such)

    def __repr__(self) -> str:  # short, for error messages
        where = f" ({self.module_path})" if self.module_path else ""
        return f"{self.name}{where}: {self.op} [{self.kind}/{self.role}]"


class TracedModel:
    """A model traced once into annotated nodes (topological order)."""

    def __init__(self, model: nn.Module):
        # No strong reference to ``model``: the trace cache is keyed weakly on it, and a value that
        # held its key would keep every traced model (and its cached modified weights) alive forever.
        self.model_name = type(model).__name__
        try:
            self.graph_module = fx.symbolic_trace(model)
        except Exception as exc:  # torch.fx raises many types; report one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TraceError(
                f"cannot trace {type(model).__name__} with torch.fx ({first}); propagation methods need a "
                "model without data-dependent control flow: wrap the classifier in a plain nn.Module "
                "(gradient and CAM-family methods run without the trace)"
            ) from None
        self.modules = dict(self.graph_module.named_modules())
        self.nodes: list[LayerNode] = []
        by_fx: dict[fx.Node, LayerNode] = {}
        placeholders = []
        for i, node in enumerate(self.graph_module.graph.nodes):
            kind, module, path = self._classify(node)
            ln = LayerNode(i, node.name, kind, "hidden", _op_name(node, self.modules), node, module, path)
            ln.inputs = [by_fx[a] for a in _flat_node_args(node)]
            by_fx[node] = ln
            self.nodes.append(ln)
            if node.op == "placeholder":
                placeholders.append(ln)
        if len(placeholders) != 1:
            raise CxrExplainError(
                f"{type(model).__name__}.forward takes {len(placeholders)} inputs; cxr-explain explains "
                "models with exactly one image input"
            )
        self.input = placeholders[0]
        self.by_name = {n.name: n for n in self.nodes}
        self.output = self.nodes[-1]
        self.logits = self._find_logits()
        self._consumers: dict[str, list[LayerNode]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for inp in n.inputs:
                self._consumers[inp.name].append(n)
        self._assign_roles()
        self._infer_nonnegative()
        self._relevant: Optional[list[LayerNode]] = None

    # -- classification ---------------------------------------------------------------------
    def _classify(self, node: fx.Node) -> tuple[str, Optional[nn.Module], Optional[str]]:
        if node.op == "placeholder":
            return "input", None, None
        if node.op == "output":
            return "output", None, None
        if node.op == "get_attr":
            return "constant", None, None
        if node.op == "call_module":
            module = self.modules[node.target]
            for cls in type(module).__mro__:
                if cls in MODULE_KINDS:
                    return MODULE_KINDS[cls], module, node.target
            return "unknown", module, node.target
        if node.op == "call_function":
            return FUNCTION_KINDS.get(node.target, "unknown"), None, None
        if node.op == "call_method":
            return METHOD_KINDS.get(node.target, "unknown"), None, None
        return "unknown", None, None

    def _find_logits(self) -> LayerNode:
        out_args = self.output.inputs
        if len(out_args) != 1:
            raise CxrExplainError(
                f"{self.model_name} returns {len(out_args)} tensors; cxr-explain explains "
                "models that return one logits tensor"
            )
        node = out_args[0]
        # A sigmoid / softmax at the very end is skipped: explanations use the logits.
        while node.kind in ("output_activation", "identity"):
            node = node.inputs[0]
        return node

    def _assign_roles(self) -> None:
        # head: the linear layer that produces the logits (through reshape / identity nodes)
        node = self.logits
        while node.kind in ("reshape", "identity") and node.inputs:
            node = node.inputs[0]
        if node.kind in ("linear", "conv"):
            node.role = "head"
        # first: conv/linear layers reached from the input through parameter-free nodes only
        frontier = list(self._consumers[self.input.name])
        seen = set()
        while frontier:
            n = frontier.pop()
            if n.name in seen:
                continue
            seen.add(n.name)
            if n.kind in ("conv", "linear"):
                if n.role != "head":
                    n.role = "first"
                continue
            frontier.extend(self._consumers[n.name])

    def _infer_nonnegative(self) -> None:
        keeps_sign = {"maxpool", "avgpool", "adaptive_avgpool", "reshape", "identity", "cat"}
        for n in self.nodes:
            if n.kind == "relu":
                n.nonnegative = True
            elif n.kind in keeps_sign and n.inputs:
                n.nonnegative = all(i.nonnegative for i in n.inputs if i.kind not in NON_TENSOR_KINDS)

    def last_use(self) -> dict[str, list[str]]:
        """node name -> names of the nodes whose output is last read by that node."""
        if getattr(self, "_last_use", None) is None:
            last: dict[str, str] = {}
            for n in self.nodes:
                for i in n.inputs:
                    last[i.name] = n.name
            out: dict[str, list[str]] = {}
            for value, user in last.items():
                out.setdefault(user, []).append(value)
            self._last_use = out
        return self._last_use

    # -- queries ----------------------------------------------------------------------------
    def consumers(self, node: LayerNode) -> list[LayerNode]:
        return self._consumers[node.name]

    def relevant_nodes(self) -> list[LayerNode]:
        """Nodes on a path from the input to the logits (the ones relevance flows through)."""
        if self._relevant is None:
            self._relevant = self._find_relevant()
        return self._relevant

    def _find_relevant(self) -> list[LayerNode]:
        upstream = set()
        stack = [self.logits]
        while stack:
            n = stack.pop()
            if n.name in upstream:
                continue
            upstream.add(n.name)
            stack.extend(n.inputs)
        downstream = set()
        stack = [self.input]
        while stack:
            n = stack.pop()
            if n.name in downstream:
                continue
            downstream.add(n.name)
            stack.extend(self._consumers[n.name])
        return [n for n in self.nodes if n.name in upstream and n.name in downstream]

    def find(self, layer: str) -> LayerNode:
        """The node of a module path (``features.norm5``, ``layer4``) or an fx node name.

        A module that is a container (``layer4``) resolves to its last node, functional ones included
        (a ConvNeXt block's residual ``add``). Unknown names raise an error that suggests the closest names.
        """
        if layer in self.by_name:
            return self.by_name[layer]
        matches = [n for n in self.nodes if n.module_path == layer]
        if not matches:
            matches = [n for n in self.nodes if layer in _module_stack(n)]
        if not matches:
            prefix = layer + "."
            matches = [n for n in self.nodes if n.module_path and n.module_path.startswith(prefix)]
        if matches:
            return matches[-1]
        candidates = sorted({n.module_path for n in self.nodes if n.module_path} | set(self.by_name))
        close = difflib.get_close_matches(layer, candidates, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise CxrExplainError(f"no layer named {layer!r} in {self.model_name}{hint}")

    def name_of(self, node: LayerNode) -> str:
        """The outermost module whose output ``node`` is (:meth:`find` resolves it back to ``node``),
        else its module path or node name."""
        for path in _module_stack(node):
            if self.find(path) is node:
                return path
        return node.module_path or node.name

    def check_supported(self, has_rule: Callable[[LayerNode], bool], method: str) -> None:
        """Raise :class:`UnsupportedOpError` naming the first relevant node without a rule."""
        for n in self.relevant_nodes():
            if n.kind in ("input", "constant") or n.kind in NON_TENSOR_KINDS:
                continue
            if n.kind == "unknown" or not has_rule(n):
                raise UnsupportedOpError(
                    f"method {method!r} has no rule for node {n.name!r} (op {n.op}"
                    + (f", module {n.module_path}" if n.module_path else "")
                    + "); replace the op with a supported one (Conv2d, Linear, BatchNorm, ReLU, pools, "
                    "add, cat, flatten) or use a gradient method"
                )


_TRACE_CACHE: "weakref.WeakKeyDictionary[nn.Module, TracedModel]" = weakref.WeakKeyDictionary()


def trace(model: nn.Module) -> TracedModel:
    """Trace ``model`` (cached per model object: the structure is traced once, weights read live)."""
    traced = _TRACE_CACHE.get(model)
    if traced is None:
        traced = TracedModel(model)
        _TRACE_CACHE[model] = traced
    return traced


_UNTRACEABLE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def try_trace(model: nn.Module) -> Optional[TracedModel]:
    """:func:`trace`, or None when the model cannot be traced into a graph the engine reads (torch.fx
    fails, or the graph has several inputs or outputs); remembered per model object."""
    if model in _UNTRACEABLE:
        return None
    try:
        return trace(model)
    except CxrExplainError:
        _UNTRACEABLE.add(model)
        return None


def clear_trace_caches() -> None:
    """Drop the modified weights (W⁺, |W⁻| …) every traced model keeps between calls; the traces stay.
    They are rebuilt on the next call; a notebook explaining a VGG-16 in float64 frees ~1 GB a copy."""
    for traced in list(_TRACE_CACHE.values()):
        traced.__dict__.get("weight_cache", {}).clear()


def _module_stack(node: LayerNode) -> list[str]:
    """Paths of the modules whose forward computed ``node``, outermost first (torch.fx's meta)."""
    return [v[0] for v in node.fx_node.meta.get("nn_module_stack", {}).values()]


def _flat_node_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


# --------------------------------------------------------------------------------------------
# Recorded forward pass
# --------------------------------------------------------------------------------------------


@dataclass
class ForwardRecord:
    """Outputs of every node of one forward pass, plus max-pool indices."""

    values: dict[str, Any]
    pool_indices: dict[str, torch.Tensor]

    def __getitem__(self, node: LayerNode) -> Any:
        return self.values[node.name]


def record_forward(
    traced: TracedModel,
    x: torch.Tensor,
    stop_at: Optional[LayerNode] = None,
    detach_at: Optional[LayerNode] = None,
    keep: Optional[set[str]] = None,
) -> ForwardRecord:
    """Run the traced graph on ``x`` out of place and keep every node's output.

    ``detach_at``: that node's output is detached and made a leaf requiring grad, so a later
    ``autograd.grad`` stops there (Grad-CAM). ``stop_at``: stop after that node.
    ``keep``: keep only these nodes' outputs (plus the logits); others are freed after their last
    use, so a forward that needs one feature map (CAM) costs no more memory than a plain one.
    """
    values: dict[str, Any] = {}
    last_use = traced.last_use() if keep is not None else {}
    keep_all = None if keep is None else set(keep) | {traced.logits.name}
    pool_indices: dict[str, torch.Tensor] = {}
    gm = traced.graph_module

    def load(a):
        return fx.node.map_arg(a, lambda n: values[n.name])

    for ln in traced.nodes:
        node = ln.fx_node
        if node.op == "placeholder":
            out = x
        elif node.op == "get_attr":
            out = _fetch_attr(gm, node.target)
        elif node.op == "output":
            out = load(node.args[0])
        else:
            args, kwargs = load(node.args), dict(load(node.kwargs))
            out = _run_node(ln, args, kwargs, pool_indices)
        if detach_at is not None and ln is detach_at:
            out = out.detach().requires_grad_(True)
        values[ln.name] = out
        if stop_at is not None and ln is stop_at:
            break
        if keep_all is not None:
            for done in last_use.get(ln.name, ()):
                if done not in keep_all:
                    values.pop(done, None)
    return ForwardRecord(values, pool_indices)


def _run_node(ln: LayerNode, args, kwargs, pool_indices) -> Any:
    node = ln.fx_node
    if node.op == "call_module":
        m = ln.module
        if ln.kind == "relu":
            return F.relu(args[0])
        if ln.kind == "maxpool" and isinstance(m, nn.MaxPool2d):
            out, idx = F.max_pool2d(
                args[0], m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True
            )
            pool_indices[ln.name] = idx
            return out
        return m(*args, **kwargs)
    if node.op == "call_function":
        fn = _OUT_OF_PLACE_FUNCTIONS.get(node.target, node.target)
        if "inplace" in kwargs:
            kwargs["inplace"] = False
        if ln.kind == "maxpool":
            kwargs["return_indices"] = True
            out, idx = fn(*args, **kwargs)
            pool_indices[ln.name] = idx
            return out
        if fn is F.relu and len(args) > 1:  # F.relu(x, True)
            args = (args[0],)
        return fn(*args, **kwargs)
    if node.op == "call_method":
        name = _OUT_OF_PLACE_METHODS.get(node.target, node.target)
        self_obj, rest = args[0], args[1:]
        return getattr(self_obj, name)(*rest, **kwargs)
    raise CxrExplainError(f"cannot run node {ln.name!r} (op {node.op})")


def _fetch_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
