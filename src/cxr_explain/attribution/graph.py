"""Trace a model once into a graph of layers and functional ops, and run its forward pass.

The graph is torch.fx's, annotated: every node gets a *kind* (``conv``, ``linear``, ``batchnorm``,
``relu``, ``activation``, ``layernorm``, ``gated_mul``, ``permute``, ``meta`` …; the tables are in
:mod:`.kinds`) whether it is a module (``nn.ReLU``), a function (``F.relu``, ``torch.flatten``,
``+=``) or a tensor method (``x.view``), and a *role* (``first`` for the layers that read the input
image, ``head`` for the linear layer that produces the logits, else ``hidden``). Methods map
(kind, role) to rules; the engine never looks at layer types itself.

:func:`record_forward` runs the graph out of place (in-place ReLUs and ``+=`` become their
out-of-place twins, so no stored activation is overwritten) and keeps every node's output plus the
max-pool indices, which is all the rules need: no layer forward is re-run during the backward walk.
"""
from __future__ import annotations

import difflib
import inspect
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CxrExplainError, TraceError, UnsupportedOpError
from . import decompose as _decompose_mod
from . import kinds as K
from .kinds import FUNCTION_KINDS, METHOD_KINDS, MODULE_KINDS, NON_TENSOR_KINDS  # noqa: F401  (re-exported)

# --------------------------------------------------------------------------------------------
# Op classification (the tables live in kinds.py)
# --------------------------------------------------------------------------------------------

