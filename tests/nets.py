"""Model builders shared by the engine tests: torchvision architectures with random weights,
non-zero biases and realistic BatchNorm statistics (re-estimated on random images).

VGG's classifier is narrowed to 256 hidden units (``VGG_HIDDEN``): the convolution stack and the
three-layer Linear/ReLU/Dropout head keep VGG's structure, but its 120 M classifier weights (1 GB in
float64, and a copy per modified-weight cache) test nothing the narrow head does not, and made every
VGG test the slowest of the suite. The authors' reference cases include such a "narrow VGG"."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import Bottleneck, ResNet


def realistic(model: nn.Module, size: int = 64, seed: int = 0, n: int = 8, channels: int = 3,
              scale: float = 1.0) -> nn.Module:
    """Random γ/β, non-zero biases, running statistics estimated on random images (``channels``,
    values ``scale`` × N(0, 1): 1024 for xrv's input range); eval mode. LayerNorm / GroupNorm get
    random affine parameters too, and ConvNeXt's layer scales (initialised at 1e-6, which would make
    every residual branch negligible) values in [0.1, 1]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_((torch.rand(m.bias.shape, generator=g) - 0.5) * 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_((torch.rand(m.bias.shape, generator=g) - 0.5) * 0.5)
                m.reset_running_stats()
                m.momentum = None
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_((torch.rand(m.bias.shape, generator=g) - 0.5) * 0.5)
        for name, p in model.named_parameters():
            if name.split(".")[-1] in ("layer_scale", "gamma") and p.numel() > 1:
                p.copy_(torch.rand(p.shape, generator=g) * 0.9 + 0.1)
        model.train()
        model(torch.randn(n, channels, size, size, generator=g) * scale)
        model.eval()
    return model


VGG_HIDDEN = 256


def build(arch: str, num_classes: int = 6, size: int = 64, seed: int = 0) -> nn.Module:
    """A torchvision architecture by name, ``resnet-tiny``, or ``timm:<name>`` (pretrained=False)."""
    torch.manual_seed(seed)
    if arch == "resnet-tiny":  # one bottleneck per stage
        model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=num_classes)
    elif arch.startswith("timm:"):
        timm = pytest.importorskip("timm")  # optional; CI installs it

        model = timm.create_model(arch[5:], pretrained=False, num_classes=num_classes)
    else:
        model = getattr(torchvision.models, arch)(num_classes=num_classes)
    if arch.startswith("vgg"):
        model.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, VGG_HIDDEN), nn.ReLU(True), nn.Dropout(),
            nn.Linear(VGG_HIDDEN, VGG_HIDDEN), nn.ReLU(True), nn.Dropout(),
            nn.Linear(VGG_HIDDEN, num_classes))
    return realistic(model, size=size, seed=seed)


def images(b: int = 2, size: int = 64, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g).to(dtype)
