"""Transformers in the one engine: the decomposed attention graphs compute what the models compute,
and relevance through them obeys the exact identities of docs/rules.md §10 (float64).

Small configurations of torchvision's ViT / Swin and timm's ViT / Swin (random weights, 32–56 px),
one model alive at a time."""
from __future__ import annotations

import math

import numpy as np
import pytest
from peers import lxt_vit_patches
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
    timm = pytest.importorskip("timm")  # optional; CI installs it

    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             embed_dim=16, num_heads=2, num_classes=4)


def timm_swin():
    timm = pytest.importorskip("timm")  # optional; CI installs it

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
    # roles: the patch embedding is the only first layer (the class token's expand to the batch size
    # reads the input's shape, not its data), the classifier the head
    assert [n.module_path for n in traced.nodes if n.role == "first"] == \
        [{"tv_vit": "conv_proj", "tv_swin": "features.0.0"}.get(arch, "patch_embed.proj")]
    assert [n.module_path for n in traced.nodes if n.role == "head"] == \
        [{"tv_vit": "heads.head", "tv_swin": "head", "timm_vit": "head"}.get(arch, "head.fc")]


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


# ------------------------------------------------------------------------------------------
# Exact identities on small attention networks (only ops the engine had before transformers)
# ------------------------------------------------------------------------------------------


def half(t: torch.Tensor) -> torch.Tensor:
    """The value of ``t`` with half its gradient: AttnLRP's uniform rule as a modified gradient."""
    return 0.5 * t + 0.5 * t.detach()


class ToyExplicit(nn.Module):
    """softmax(q kᵀ + bias) v spelled out with matmuls: data @ constant, constant @ data, data @ data."""

    def __init__(self):
        super().__init__()
        self.wq, self.wk, self.wv = (nn.Parameter(torch.randn(*s) * 0.4) for s in ((12, 8), (8, 12), (12, 8)))
        self.bias = nn.Parameter(torch.randn(16, 16) * 0.3)
        self.head = nn.Linear(16 * 8, 3)

    def forward(self, x, mode: str = "plain"):
        t = x.reshape(x.shape[0], 16, 12)
        q, kt, v = torch.matmul(t, self.wq), torch.matmul(self.wk, x.reshape(x.shape[0], 12, 16)), t @ self.wv
        if mode == "attnlrp":
            q, kt = half(q), half(kt)
        a = torch.softmax(torch.matmul(q, kt) + self.bias, dim=-1)
        if mode == "attnlrp":
            a, v = half(a), half(v)
        elif mode == "cp":
            a = a.detach()
        return self.head(torch.matmul(a, v).flatten(1))


def reference_mha(mha: nn.MultiheadAttention, x: torch.Tensor, mode: str) -> torch.Tensor:
    """nn.MultiheadAttention (batch first, self-attention) written out, with AttnLRP's halved
    gradients (``attnlrp``) or detached attention weights (``cp``)."""
    n, length, e = x.shape
    q, k, v = (t.reshape(n, length, mha.num_heads, -1).transpose(1, 2)
               for t in F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1))
    return mha.out_proj(reference_attention(q, k, v, mode).transpose(1, 2).reshape(n, length, e))


def reference_attention(q, k, v, mode: str) -> torch.Tensor:
    """softmax(q kᵀ/√d) v with AttnLRP's halved gradients or CP-LRP's detached weights."""
    if mode == "attnlrp":
        q, k = half(q), half(k)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    if mode == "attnlrp":
        a, v = half(a), half(v)
    elif mode == "cp":
        a = a.detach()
    return a @ v


class ToyBlock(nn.Module):
    """Token embedding, a residual nn.MultiheadAttention or scaled_dot_product_attention block, a
    residual ReLU MLP, a Linear head over all tokens."""

    def __init__(self, sdpa: bool = False):
        super().__init__()
        self.sdpa = sdpa
        self.embed = nn.Linear(12, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.q, self.k, self.v, self.out = (nn.Linear(8, 8) for _ in range(4))
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(16 * 8, 3)

    def forward(self, x, mode: str = "plain"):
        b = x.shape[0]
        t = self.embed(x.reshape(b, 16, 12))
        if self.sdpa:  # heads cut by a reshape only: (B, 16, 8) -> (B, 2, 16, 4)
            q, k, v = (lin(t).reshape(b, 2, 16, 4) for lin in (self.q, self.k, self.v))
            o = F.scaled_dot_product_attention(q, k, v) if mode == "plain" else reference_attention(q, k, v, mode)
            att = self.out(o.reshape(b, 16, 8))
        elif mode == "plain":
            att = self.mha(t, t, t, need_weights=False)[0]
        else:
            att = reference_mha(self.mha, t, mode)
        t = t + att
        t = t + self.fc(torch.relu(t))
        return self.head(t.flatten(1))


def modified_gradient_x_input(model: nn.Module, x: torch.Tensor, target: int, mode: str) -> torch.Tensor:
    xg = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg, mode=mode)[:, target].sum(), xg)
    return (xg * g).detach()


