"""RSP, Relative Sectional Propagation (Nam et al., AAAI 2021), as the authors' code computes it
(``docs/rules.md`` §4). Defined for plain convolutional chains (VGG) only.

* Start: at the last ReLU before the final max-pool (VGG-16 ``features[29]``), the Grad-CAM-like
  tensor ``T = A ⊙ mean_hw(∂y_t/∂A)`` (channels kept), divided by ``max(T) + 1e-9``; the
  classifier is never traversed.
* Conv (hidden): ``R⁺ = max(R,0)``, ``R⁻ = max(−R,0)``, ``x = a⁺``; "comparative gradient" kernels
  ``G± = ∂/∂W Σ conv(x, W)·R±`` (the layer's own weights are not used);
  ``C1 = x ⊙ G⁺ᵀ sdiv(R⁺, conv(x, G⁺)·[R⁺≠0])``, ``C2`` likewise with ``G⁻, R⁻``;
  k > 1: ``C = 2(C1 − C2)`` then ``C_i ← C_i − ΣR/Γ`` on the non-zero entries; 1×1: ``C = C1 − C2``.
* Max-pool: the z-rule on ``x + 1e-9`` (all relevance to the arg-max, also where the max is 0);
  ReLU identity; BatchNorm masked pass-through; first conv zᴮ with the image's min/max.
"""
from __future__ import annotations


import torch
from torch.nn.grad import conv2d_input, conv2d_weight

from ..errors import CxrExplainError
from . import rules as R
from .gradients import Choose, per_target_gradients
from .graph import ForwardRecord, LayerNode, TracedModel, record_forward
from .targets import Selection

Tensor = torch.Tensor


class RspConv(R.Rule):
    """RSP's hidden convolution rule (docs/rules.md §4.2)."""

    name = "rsp-conv"

    def backward(self, step, Rout):
        m = step.node.module
        x = step.x.clamp(min=0)
        k = Rout.shape[0]
        Rm = R.merge_kb(Rout)
        xs = x.repeat(k, *([1] * (x.dim() - 1)))
        out = torch.empty_like(xs)
        conv = lambda inp, w: torch.nn.functional.conv2d(inp, w, None, m.stride, m.padding, m.dilation, m.groups)  # noqa: E731
        back = lambda s, w: conv2d_input(inp_shape, w, s, m.stride, m.padding, m.dilation, m.groups)  # noqa: E731
        inp_shape = (1, *x.shape[1:])
        one_by_one = tuple(m.kernel_size) == (1, 1)
        for i in range(Rm.shape[0]):  # the comparative kernels differ per sample
            xi, ri = xs[i:i + 1], Rm[i:i + 1]
            parts = []
            for rpart in (ri.clamp(min=0), (-ri).clamp(min=0)):
                G = conv2d_weight(xi, m.weight.shape, rpart, m.stride, m.padding, m.dilation, m.groups)
                z = conv(xi, G) * (rpart != 0)
                parts.append(xi * back(R.sdiv(rpart, z), G))
            c = parts[0] - parts[1]
            if not one_by_one:
                c = 2 * c
                nz = c != 0
                gamma = nz.sum()
                if gamma > 0:
                    c = c - (ri.sum() / gamma) * nz
            out[i:i + 1] = c
        return [R.split_kb(out, k)]


class RspMaxPool(R.Rule):
    """Max-pool z-rule on ``x + 1e-9``: ``R`` goes to each window's arg-max, even where the max is 0."""

    name = "rsp-maxpool"

    def backward(self, step, Rout):
        shifted = R.Step(step.node, step.inputs, step.output + 1.0, step.record, step.n_targets, step.cache)
        return R.WinnerTakesAll().backward(shifted, Rout)  # output + 1 is never 0: no masking


RSP_RULES = {
    "conv": RspConv(),
    ("conv", "first"): R.zbox("safe"),
    "relu": R.Pass(),
    "identity": R.Pass(),
    "batchnorm": R.MaskedPass(),
    "maxpool": RspMaxPool(),
}


def rsp_start_node(traced: TracedModel) -> LayerNode:
    """The input of the last max-pool of a plain conv chain (VGG-16: ``features[29]``), or an error."""
    kinds = {n.kind for n in traced.relevant_nodes()}
    if kinds & {"add", "cat"}:
        raise CxrExplainError(
            "RSP is defined for plain convolutional chains (VGG) only: the authors' ResNet RSP crashes "
            "and there is none for DenseNet (docs/rules.md §4.4); use rap or lrp for this model"
        )
    pools = [n for n in traced.relevant_nodes() if n.kind == "maxpool"]
    if not pools:
        raise CxrExplainError("RSP needs a VGG-style model whose features end with a max-pool")
    return pools[-1].inputs[0]


def rsp_start(traced: TracedModel, x: Tensor, choose: Choose) -> tuple[LayerNode, Tensor, Tensor, Selection, ForwardRecord]:
    """(start node, start relevance (K, B, C, h, w), logits, selection, forward record) for RSP."""
    node = rsp_start_node(traced)
    with torch.enable_grad():
        record = record_forward(traced, x.detach(), detach_at=node)
        A = record[node]
        logits = record[traced.logits]
        sel = choose(logits.detach())
        starts = []
        for k, g in per_target_gradients(logits, A, sel):
            T = (A * g.mean((2, 3), keepdim=True)).detach()
            mx = T.flatten(1).max(1).values.view(-1, 1, 1, 1)
            starts.append(T / (mx + 1e-9) * sel.valid[:, k].view(-1, 1, 1, 1))
    record.values = {n: (v.detach() if isinstance(v, Tensor) else v) for n, v in record.values.items()}
    return node, torch.stack(starts), logits.detach(), sel, record
