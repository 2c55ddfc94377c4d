"""Transformers in the one engine: the decomposed attention graphs compute what the models compute,
and relevance through them obeys the exact identities of docs/rules.md §10 (float64).

Small configurations of torchvision's ViT / Swin and timm's ViT / Swin (random weights, 32–56 px),
one model alive at a time."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cxr_explain.attribution import decompose as D
from cxr_explain.attribution import rules as R
from cxr_explain.attribution.decompose import swin_partition
from cxr_explain.attribution.graph import record_forward, trace

F64 = torch.float64
torch.fx.wrap("swin_partition")  # a leaf call in the test module below, as in a rewritten graph


def tv_vit(layers: int = 2):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=layers, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=4)


def tv_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)  # window 3 on a 10×10 map: padding, shifted windows and their mask all occur
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[3, 3],
                           num_classes=4)


def timm_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             embed_dim=16, num_heads=2, num_classes=4)


def timm_swin():
    import timm

    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, depths=(2, 2),
                             num_heads=(2, 2), embed_dim=16, num_classes=4)


MODELS = {"tv_vit": (tv_vit, 32), "tv_swin": (tv_swin, 40), "timm_vit": (timm_vit, 32), "timm_swin": (timm_swin, 56)}


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero biases, LayerNorm affine parameters, embeddings and heads, as a trained model has
    (torchvision's ViT starts with an all-zero head, whose logits are its bias alone)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(p + (torch.rand(p.shape, generator=g) - 0.5) * 0.2 * (p.dim() == 1 or "token" in name
                                                                                 or "pos_embed" in name))
    return model.eval()


def images(b: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ------------------------------------------------------------------------------------------
# The decomposed graphs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(MODELS))
def test_decomposed_graph_computes_the_model(arch):
    build, size = MODELS[arch]
    model = randomise(build()).to(F64)
    x = images(2, size)
    traced = trace(model)
    ops = {n.op for n in traced.nodes}
    assert "MultiheadAttention" not in ops and "shifted_window_attention" not in ops
    assert len([n for n in traced.nodes if n.kind == "input"]) == 1  # timm's attn_mask argument is fixed
    with torch.no_grad():
        ref = model(x)
        got = record_forward(traced, x)[traced.logits]
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


class CrossAttention(nn.Module):
    """Queries from one projection of the image, keys and values from another."""

    def __init__(self, batch_first: bool, kdim=None):
        super().__init__()
        self.batch_first = batch_first
        self.a, self.b = nn.Linear(12, 8), nn.Linear(12, kdim or 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(8 * 16, 3)

    def forward(self, x):
        t = x.reshape(x.shape[0], 16, 12)
        q, kv = self.a(t), self.b(t)
        if not self.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        out = self.mha(q, kv, kv)[0]
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out.flatten(1))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 6])
def test_multihead_attention_variants_decompose_exactly(batch_first, kdim):
    torch.manual_seed(0)
    model = randomise(CrossAttention(batch_first, kdim)).to(F64)
    x = images(3, 8)
    traced = trace(model)
    assert not any(n.op == "MultiheadAttention" for n in traced.nodes)
    with torch.no_grad():
        torch.testing.assert_close(record_forward(traced, x)[traced.logits], model(x), rtol=1e-12, atol=1e-12)


def test_multihead_attention_with_a_padding_mask_is_left_whole():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(12, 2, batch_first=True)
            self.register_buffer("pad", torch.zeros(2, 16, dtype=torch.bool))

        def forward(self, x):
            t = x.reshape(x.shape[0], 16, 12)
            return self.mha(t, t, t, key_padding_mask=self.pad)[0].flatten(1)

    traced = trace(Masked())
    assert [n.kind for n in traced.nodes if n.op == "MultiheadAttention"] == ["unknown"]


def test_projection_views_read_the_live_weights():
    model = CrossAttention(True).to(F64).eval()
    traced = trace(model)
    x = images(1, 8)
    with torch.no_grad():
        model.mha.in_proj_weight.mul_(2.0)  # in place, after tracing
        torch.testing.assert_close(record_forward(traced, x)[traced.logits], model(x), rtol=1e-12, atol=1e-12)


def test_swin_partition_relevance_is_the_transposed_selection():
    """Reindex on Swin's window partition (padding and shift) equals Pᵀ R for the 0/1 matrix P of the
    op, built by applying it to basis vectors."""
    shape, window, shift = (1, 4, 5, 2), [3, 3], [1, 1]
    n = int(np.prod(shape))
    basis = torch.eye(n, dtype=F64).reshape(n, *shape[1:])
    P = torch.cat([D.swin_partition(b.unsqueeze(0), window, shift).reshape(1, -1) for b in basis]).T  # (out, in)
    assert set(P.unique().tolist()) <= {0.0, 1.0} and bool((P.sum(1) <= 1).all())
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=shape))

    class Part(nn.Module):
        def forward(self, x):
            return swin_partition(x.reshape(1, 4, 5, 2), window, shift).flatten(1)

    traced = trace(Part())
    node = next(n for n in traced.nodes if n.kind == "reindex")
    rec = record_forward(traced, x.reshape(1, 2, 4, 5))
    out = rec[node]
    Rout = torch.tensor(rng.normal(size=(2, *out.shape)))
    got = R.Reindex().backward(R.Step(node, [rec[node.inputs[0]]], out, rec, 2, {}, input_nodes=node.inputs[:1]),
                               Rout)[0]
    ref = (Rout.reshape(2, -1) @ P).reshape(2, *shape)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
