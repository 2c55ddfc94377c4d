"""What kind of operation each traced node is: the tables the engine's rule maps are keyed by.

A *kind* names an operation independently of how the model spells it: ``nn.SiLU``, ``F.silu`` and
``x.sigmoid() * x`` … each table maps one spelling (a module class, a function, a tensor method
name) to a kind. Kinds (``docs/rules.md`` §1.3, §9):

* layers: ``conv`` (Conv1d/2d), ``linear``, ``batchnorm`` (module or ``F.batch_norm``), ``layernorm``
  (``nn.LayerNorm``, ``F.layer_norm``: token layout and channels-last), ``groupnorm``;
* element-wise: ``relu``, ``activation`` (SiLU, GELU, Hardswish, ReLU6, LeakyReLU, Mish, Tanh, ELU …),
  ``sigmoid`` (Sigmoid, Hardsigmoid: an activation that can also be a gate), ``softmax`` and
  ``log_softmax`` (skipped at the end of a model);
* pools and reductions: ``maxpool``, ``avgpool``, ``adaptive_avgpool``, ``mean``, ``sum``;
* joins: ``add`` and ``sub`` (two data operands), ``constant_add`` (one data operand plus a
  learned constant or a number: a bias, a positional embedding), ``mul`` (two data operands),
  ``gated_mul`` (a data operand times a gate or a constant, see :func:`gate_operands`), ``cat``;
* structure: ``reshape``, ``permute``, ``transpose``, ``expand``, ``getitem``, ``split`` (chunk,
  split, unbind: a tuple of tensors), ``pad``, ``identity`` (contiguous, Dropout, stochastic depth);
* transformers (§10): ``matmul`` (``@``, ``bmm``), ``attention`` (``F.scaled_dot_product_attention``
  and the engine's decomposed attention), ``reindex`` (``torch.roll``, head split / merge, window
  partition: entries moved, not mixed); ``softmax`` inside a model gets §10's rules;
* ``meta``: shape queries and the integer arithmetic on them (``x.size()``, ``x.shape[1] // 2``);
  they carry no relevance; ``constant``: parameters and buffers read with ``get_attr``.

Anything else is ``unknown``: a method with no rule for it reports it (with every other such node).
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .decompose import FUNCTION_KINDS as DECOMPOSED_KINDS

try:  # torchvision's stochastic depth is a wrapped leaf function in traced graphs
    from torchvision.ops import stochastic_depth as _tv_stochastic_depth
    from torchvision.ops.misc import Permute as _TvPermute
except ImportError:  # pragma: no cover - torchvision is a dependency, but keep the engine importable
    _tv_stochastic_depth = None
    _TvPermute = None

MODULE_KINDS: dict[type, str] = {
    nn.Conv2d: "conv",
    nn.Conv1d: "conv",
    nn.Linear: "linear",
    nn.BatchNorm2d: "batchnorm",
    nn.BatchNorm1d: "batchnorm",
    nn.LayerNorm: "layernorm",
    nn.GroupNorm: "groupnorm",
    nn.ReLU: "relu",
    nn.ReLU6: "activation",
    nn.SiLU: "activation",
    nn.GELU: "activation",
    nn.Hardswish: "activation",
    nn.LeakyReLU: "activation",
    nn.Mish: "activation",
    nn.Tanh: "activation",
    nn.ELU: "activation",
    nn.SELU: "activation",
    nn.CELU: "activation",
    nn.Softplus: "activation",
    nn.PReLU: "activation",
    nn.Hardtanh: "activation",
    nn.Sigmoid: "sigmoid",
    nn.Hardsigmoid: "sigmoid",
    nn.MaxPool2d: "maxpool",
    nn.AvgPool2d: "avgpool",
    nn.AdaptiveAvgPool2d: "adaptive_avgpool",
    nn.Flatten: "reshape",
    nn.Unflatten: "reshape",
    nn.Dropout: "identity",
    nn.Dropout1d: "identity",
    nn.Dropout2d: "identity",
    nn.AlphaDropout: "identity",
    nn.Identity: "identity",
    nn.Softmax: "softmax",
    nn.LogSoftmax: "log_softmax",
}
if _TvPermute is not None:
    MODULE_KINDS[_TvPermute] = "permute"

#: Modules of optional libraries, by class name (no import of timm here): stochastic depth.
NAMED_MODULE_KINDS: dict[str, str] = {"DropPath": "identity", "StochasticDepth": "identity"}

FUNCTION_KINDS: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu_: "relu",
    F.relu6: "activation",
    F.silu: "activation",
    F.gelu: "activation",
    F.hardswish: "activation",
    F.leaky_relu: "activation",
    F.mish: "activation",
    F.elu: "activation",
    F.selu: "activation",
    F.celu: "activation",
    F.softplus: "activation",
    F.hardtanh: "activation",
    torch.tanh: "activation",
    F.tanh: "activation",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    F.hardsigmoid: "sigmoid",
    F.softmax: "softmax",
    torch.softmax: "softmax",
    F.log_softmax: "log_softmax",
    torch.log_softmax: "log_softmax",
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.sub: "sub",
    operator.isub: "sub",
    torch.sub: "sub",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    torch.div: "div",
    torch.cat: "cat",
    torch.concat: "cat",
    torch.flatten: "reshape",
    torch.reshape: "reshape",
    torch.squeeze: "reshape",
    torch.unsqueeze: "reshape",
    torch.permute: "permute",
    torch.transpose: "transpose",
    torch.swapaxes: "transpose",
    torch.movedim: "permute",
    torch.chunk: "split",
    torch.split: "split",
    torch.tensor_split: "split",
    torch.unbind: "split",
    torch.broadcast_to: "expand",
    torch.mean: "mean",
    torch.sum: "sum",
    F.pad: "pad",
    F.adaptive_avg_pool2d: "adaptive_avgpool",
    F.avg_pool2d: "avgpool",
    F.max_pool2d: "maxpool",
    F.batch_norm: "batchnorm",
    F.layer_norm: "layernorm",
    F.group_norm: "groupnorm",
    F.dropout: "identity",
    operator.getitem: "getitem",
    getattr: "getattr",
    operator.matmul: "matmul",
    torch.matmul: "matmul",
    torch.bmm: "matmul",
    F.scaled_dot_product_attention: "attention",
    torch.roll: "reindex",
}
if _tv_stochastic_depth is not None:
    FUNCTION_KINDS[_tv_stochastic_depth] = "identity"
try:  # torchvision's Swin gathers 2×2 patches in a function torch.fx keeps whole
    from torchvision.models.swin_transformer import _patch_merging_pad as _tv_patch_merging_pad

    FUNCTION_KINDS[_tv_patch_merging_pad] = "reindex"
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass
FUNCTION_KINDS.update(DECOMPOSED_KINDS)  # the functions of rewritten attention (decompose.py)

METHOD_KINDS: dict[str, str] = {
    "view": "reshape",
    "reshape": "reshape",
    "flatten": "reshape",
    "unflatten": "reshape",
    "squeeze": "reshape",
    "unsqueeze": "reshape",
    "view_as": "reshape",
    "reshape_as": "reshape",
    "permute": "permute",
    "transpose": "transpose",
    "swapaxes": "transpose",
    "movedim": "permute",
    "expand": "expand",
    "expand_as": "expand",
    "chunk": "split",
    "split": "split",
    "tensor_split": "split",
    "unbind": "split",
    "contiguous": "identity",
    "clone": "identity",
    "relu": "relu",
    "relu_": "relu",
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
    "tanh": "activation",
    "add": "add",
    "add_": "add",
    "sub": "sub",
    "mul": "mul",
    "mul_": "mul",
    "div": "div",
    "mean": "mean",
    "sum": "sum",
    "softmax": "softmax",
    "log_softmax": "log_softmax",
    "size": "meta",
    "dim": "meta",
    "numel": "meta",
    "matmul": "matmul",
    "bmm": "matmul",
    "roll": "reindex",
}

#: ``getattr`` of these attributes is a shape/type query (meta); any other attribute is unknown.
META_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "is_contiguous"}

#: Kinds whose nodes carry no relevance (shape queries and the integer arithmetic on them).
NON_TENSOR_KINDS = {"meta"}

#: Kinds that keep a non-negative input non-negative (for the graph's sign inference).
SIGN_KEEPING_KINDS = {"maxpool", "avgpool", "adaptive_avgpool", "reshape", "identity", "cat", "permute",
                      "transpose", "expand", "getitem", "split", "mean", "sum", "pad"}

#: Structural kinds a gate may pass through between its sigmoid and the product (SE: view / expand).
_GATE_TRANSPARENT = {"reshape", "permute", "transpose", "expand", "identity", "getitem"}

#: Nodes the explained output may be followed by (skipped: explanations use the logits).
OUTPUT_ACTIVATION_KINDS = {"sigmoid", "softmax", "log_softmax", "identity"}

_BINARY_ARITH = {"add", "sub", "mul", "div"}


def module_kind(module: nn.Module) -> str:
    """The kind of a leaf module (its class or the nearest base class in :data:`MODULE_KINDS`)."""
    for cls in type(module).__mro__:
        if cls in MODULE_KINDS:
            return MODULE_KINDS[cls]
    return NAMED_MODULE_KINDS.get(type(module).__name__, "unknown")


def call_kind(op: str, target: Any, args: tuple) -> str:
    """The kind of a ``call_function`` / ``call_method`` node before its operands are looked at."""
    if op == "call_function":
        kind = FUNCTION_KINDS.get(target, "unknown")
        if kind == "getattr":
            attr = args[1] if len(args) > 1 else None
            return "meta" if attr in META_ATTRIBUTES else "unknown"
        return kind
    if op == "call_method":
        return METHOD_KINDS.get(target, "unknown")
    return "unknown"


def refine_kind(kind: str, data_operands: int, meta_only: bool) -> str:
    """Refine a kind once the operands are known.

    ``data_operands``: how many node operands depend on the model input (as data, not through a
    shape query); ``meta_only``: every node operand is meta (so the node computes a shape).
    * any op on meta operands only is meta (``x.size(1) // 2``, ``h * w``);
    * ``add``/``sub`` with one data operand is ``constant_add`` (bias, positional embedding,
      ``x + 3``); ``mul``/``div`` with one data operand is ``gated_mul`` (layer scale ``γ·x``,
      ``x / 2``): exact for every rule, all relevance to the data operand;
    * ``div`` of two data operands stays ``unknown`` (no rule).
    """
    if meta_only and kind not in ("input", "constant"):
        return "meta"
    if kind in ("add", "sub") and data_operands == 1:
        return "constant_add"
    if kind in ("mul", "div"):
        if data_operands == 1:
            return "gated_mul"
        if kind == "div":
            return "unknown"
    return kind


def is_binary_arith(kind: str) -> bool:
    return kind in _BINARY_ARITH


def gate_root(node) -> Optional[Any]:
    """The node a factor comes from, looking through structural ops (a gate's view / expand)."""
    seen = 0
    while node is not None and node.kind in _GATE_TRANSPARENT and node.inputs and seen < 64:
        data = [i for i in node.inputs if i.kind not in NON_TENSOR_KINDS and i.kind != "constant"]
        if len(data) != 1:
            break
        node = data[0]
        seen += 1
    return node


def is_gate(node) -> bool:
    """A factor is a gate when it is the output of a sigmoid / hard sigmoid (squeeze-excitation,
    ECA, GLU's σ), possibly reshaped or expanded on the way to the product."""
    root = gate_root(node)
    return root is not None and root.kind == "sigmoid"
