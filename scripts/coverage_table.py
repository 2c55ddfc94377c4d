"""The README's architecture × method coverage table, from real runs (issue: modern models).

Every architecture is built with random weights (nothing is downloaded), given realistic norm
statistics and non-zero biases (``tests/nets.py``), moved to float64 and explained on one random
image for its top logit by every method. A propagation cell shows the relative conservation error
|Σ map − logit| / |logit|; a gradient/CAM cell shows the feature layer's layout; a method that does not
apply says why (the library's own one-line error, shortened).

    python scripts/coverage_table.py                  # print the table
    python scripts/coverage_table.py --write-readme   # also replace it in README.md between the markers
    python scripts/coverage_table.py --archs vit_b_16,swin_t
"""
from __future__ import annotations

import argparse
import gc
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from nets import build, realistic  # noqa: E402  (the test suite's model builders)

from cxr_explain.attribution import explain  # noqa: E402
from cxr_explain.errors import CxrExplainError  # noqa: E402

METHODS = ["lrp", "lrp flat", "rap", "attnlrp", "gradient", "gradcam", "cam"]
PROPAGATION = {"lrp", "lrp flat", "rap", "attnlrp"}
#: column -> (method, options): "lrp flat" is lrp with zero_denominators="flat" (docs/rules.md §9.6)
CALLS = {"lrp flat": ("lrp", {"zero_denominators": "flat"})}
#: the library's refusals, shortened for the table
SHORT = {"needs a model with attention": "CNN: no attention", "global average pooling": "head is not GAP → Linear"}
START, END = "<!-- coverage-table:start -->", "<!-- coverage-table:end -->"


def randomise_zeros(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every all-zero parameter (ViT heads, class tokens) small random values, as training does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def torchvision_transformer(name: str, size: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        torch.manual_seed(0)
        kwargs = {"image_size": size} if name.startswith("vit") else {}
        model = getattr(torchvision.models, name)(num_classes=6, **kwargs)
        return randomise_zeros(realistic(model, size=size))
    return make


def timm_transformer(name: str, size: int, **kwargs) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=6, img_size=size, **kwargs)
        return randomise_zeros(realistic(model, size=size))
    return make


def xrv_densenet() -> nn.Module:
    import torchxrayvision as xrv

    torch.manual_seed(0)
    return realistic(xrv.models.DenseNet(weights=None), size=64, channels=1, scale=600.0)


def xrv_resnet() -> nn.Module:
    """xrv.models.ResNet from a random weights file where its fetcher looks; its download is disabled."""
    import os

    import torchvision
    import torchxrayvision as xrv

    torch.manual_seed(1)
    net = torchvision.models.resnet50(num_classes=18, weights=None)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    realistic(net, size=64, channels=1, scale=600.0)
    name = "resnet50-res512-all"
    with tempfile.TemporaryDirectory() as folder:
        torch.save(net.state_dict(), os.path.join(folder, os.path.basename(xrv.models.model_urls[name]["weights_url"])))
        saved, xrv.utils.download = xrv.utils.download, None  # any download attempt fails
        try:
            model = xrv.models.ResNet(weights=name, cache_dir=folder)
        finally:
            xrv.utils.download = saved
    model.input_resolution = 128  # xrv resizes to this; lowered to keep the float64 run small
    return model


#: name -> (builder, input channels, input size, input scale)
ARCHS: dict[str, tuple[Callable[[], nn.Module], int, int, float]] = {
    **{a: (lambda a=a: build(a, size=64), 3, 64, 1.0) for a in
       ["vgg16", "resnet50", "densenet121", "efficientnet_b0", "mobilenet_v3_small", "regnet_y_400mf",
        "convnext_tiny"]},
    "vit_b_16": (torchvision_transformer("vit_b_16", 64), 3, 64, 1.0),
    "swin_t": (torchvision_transformer("swin_t", 64), 3, 64, 1.0),
    **{f"timm {a}": (lambda a=a: build(f"timm:{a}", size=64), 3, 64, 1.0) for a in ["convnext_tiny", "efficientnet_b0"]},
    "timm vit_small_patch16_224": (timm_transformer("vit_small_patch16_224", 64), 3, 64, 1.0),
    "timm swin_tiny_patch4_window7_224": (timm_transformer("swin_tiny_patch4_window7_224", 224), 3, 224, 1.0),
    "xrv DenseNet": (xrv_densenet, 1, 64, 600.0),
    "xrv ResNet": (xrv_resnet, 1, 128, 600.0),
}


def cell(model: nn.Module, x: torch.Tensor, column: str, target: int) -> str:
    method, options = CALLS.get(column, (column, {}))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e = explain(model, x, method, target=target, **options)
    except CxrExplainError as exc:
        text = str(exc)
        short = next((v for k, v in SHORT.items() if k in text), None)
        first = text.split(". ")[0].split(": ")[-1]
        return "— " + (short or (first[:50] + "…" if len(first) > 50 else first))
    if not bool(torch.isfinite(e.maps).all()) or float(e.maps.abs().sum()) == 0:
        return "✗ empty or non-finite map"
    if column in PROPAGATION:
        logit = float(e.logits[0, target])
        return f"✓ {abs(float(e.maps.sum()) - logit) / max(abs(logit), 1e-12):.0e}"
    if column in ("gradcam", "cam"):
        return f"✓ {e.feature_layout}"
    return "✓"


def row(name: str) -> list[str]:
    make, channels, size, scale = ARCHS[name]
    model = make().to(torch.float64).eval()
    x = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * scale
    with torch.no_grad():
        target = int(explain(model, x, "gradient", target=0).logits[0].argmax())
    cells = [cell(model, x, m, target) for m in METHODS]
    del model
    gc.collect()
    return cells


def table(names: list[str]) -> str:
    lines = ["| architecture | " + " | ".join(METHODS) + " |", "|" + "---|" * (len(METHODS) + 1)]
    for name in names:
        t = time.perf_counter()
        cells = row(name)
        print(f"{name}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated names from: " + ", ".join(ARCHS))
    ap.add_argument("--write-readme", action="store_true", help="replace the table in README.md between the markers")
    args = ap.parse_args()
    names = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARCHS]
    if unknown:
        sys.exit(f"unknown architecture(s) {unknown}; choose from {list(ARCHS)}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    text = table(names)
    print(text)
    if args.write_readme:
        readme = ROOT / "README.md"
        body = readme.read_text()
        if START not in body or END not in body:
            sys.exit(f"README.md has no {START} … {END} markers")
        block = (f"{START}\n<!-- generated by `python scripts/coverage_table.py --write-readme`; do not edit -->\n"
                 f"{text}\n{END}")
        readme.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, body, flags=re.S))


if __name__ == "__main__":
    main()