# In-place ops replaced by out-of-place twins when the graph is run by the engine.
_OUT_OF_PLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                           operator.itruediv: operator.truediv, torch.relu_: torch.relu, F.relu_: F.relu}
_OUT_OF_PLACE_METHODS = {"relu_": "relu", "add_": "add", "mul_": "mul", "sigmoid_": "sigmoid"}


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
    inputs: list["LayerNode"] = field(default_factory=list)  # node operands, in argument order
    nonnegative: bool = False  # output is ≥ 0 by construction (after a ReLU, pools / cat of such)
    data: bool = False  # the output depends on the model input as data (not only through its shape)
    passive: frozenset = frozenset()  # operand names held constant by the rule (a product's gate)
    scope: Optional[str] = None  # for a function / method node: the module whose forward called it

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
            self.graph_module = fx.symbolic_trace(model, concrete_args=_default_args(model) or None)
        except Exception as exc:  # torch.fx raises many types; report one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TraceError(
                f"cannot trace {type(model).__name__} with torch.fx ({first}); propagation methods need a "
                "model without data-dependent control flow: wrap the classifier in a plain nn.Module "
                "(gradient and CAM-family methods run without the trace)"
            ) from None
        _drop_specialised_inputs(self.graph_module)
        _decompose_mod.decompose(self.graph_module, model)
        self.modules = dict(self.graph_module.named_modules())
        self.nodes: list[LayerNode] = []
        by_fx: dict[fx.Node, LayerNode] = {}
        placeholders = []
        for i, node in enumerate(self.graph_module.graph.nodes):
            kind, module, path = self._classify(node)
            ln = LayerNode(i, node.name, kind, "hidden", _op_name(node, self.modules), node, module, path)
            ln.inputs = [by_fx[a] for a in _flat_node_args(node)]
            self._refine(ln)
            _no_inplace_args(node)
            stack = node.meta.get("nn_module_stack")
            if stack and module is None:
                ln.scope = next(reversed(stack.values()))[0] or None
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
            return K.module_kind(module), module, node.meta.get("cxr_module_path", node.target)
        if node.op in ("call_function", "call_method"):
            return K.call_kind(node.op, node.target, node.args), None, None
        return "unknown", None, None

    @staticmethod
    def _refine(ln: LayerNode) -> None:
        """Set ``data`` and refine the kind from the operands (kinds.py): shape arithmetic is meta;
        ``+`` of one data operand is ``constant_add``; a product with a gate or a constant factor is
        ``gated_mul`` (the gate is held constant), of two data operands that are not gates ``mul``."""
        ln.kind = _refined_kind(ln)
        if ln.kind == "input":
            ln.data = True
        elif ln.kind not in NON_TENSOR_KINDS and ln.kind != "constant":
            ln.data = any(i.data for i in ln.inputs)

    def _find_logits(self) -> LayerNode:
        out_args = self.output.inputs
        if len(out_args) != 1:
            raise CxrExplainError(
                f"{self.model_name} returns {len(out_args)} tensors; cxr-explain explains "
                "models that return one logits tensor"
            )
        node = out_args[0]
        # A sigmoid / softmax after the head is skipped (explanations use the logits); the walk stops
        # at the first other node, so a gate's sigmoid inside the network is never taken for it.
        while node.kind in K.OUTPUT_ACTIVATION_KINDS and node.inputs:
            data = [i for i in node.inputs if i.data]
            if len(data) != 1:
                break
            node = data[0]
        return node

    def _assign_roles(self) -> None:
        # head: the linear layer that produces the logits (through reshape / identity nodes)
        node = self.logits
        while node.kind in ("reshape", "identity") and node.inputs:
            node = node.inputs[0]
        if node.kind in ("linear", "conv"):
            node.role = "head"
        # first: conv/linear layers reached from the input through parameter-free nodes only, along
        # data (not along a shape query: a ViT's class token is expanded to x.shape[0])
        frontier = list(self._consumers[self.input.name])
        seen = set()
        while frontier:
            n = frontier.pop()
            if n.name in seen or not n.data:
                continue
            seen.add(n.name)
            if n.kind in ("conv", "linear"):
                if n.role != "head":
                    n.role = "first"
                continue
            frontier.extend(self._consumers[n.name])

    def _infer_nonnegative(self) -> None:
        for n in self.nodes:
            if n.kind == "relu" or (n.kind == "sigmoid") or _is_relu6(n):
                n.nonnegative = True
            elif n.kind in K.SIGN_KEEPING_KINDS and n.inputs:
                data = [i for i in n.inputs if i.data]
                n.nonnegative = bool(data) and all(i.nonnegative for i in data)
            elif n.kind in ("gated_mul", "mul") and n.inputs:
                data = [i for i in n.inputs if i.data and i.name not in n.passive]
                n.nonnegative = bool(data) and all(i.nonnegative for i in data) and all(
                    i.nonnegative for i in n.inputs if i.name in n.passive)

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

    def unsupported(self, has_rule: Callable[[LayerNode], bool]) -> list[LayerNode]:
        """Every relevant node that carries relevance and has no rule (``has_rule`` False), in order."""
        out = []
        for n in self.relevant_nodes():
            if n.kind in ("input", "constant") or n.kind in NON_TENSOR_KINDS:
                continue
            if n.kind == "unknown" or not has_rule(n):
                out.append(n)
        return out

    def check_supported(self, has_rule: Callable[[LayerNode], bool], method: str,
                        alternatives: str = "gradient methods and Grad-CAM") -> None:
        """Raise one :class:`UnsupportedOpError` listing every relevant node without a rule, with its
        module path and kind, and the methods that still work (``alternatives``)."""
        missing = self.unsupported(has_rule)
        if not missing:
            return
        listed = "; ".join(
            f"node {n.name!r} (op {n.op}" + (f", module {n.module_path}" if n.module_path else "")
            + (f", in {n.scope}" if n.scope else "") + f", kind {n.kind})"
            for n in missing[:40]
        ) + (f"; and {len(missing) - 40} more" if len(missing) > 40 else "")
        ops = sorted({n.op for n in missing})
        raise UnsupportedOpError(
            f"method {method!r} has no rule for {len(missing)} node(s) of {self.model_name} "
            f"(ops: {', '.join(ops)}): {listed}. These still work on this model: {alternatives}"
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


def _refined_kind(ln: LayerNode) -> str:
    """The node's kind once its operands are known (see :mod:`.kinds`)."""
    kind = ln.kind
    if ln.fx_node.op not in ("call_function", "call_method", "call_module"):
        return kind
    if ln.inputs and all(i.kind in NON_TENSOR_KINDS for i in ln.inputs):
        return "meta"  # integer shape arithmetic: x.size(1) // 2, h * w, torch._assert(…)
    if kind not in ("add", "sub", "mul", "div"):
        return kind
    args = list(ln.fx_node.args[:2])
    by_name = {i.name: i for i in ln.inputs}
    operands = [by_name.get(a.name) if isinstance(a, fx.Node) else None for a in args]
    data = [op is not None and op.data for op in operands]
    if len(operands) != 2 or set(ln.fx_node.kwargs) - {"out"}:
        return "unknown" if any(data) else kind  # torch.add(x, y, alpha=…) and the like: no rule
    if sum(data) == 2:
        if kind == "div":
            return "unknown"
        if kind == "mul":
            gates = [K.is_gate(op) for op in operands]
            if gates[0] != gates[1]:
                ln.passive = frozenset({operands[gates.index(True)].name})
                return "gated_mul"
        return kind
    if sum(data) == 1:
        if kind in ("add", "sub"):
            return "constant_add"
        if kind == "div" and not data[0]:
            return "unknown"  # c / x is not linear in x
        const = operands[1 - data.index(True)]
        if const is not None:
            ln.passive = frozenset({const.name})
        return "gated_mul"
    return kind


def _is_relu6(n: LayerNode) -> bool:
    """ReLU6 / hardtanh(0, 6): an activation whose output is ≥ 0."""
    if isinstance(n.module, nn.Hardtanh):
        return n.module.min_val >= 0
    return n.fx_node.op == "call_function" and n.fx_node.target is F.relu6


def _no_inplace_args(node: fx.Node) -> None:
    """Make a functional call out of place (``F.hardtanh(x, 0, 6, True)``, ``F.silu(x, inplace=True)``)
    so that no stored activation is overwritten; the graph module is ours, not the user's model."""
    if node.op != "call_function":
        return
    if node.kwargs.get("inplace"):
        node.kwargs = {**node.kwargs, "inplace": False}
        return
    try:
        import inspect

        params = list(inspect.signature(node.target).parameters)
    except (TypeError, ValueError):
        return
    if "inplace" in params:
        pos = params.index("inplace")
        if len(node.args) > pos and node.args[pos] is True:
            node.args = node.args[:pos] + (False,) + node.args[pos + 1:]


def _default_args(model: nn.Module) -> dict[str, Any]:
    """forward's parameters after the image that have defaults (timm's ``attn_mask=None``),
    fixed to those defaults for tracing: the engine explains one image input."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params
            if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _is_check(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") in ("_assert", "_assert_is_none")


def _drop_specialised_inputs(gm: fx.GraphModule) -> None:
    """Remove the placeholders torch.fx keeps for arguments fixed by ``concrete_args``: the checks
    it adds on them are erased, any other use reads the fixed value as a constant."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"][1:]
    specialised = [ph for ph in placeholders if ph.args]  # no default: a real input, reported later
    for ph in specialised:
        checks = [u for u in ph.users if _is_check(u)
                  or (u.target is operator.eq and all(_is_check(v) for v in u.users))]
        for u in sorted(checks, key=order.get, reverse=True):
            for v in list(u.users):
                gm.graph.erase_node(v)
            gm.graph.erase_node(u)
        for u in list(ph.users):
            u.args = fx.node.map_arg(u.args, lambda n: ph.args[0] if n is ph else n)
            u.kwargs = fx.node.map_arg(u.kwargs, lambda n: ph.args[0] if n is ph else n)
        gm.graph.erase_node(ph)
    if specialised:
        gm.recompile()


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
    unread: Optional[Callable[[LayerNode, dict[str, Any]], bool]] = None,
) -> ForwardRecord:
    """Run the traced graph on ``x`` out of place and keep every node's output.

    ``detach_at``: that node's output is detached and made a leaf requiring grad, so a later
    ``autograd.grad`` stops there (Grad-CAM). ``stop_at``: stop after that node.
    ``keep``: keep only these nodes' outputs (plus the logits); others are freed after their last
    use, so a forward that needs one feature map (CAM) costs no more memory than a plain one.
    ``unread(node, values so far)``: asked after each op node runs; True when no later reader needs
    the contents of its output tensor, which is then kept as a ``meta`` tensor of the same shape and
    dtype once its last consumer has run (the propagation engine's plan: see
    :func:`~.propagation.unread_outputs`).
    """
    values: dict[str, Any] = {}
    last_use = traced.last_use() if keep is not None or unread is not None else {}
    keep_all = None if keep is None else set(keep) | {traced.logits.name}
    shape_only: set[str] = set()
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
        if unread is not None and isinstance(out, torch.Tensor) and node.op.startswith("call") \
                and unread(ln, values):
            if traced.consumers(ln):
                shape_only.add(ln.name)
            else:
                values[ln.name] = _shape_of(out)
        if keep_all is not None:
            for done in last_use.get(ln.name, ()):
                if done not in keep_all:
                    values.pop(done, None)
        for done in last_use.get(ln.name, ()):
            if done in shape_only and done in values:
                values[done] = _shape_of(values[done])
    return ForwardRecord(values, pool_indices)


