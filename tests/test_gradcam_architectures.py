"""Grad-CAM on CNNs, ConvNeXt, ViT and Swin (torchvision and timm, random weights, 64 px) equals
pytorch-grad-cam with the target layer and reshape transform its documentation gives for each layout,
on the traced graph and on the model run through hooks (the same model behind a data-dependent check).
In float64, so that the two libraries' different summation orders stay far below the 1e-5 tolerance."""
from __future__ import annotations

import gc
from typing import Callable, Optional

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from nets import images, realistic
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cxr_explain.attribution import explain
from cxr_explain.attribution.graph import try_trace

SIZE = 64
TARGETS = [1, 3]


class Untraceable(nn.Module):
    """``net`` behind a shape check torch.fx cannot trace: explained through forward hooks."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        if hasattr(net, "num_prefix_tokens"):
            self.num_prefix_tokens = net.num_prefix_tokens
        if hasattr(net, "class_token"):
            self.class_token = net.class_token

    def forward(self, x):
        if x.shape[-1] != x.shape[-2]:
            raise ValueError("square images only")
        return self.net(x)


def tokens_to_nchw(prefix: int) -> Callable:
    """pytorch-grad-cam's ViT reshape transform: drop the class token, tokens -> (B, C, h, w)."""

    def reshape(t):
        n = t.shape[1] - prefix
        side = int(round(n ** 0.5))
        return t[:, prefix:, :].reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)

    return reshape


def nhwc_to_nchw(t):
    """pytorch-grad-cam's Swin reshape transform for (B, h, w, C) maps."""
    return t.permute(0, 3, 1, 2)


def tv(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=4, **kw)
    if name.startswith("vit"):  # torchvision zero-initialises the head: every gradient would be 0
        nn.init.normal_(model.heads.head.weight, std=0.02)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        realistic(model, size=SIZE)
    return model.eval()


def tm(name: str, **kw) -> nn.Module:
    timm = pytest.importorskip("timm")  # an optional package: CI installs it
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=4, **kw).eval()


# name: (builder, our layer (None: the default), its expected layout, the module pytorch-grad-cam hooks,
#        its reshape transform, the layer our default states on the traced graph / through hooks)
CASES: dict[str, tuple] = {
    "resnet50": (lambda: tv("resnet50"), None, "channels-first", lambda m: m.layer4, None, "layer4"),
    # DenseNet: pytorch-grad-cam's hook on features (norm5) is followed by torchvision's in-place
    # F.relu_, which rewrites its stored activation; the last dense block has no in-place successor.
    "densenet121": (lambda: tv("densenet121"), "features.denseblock4", "channels-first",
                    lambda m: m.features.denseblock4, None, "features.denseblock4"),
    "convnext_tiny": (lambda: tv("convnext_tiny"), None, "channels-first", lambda m: m.features, None, "features"),
    "convnext_tiny/norm": (lambda: tv("convnext_tiny"), "features.7.2.block.2", "channels-last",
                           lambda m: m.features[7][2].block[2], nhwc_to_nchw, "features.7.2.block.2"),
    "vit_b_16": (lambda: tv("vit_b_16", image_size=SIZE), None, "tokens",
                 lambda m: m.encoder.layers[-1].ln_1, tokens_to_nchw(1), "encoder.layers.encoder_layer_11.ln_1"),
    "swin_t": (lambda: tv("swin_t"), None, "channels-first", lambda m: m.norm, nhwc_to_nchw, None),
    "swin_t/norm": (lambda: tv("swin_t"), "norm", "channels-last", lambda m: m.norm, nhwc_to_nchw, "norm"),
    "efficientnet_b0": (lambda: tv("efficientnet_b0"), None, "channels-first", lambda m: m.features, None,
                        "features"),
    "timm_vit_small": (lambda: tm("vit_small_patch16_224", img_size=SIZE, depth=4), None, "tokens",
                       lambda m: m.blocks[-1].norm1, tokens_to_nchw(1), "blocks.3.norm1"),
    "timm_swin_tiny": (lambda: tm("swin_tiny_patch4_window7_224", img_size=SIZE, depths=(1, 1, 2, 1)), None,
                       "channels-last", lambda m: m.norm, nhwc_to_nchw, "norm"),
    "timm_convnext_tiny": (lambda: tm("convnext_tiny", depths=(1, 1, 2, 1)), None, "channels-first",
                           lambda m: m.stages, None, None),
}


def reference(model: nn.Module, x: torch.Tensor, layer: nn.Module, reshape: Optional[Callable], cls=GradCAM):
    """pytorch-grad-cam's raw map (before its min-max scaling and resize): ReLU(Σ_c α_c A_c)."""
    with cls(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in TARGETS])
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        return np.maximum(cam.get_cam_image(x, layer, None, acts, grads), 0)


@pytest.mark.parametrize("case", list(CASES))
def test_gradcam_equals_pytorch_grad_cam_and_states_its_layer(case):
    build, layer, layout, ref_layer, reshape, stated = CASES[case]
    model = build().double()
    x = images(2, SIZE, seed=3, dtype=torch.float64)
    ref = reference(model, x, ref_layer(model), reshape)
    assert ref.shape == (2, 2, 2) or ref.shape[1:] == (4, 4)
    hooked = Untraceable(model)
    assert try_trace(hooked) is None
    for net, prefix in ((model, ""), (hooked, "net.")):
        ours = explain(net, x, "gradcam", target=TARGETS, layer=None if layer is None else prefix + layer)
        assert ours.feature_layout == layout, (case, prefix)
        if stated is not None:
            assert ours.feature_layer == prefix + stated
        np.testing.assert_allclose(ours.raw_maps.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        assert ours.maps.shape == (2, SIZE, SIZE)
    del model, hooked
    gc.collect()


@pytest.mark.parametrize("case", ["vit_b_16", "convnext_tiny/norm", "timm_swin_tiny"])
def test_gradcam_plus_plus_equals_pytorch_grad_cam_in_every_layout(case):
    build, layer, layout, ref_layer, reshape, _ = CASES[case]
    model = build().double()
    x = images(2, SIZE, seed=4, dtype=torch.float64)
    ref = reference(model, x, ref_layer(model), reshape, cls=GradCAMPlusPlus)
    ours = explain(model, x, "gradcam++", target=TARGETS, layer=layer)
    assert ours.feature_layout == layout
    np.testing.assert_allclose(ours.raw_maps.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_cam_on_a_channels_last_average_pool_head_is_found_through_the_modules():
    """timm's Swin pools its (B, h, w, C) norm output with a mean over (h, w) before its Linear head:
    CAM = Σ_c w_tc A_c on that map (the traced graph has no pooling node for it: the module path)."""
    model = CASES["timm_swin_tiny"][0]().double()
    x = images(2, SIZE, seed=5, dtype=torch.float64)
    seen = {}
    handle = model.norm.register_forward_hook(lambda m, i, o: seen.update(A=o.detach()))
    ours = explain(model, x, "cam", target=TARGETS)
    handle.remove()
    W = model.head.fc.weight.detach()
    ref = torch.stack([torch.einsum("c,hwc->hw", W[t], seen["A"][b]) for b, t in enumerate(TARGETS)])
    assert ours.feature_layer == "input of head.global_pool" and ours.feature_layout == "channels-last"
    torch.testing.assert_close(ours.raw_maps, ref, rtol=1e-10, atol=1e-12)