@pytest.mark.parametrize("cp", [False, True])
def test_attnlrp_equals_gradient_x_input_with_halved_or_detached_products(cp):
    """AttnLRP with ε = 0 is gradient × input of the network whose bilinear products pass half the
    gradient to each operand (CP-LRP: whose attention weights are detached), docs/rules.md §10.7."""
    from cxr_explain.attribution import explain

    torch.manual_seed(3)
    model = ToyExplicit().to(F64).eval()
    x = images(2, 8)
    exp = explain(model, x, "attnlrp", target=1, epsilon=0.0, cp=cp, return_input_relevance=True)
    ref = modified_gradient_x_input(model, x, 1, "cp" if cp else "attnlrp")
    torch.testing.assert_close(exp.input_relevance, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))


@pytest.mark.parametrize("sdpa", [False, True])
@pytest.mark.parametrize("cp", [False, True])
def test_attnlrp_through_multihead_attention_and_sdpa_equals_the_identity(sdpa, cp):
    from cxr_explain.attribution import explain

    torch.manual_seed(4)
    model = randomise(ToyBlock(sdpa)).to(F64)
    x = images(2, 8)
    exp = explain(model, x, "attnlrp", target=[[0, 2]] * 2, epsilon=0.0, cp=cp, return_input_relevance=True)
    for j, t in enumerate((0, 2)):
        ref = modified_gradient_x_input(model, x, t, "cp" if cp else "attnlrp")
        torch.testing.assert_close(exp.input_relevance[:, j], ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))