def _shape_of(t: torch.Tensor) -> torch.Tensor:
    """A stand-in with ``t``'s shape and dtype and no data (a ``meta`` tensor)."""
    return torch.empty_like(t, device="meta")


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
        if getattr(m, "inplace", False) is True:  # ReLU6(inplace=True), SiLU(inplace=True) …
            m = _out_of_place_twin(ln)
        return m(*args, **kwargs)
    if node.op == "call_function":
        fn = _OUT_OF_PLACE_FUNCTIONS.get(node.target, node.target)
        if ln.kind == "identity":  # dropout, stochastic depth: the identity in evaluation
            return args[0]
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


def _out_of_place_twin(ln: LayerNode) -> nn.Module:
    """A shallow copy of an in-place activation module with ``inplace=False`` (kept on the node)."""
    twin = ln.__dict__.get("_twin")
    if twin is None:
        import copy

        twin = copy.copy(ln.module)
        twin.inplace = False
        ln.__dict__["_twin"] = twin
    return twin


def rerun_arguments(ln: LayerNode, record: ForwardRecord, replace: Optional[dict[str, Any]] = None
                    ) -> tuple[tuple, dict]:
    """The node's call arguments with the recorded values of its operands (``replace``: node name ->
    value to use instead)."""
    values = record.values
    replace = replace or {}

    def load(a):
        return fx.node.map_arg(a, lambda n: replace[n.name] if n.name in replace else values[n.name])

    return load(ln.fx_node.args), dict(load(ln.fx_node.kwargs))


def rerun(ln: LayerNode, record: ForwardRecord, replace: dict[str, Any]) -> Any:
    """Run one node again on its recorded operands, with ``replace`` (node name -> value) substituted:
    what a structural rule needs to differentiate the node's own op (getitem, chunk, pad …)."""
    args, kwargs = rerun_arguments(ln, record, replace)
    return _run_node(ln, args, kwargs, {})


def _fetch_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
