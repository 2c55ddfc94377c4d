"""Rewrite composite attention ops of a traced graph into ops the engine has rules for.

torch.fx keeps ``nn.MultiheadAttention`` (torchvision's ViT) and torchvision's Swin
``shifted_window_attention`` as single calls whose insides the rules cannot see. After tracing,
:func:`decompose` replaces each by the same computation spelled out as graph nodes:

* the input projections as ``nn.Linear`` modules (the model's own, or :class:`LinearView` over
  ``nn.MultiheadAttention``'s packed ``in_proj_weight``), so every method's Linear rule applies;
* head split / merge and Swin's window partition as *reindex* nodes (entries moved, nothing mixed);
* the attention itself as one :func:`attention` node (``softmax(scale·q kᵀ + bias) v``);
* the output projection as the model's own ``nn.Linear``.

The rewritten graph computes the same outputs (tests compare it with the model in float64); a
call whose options are not covered (key-padding masks, ``add_zero_attn``, Swin V2's cosine
attention …) is left as it was, and propagation methods then name it as unsupported.
"""
from __future__ import annotations

import inspect
import math
import operator
from typing import Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor

# --------------------------------------------------------------------------------------------
# The functions the rewritten graph calls
# --------------------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """``softmax(scale · q kᵀ + bias) v`` for q (…, L, d), k (…, M, d), v (…, M, dv); ``scale``
    defaults to ``1/√d``; ``bias`` is added to the logits (relative position bias, masks)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if bias is not None:
        s = s + bias
    return torch.matmul(torch.softmax(s, dim=-1), v)


def split_heads(t: Tensor, index: int, parts: int, num_heads: int, seq_first: bool = False) -> Tensor:
    """Part ``index`` of ``parts`` (q, k, v of a packed projection) of t (…, L, parts·H·d), as
    (…, H, L, d); ``seq_first``: t is (L, N, …) and the result (N, H, L, d)."""
    if seq_first:
        t = t.transpose(0, 1)
    t = t.unflatten(-1, (parts, num_heads, -1)).select(-3, index)  # (…, L, H, d)
    return t.transpose(-3, -2)


def merge_heads(t: Tensor, seq_first: bool = False) -> Tensor:
    """(…, H, L, d) -> (…, L, H·d); ``seq_first``: (N, H, L, d) -> (L, N, H·d)."""
    out = t.transpose(-3, -2).flatten(-2)
    return out.transpose(0, 1) if seq_first else out


def _swin_geometry(shape: Sequence[int], window_size: Sequence[int], shift_size: Sequence[int]):
    """Padding, padded size and effective shift of torchvision's ``shifted_window_attention``."""
    _, H, W, _ = shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    pad_H, pad_W = H + pad_b, W + pad_r
    shift = list(shift_size)
    if window_size[0] >= pad_H:  # a window larger than the map: no shift
        shift[0] = 0
    if window_size[1] >= pad_W:
        shift[1] = 0
    return pad_r, pad_b, pad_H, pad_W, shift