def zero_biases(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    return model


@pytest.mark.parametrize("sdpa", [False, True])
def test_cp_lrp_conserves_without_biases_and_rap_conserves_with_them(sdpa):
    from cxr_explain.attribution import explain

    torch.manual_seed(5)
    model = randomise(ToyBlock(sdpa)).to(F64)
    x = images(3, 8)
    rap = explain(model, x, "rap", target=[[1, 2]] * 3)
    assert float(rap.conservation_error.max()) < 1e-8
    exp = explain(zero_biases(model), x, "attnlrp", target=[[1, 2]] * 3, cp=True, epsilon=0.0)
    assert float(exp.conservation_error.max()) < 1e-10
    full = explain(model, x, "attnlrp", target=[[1, 2]] * 3, epsilon=0.0)
    assert float(full.conservation_error.max()) > 1e-6  # the softmax expansion's bias: reported, not hidden


class ToyClassToken(nn.Module):
    """A learned token concatenated in front of the embedded tokens (for a batch of 2), attention,
    and the head reading the whole sequence."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 8)
        self.token = nn.Parameter(torch.randn(2, 1, 8))
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(17 * 8, 3)

    def forward(self, x):
        t = torch.cat([self.token, self.embed(x.reshape(x.shape[0], 16, 12))], dim=1)
        t = t + self.mha(t, t, t, need_weights=False)[0]
        return self.head(t.flatten(1))


def test_rap_shifts_a_class_tokens_share_back_onto_the_data():
    from cxr_explain.attribution import explain

    torch.manual_seed(6)
    model = randomise(ToyClassToken()).to(F64)
    x = images(2, 8)
    exp = explain(model, x, "rap", target=[[0, 1]] * 2, keep_relevance=["cat"])
    assert float(exp.conservation_error.max()) < 1e-8
    at_cat = exp.relevances["cat"]  # (B, K, 17, 8): the class token's row is not zero …
    assert float(at_cat[:, :, 0].abs().min()) > 0
    # … and the data rows received it through the uniform shift: Σ data rows = Σ at the cat
    emb = exp.layer_sums  # the shift happens at the cat node, the embedding then passes it on
    lin = next(k for k in emb if k.startswith("embed"))
    torch.testing.assert_close(emb[lin], at_cat.sum((2, 3)), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------
# torchvision's ViT: the exact identities of docs/rules.md §10.7, and LXT
# ------------------------------------------------------------------------------------------


def reference_layer_norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm with its scale σ detached (the σ-constant linear map of docs/rules.md §9)."""
    mean = x.mean(-1, keepdim=True)
    std = (((x - mean) ** 2).mean(-1, keepdim=True) + ln.eps).sqrt().detach()
    return (x - mean) / std * ln.weight + ln.bias


def reference_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU with its gate Φ(x) detached (the identity rule as a gradient)."""
    return x * (0.5 * (1 + torch.erf(x / math.sqrt(2)))).detach()


def reference_vit(model, x: torch.Tensor, mode: str) -> torch.Tensor:
    """torchvision's VisionTransformer written out from its parameters, with LayerNorm's σ and GELU's
    gate detached and the attention modified as ``mode`` says (see :func:`reference_attention`)."""
    n = x.shape[0]
    t = model.conv_proj(x).reshape(n, model.hidden_dim, -1).permute(0, 2, 1)
    t = torch.cat([model.class_token.expand(n, -1, -1), t], 1) + model.encoder.pos_embedding
    for block in model.encoder.layers:
        t = t + reference_mha(block.self_attention, reference_layer_norm(block.ln_1, t), mode)
        t = t + block.mlp[3](reference_gelu(block.mlp[0](reference_layer_norm(block.ln_2, t))))
    return model.heads.head(reference_layer_norm(model.encoder.ln, t)[:, 0])


class ReferenceViT(nn.Module):
    def __init__(self, model, mode):
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, x, mode=None):
        return reference_vit(self.model, x, self.mode)


@pytest.mark.parametrize("cp", [True, False])
def test_vit_attnlrp_equals_gradient_x_input_of_the_network_with_those_quantities_detached(cp):
    """THE exact identity on a whole ViT (float64): LRP with ε = 0 through patch embedding, class
    token, position embedding, LayerNorm (σ constant), attention (CP-LRP: weights constant; AttnLRP:
    halved products), GELU (identity rule), residuals and head equals gradient × input of the
    same network with those quantities detached."""
    from cxr_explain.attribution import explain

    model = randomise(tv_vit()).to(F64)
    x = images(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(reference_vit(model, x, "plain"), model(x), rtol=1e-12, atol=1e-12)
    exp = explain(model, x, "attnlrp", target=[[0, 3]] * 2, epsilon=0.0, cp=cp, return_input_relevance=True)
    ref_model = ReferenceViT(model, "cp" if cp else "attnlrp")
    for j, t in enumerate((0, 3)):
        ref = modified_gradient_x_input(ref_model, x, t, "plain")
        torch.testing.assert_close(exp.input_relevance[:, j], ref, rtol=0, atol=1e-6 * float(ref.abs().max()))


def _lxt_vit_patches():
    patches = lxt_vit_patches()
    if patches is None:
        pytest.skip("lxt is not installed (not a test extra: it pulls in transformers and bitsandbytes)")
    return patches


def test_vit_cp_lrp_equals_lxt():
    """Our attnlrp(cp) with ε = 0 equals LXT's CP-LRP recipe for torchvision's ViT (gradient × input
    through its patched GELU, LayerNorm and attention) in float64."""
    from cxr_explain.attribution import explain

    model = randomise(tv_vit()).to(F64)
    x = images(2, 32)
    ours = explain(model, x, "attnlrp", target=1, epsilon=0.0, cp=True, return_input_relevance=True).input_relevance
    saved = {cls: cls.__dict__.get("forward") for cls in (nn.GELU, nn.LayerNorm, nn.MultiheadAttention)}
    try:
        for cls, patch in _lxt_vit_patches().items():
            patch(cls)
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xg)[:, 1].sum(), xg)
    finally:
        for cls, fwd in saved.items():
            cls.forward = fwd
            if "original_forward" in cls.__dict__:
                delattr(cls, "original_forward")
    lxt_map = (xg * g).detach()
    torch.testing.assert_close(ours, lxt_map, rtol=0, atol=1e-6 * float(lxt_map.abs().max()))


# ------------------------------------------------------------------------------------------
# Coverage and conservation on the four models
# ------------------------------------------------------------------------------------------


def zero_additive_parameters(model: nn.Module) -> nn.Module:
    """Every bias, LayerNorm shift, class token and position embedding set to 0."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            last = name.split(".")[-1]
            if last.endswith("bias") or "token" in last or "pos_embed" in last:
                p.zero_()
    return model


@pytest.mark.parametrize("arch", list(MODELS))
def test_methods_produce_maps_on_transformers(arch):
    from cxr_explain.attribution import explain

    build, size = MODELS[arch]
    model = randomise(build())
    x = images(2, size).float()
    for method in ("lrp", "rap", "attnlrp", "gradient"):
        exp = explain(model, x, method, target=[[0, 2]] * 2, check_conservation=False)
        assert exp.maps.shape == (2, 2, size, size) and bool(torch.isfinite(exp.maps).all()), method
        assert float(exp.maps.abs().max()) > 0, method


@pytest.mark.parametrize("arch", list(MODELS))
def test_rap_conserves_and_cp_lrp_conserves_without_biases(arch):
    from cxr_explain.attribution import explain

    build, size = MODELS[arch]
    model = randomise(build()).to(F64)
    x = images(2, size)
    rap = explain(model, x, "rap", target=[[0, 2]] * 2)
    assert float(rap.conservation_error.max()) < 1e-8, arch
    errors = {cp: explain(model, x, "attnlrp", target=[[0, 2]] * 2, cp=cp).conservation_error for cp in (False, True)}
    cons = explain(zero_additive_parameters(model), x, "attnlrp", target=[[0, 2]] * 2, cp=True, epsilon=0.0)
    assert float(cons.conservation_error.max()) < 1e-6, arch
    print(f"{arch}: attnlrp conservation error with biases {float(errors[False].max()):.3g}, "
          f"cp {float(errors[True].max()):.3g}")