def swin_partition(x: Tensor, window_size: list[int], shift_size: list[int]) -> Tensor:
    """(B, H, W, C) -> (B, nW, ws₀·ws₁, C): zero-pad to whole windows, roll by −shift, cut windows.
    The image axis stays first (torchvision folds the windows into it), so every node keeps one
    entry per image on its leading axis."""
    B, H, W, C = x.shape
    pad_r, pad_b, pad_H, pad_W, shift = _swin_geometry(x.shape, window_size, shift_size)
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nh, nw = pad_H // window_size[0], pad_W // window_size[1]
    x = x.view(B, nh, window_size[0], nw, window_size[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, nh * nw, window_size[0] * window_size[1], C)


def swin_unpartition(x: Tensor, shape: Sequence[int], window_size: list[int], shift_size: list[int]) -> Tensor:
    """The inverse of :func:`swin_partition` for an input of ``shape`` (B, H, W, C'): windows
    (B, nW, N, C) back to the padded map, roll by +shift, crop the padding."""
    B, H, W, _ = shape
    C = x.shape[-1]
    _, _, pad_H, pad_W, shift = _swin_geometry(shape, window_size, shift_size)
    nh, nw = pad_H // window_size[0], pad_W // window_size[1]
    x = x.view(B, nh, nw, window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


def swin_attention_bias(relative_position_bias: Tensor, shape: Sequence[int], window_size: list[int],
                        shift_size: list[int]) -> Tensor:
    """The additive logits bias of torchvision's window attention for an input of ``shape``:
    the relative position bias (1, H, N, N), plus, for shifted windows, −100 between tokens that
    came from different regions of the rolled map, as (nW, H, N, N) (the logits are (B, nW, H, N, N))."""
    _, _, pad_H, pad_W, shift = _swin_geometry(shape, window_size, shift_size)
    if sum(shift) == 0:
        return relative_position_bias
    nw = (pad_H // window_size[0]) * (pad_W // window_size[1])
    n = window_size[0] * window_size[1]
    mask = relative_position_bias.new_zeros((pad_H, pad_W))
    h_slices = ((0, -window_size[0]), (-window_size[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window_size[1]), (-window_size[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            mask[h[0]: h[1], w[0]: w[1]] = count
            count += 1
    mask = mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
    mask = mask.permute(0, 2, 1, 3).reshape(nw, n)
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
    return relative_position_bias + mask.unsqueeze(1)  # (nW, H, N, N)


# kinds of the functions above (graph.py merges them into its tables)
FUNCTION_KINDS = {
    attention: "attention",
    split_heads: "reindex",
    merge_heads: "reindex",
    swin_partition: "reindex",
    swin_unpartition: "reindex",
    swin_attention_bias: "constant",
}


class LinearView(nn.Linear):
    """An ``nn.Linear`` over another module's parameters (``nn.MultiheadAttention``'s packed
    ``in_proj_weight`` / ``in_proj_bias``, or rows of them), read live: no copy, so the engine's
    Linear rules and weight caches see the model's current weights."""

    def __init__(self, owner: nn.Module, weight: str, bias: Optional[str], weight_rows: Optional[slice] = None,
                 bias_rows: Optional[slice] = None):
        nn.Module.__init__(self)
        object.__setattr__(self, "_owner", owner)  # not a submodule: the model keeps owning it
        self._names = (weight, bias)
        self._rows = (weight_rows, bias_rows)
        self.out_features, self.in_features = self.weight.shape

    def _get(self, i: int) -> Optional[Tensor]:
        name, rows = self._names[i], self._rows[i]
        t = getattr(self._owner, name) if name else None
        return t if t is None or rows is None else t[rows]

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self._get(0)

    @property
    def bias(self) -> Optional[Tensor]:  # type: ignore[override]
        return self._get(1)


# --------------------------------------------------------------------------------------------
# The rewrite
# --------------------------------------------------------------------------------------------


def decompose(gm: fx.GraphModule, root: nn.Module) -> None:
    """Rewrite every supported ``nn.MultiheadAttention`` call and torchvision Swin window
    attention in ``gm`` (traced from ``root``) in place."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MultiheadAttention):
            changed |= _decompose_mha(gm, node)
        elif node.op == "call_function" and getattr(node.target, "__name__", "") == "shifted_window_attention" \
                and getattr(node.target, "__module__", "") == "torchvision.models.swin_transformer":
            changed |= _decompose_swin(gm, root, node)
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()


def _unique(gm: fx.GraphModule, base: str) -> str:
    name, i = base.replace(".", "_"), 0
    while hasattr(gm, name if i == 0 else f"{name}_{i}"):
        i += 1
    return name if i == 0 else f"{name}_{i}"


def _decompose_mha(gm: fx.GraphModule, node: fx.Node) -> bool:
    mha: nn.MultiheadAttention = gm.get_submodule(node.target)
    try:
        bound = inspect.signature(nn.MultiheadAttention.forward).bind(mha, *node.args, **node.kwargs)
    except TypeError:
        return False
    bound.apply_defaults()
    a = bound.arguments
    if (a["key_padding_mask"] is not None or a["attn_mask"] is not None or a["is_causal"]
            or mha.bias_k is not None or mha.add_zero_attn or mha.dropout and mha.training):
        return False
    users = list(node.users)
    if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1) for u in users):
        return False
    if any(u.args[1] == 1 and u.users for u in users):  # the attention weights are used: keep the module
        return False
    E, H = mha.embed_dim, mha.num_heads
    seq_first = not mha.batch_first
    q_in, k_in, v_in = a["query"], a["key"], a["value"]
    path = node.target
    with gm.graph.inserting_before(node):
        if mha._qkv_same_embed_dim and q_in is k_in is v_in:
            name = _unique(gm, f"{path}.in_proj")
            gm.add_submodule(name, LinearView(mha, "in_proj_weight", "in_proj_bias"))
            qkv = gm.graph.call_module(name, (q_in,))
            qkv.meta["cxr_module_path"] = f"{path}.in_proj"
            q, k, v = (gm.graph.call_function(split_heads, (qkv, i, 3, H, seq_first)) for i in range(3))
        else:
            heads = []
            for i, (inp, part) in enumerate(((q_in, "q"), (k_in, "k"), (v_in, "v"))):
                rows = slice(i * E, (i + 1) * E)
                if mha._qkv_same_embed_dim:
                    view = LinearView(mha, "in_proj_weight", "in_proj_bias", rows, rows)
                else:
                    view = LinearView(mha, f"{part}_proj_weight", "in_proj_bias", None, rows)
                name = _unique(gm, f"{path}.{part}_proj")
                gm.add_submodule(name, view)
                proj = gm.graph.call_module(name, (inp,))
                proj.meta["cxr_module_path"] = f"{path}.{part}_proj"
                heads.append(gm.graph.call_function(split_heads, (proj, 0, 1, H, seq_first)))
            q, k, v = heads
        o = gm.graph.call_function(attention, (q, k, v))
        merged = gm.graph.call_function(merge_heads, (o, seq_first))
        out = gm.graph.call_module(f"{path}.out_proj", (merged,))
    for u in users:
        if u.args[1] == 0:
            u.replace_all_uses_with(out)
        gm.graph.erase_node(u)
    gm.graph.erase_node(node)
    return True


def _decompose_swin(gm: fx.GraphModule, root: nn.Module, node: fx.Node) -> bool:
    from torchvision.models.swin_transformer import shifted_window_attention

    try:
        bound = inspect.signature(shifted_window_attention).bind(*node.args, **node.kwargs)
    except TypeError:
        return False
    bound.apply_defaults()
    a = bound.arguments
    if a["logit_scale"] is not None or (a["training"] and (a["attention_dropout"] or a["dropout"])):
        return False  # Swin V2's cosine attention; dropout in training mode

    def linear_of(weight: fx.Node, bias) -> Optional[str]:
        """The nn.Linear of ``root`` whose weight (and bias) the call reads through get_attr."""
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target.endswith(".weight")):
            return None
        path = weight.target[: -len(".weight")]
        try:
            module = root.get_submodule(path)
        except AttributeError:
            return None
        if not isinstance(module, nn.Linear):
            return None
        if bias is None and module.bias is not None:
            return None
        if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr" and bias.target == f"{path}.bias"):
            return None
        return path

    qkv_path = linear_of(a["qkv_weight"], a["qkv_bias"])
    proj_path = linear_of(a["proj_weight"], a["proj_bias"])
    if qkv_path is None or proj_path is None:
        return False
    x, heads = a["input"], int(a["num_heads"])
    window, shift = list(a["window_size"]), list(a["shift_size"])
    names = []
    for path in (qkv_path, proj_path):
        name = _unique(gm, path)
        gm.add_submodule(name, root.get_submodule(path))
        names.append(name)
    with gm.graph.inserting_before(node):
        shape = gm.graph.call_function(getattr, (x, "shape"))
        windows = gm.graph.call_function(swin_partition, (x, window, shift))
        qkv = gm.graph.call_module(names[0], (windows,))
        qkv.meta["cxr_module_path"] = qkv_path
        q, k, v = (gm.graph.call_function(split_heads, (qkv, i, 3, heads)) for i in range(3))
        bias = gm.graph.call_function(swin_attention_bias, (a["relative_position_bias"], shape, window, shift))
        o = gm.graph.call_function(attention, (q, k, v, bias))
        proj = gm.graph.call_module(names[1], (gm.graph.call_function(merge_heads, (o,)),))
        proj.meta["cxr_module_path"] = proj_path
        out = gm.graph.call_function(swin_unpartition, (proj, shape, window, shift))
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return True

