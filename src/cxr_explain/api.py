"""The notebook-facing API: load a model, load images, explain, save maps and overlays.

Data flows one way (docs/architecture.md §1): files → data → models → attribution → metrics → report.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from .attribution import Explanation, explain
from .errors import CxrExplainError

PathLike = Union[str, Path]


def load_model(
    checkpoint: Optional[PathLike] = None,
    arch: Optional[str] = None,
    num_classes: Optional[int] = None,
    labels=None,
    trust_pickle: bool = False,
    verbose: bool = False,
) -> nn.Module:
    """A model ready to explain (eval mode, ``model.cxr_spec`` set).

    ``checkpoint``: a file in any supported format (CheXNet, jrzech, torchxrayvision, torchvision
    state dict, cxr-explain), or ``"default"`` / ``None`` for the shipped synthetic-benchmark
    DenseNet-121. ``arch`` without a checkpoint builds random weights (with a warning).
    """
    from .models import build_model, load_checkpoint

    if checkpoint in (None, "default") and arch is None:
        try:
            from .models.default import load_default_model
        except ImportError:
            raise CxrExplainError("the shipped default model is not installed in this build; pass --checkpoint "
                                  "FILE or --arch NAME") from None
        return load_default_model()
    if checkpoint in (None, "default"):
        warnings.warn(f"no checkpoint given: {arch} has random weights; its explanations show nothing learned",
                      stacklevel=2)
        return build_model(arch, num_classes=num_classes, labels=labels).eval()
    model, spec, report = load_checkpoint(checkpoint, arch=arch, num_classes=num_classes, labels=labels,
                                          trust_pickle=trust_pickle)
    if verbose:
        print(report.summary())
    return model


@dataclass
class LoadedImage:
    """One image read from disk and preprocessed for a model."""

    path: Path
    tensor: torch.Tensor  # (C, S, S) model input
    pixels: np.ndarray  # original pixels (H, W)
    preprocessing: object

    def to_original(self, heatmap) -> np.ndarray:
        """A model-resolution heatmap mapped back onto the original image (bilinear)."""
        out = self.preprocessing.to_original(heatmap, self.pixels.shape[0], self.pixels.shape[1])
        return out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


def load_images(paths: Sequence[PathLike], model: Optional[nn.Module] = None, preprocessing: Optional[str] = None,
                size: Optional[int] = None) -> list[LoadedImage]:
    """Read PNG / JPEG / DICOM files and preprocess them the way ``model``'s checkpoint family expects
    (a torchxrayvision model: xrv's 1-channel [−1024, 1024] convention at its native resolution)."""
    from .data.images import get_preprocessing, read_image
    from .models.xrv import model_spec

    spec = model_spec(model) if model is not None else None
    name = preprocessing or getattr(spec, "preprocessing", None) or "imagenet-rgb"
    pre = get_preprocessing(name, size=size or getattr(spec, "input_size", None) or 224)
    out = []
    for p in paths:
        xray = read_image(p)
        tensor, _, _ = pre(xray)
        out.append(LoadedImage(Path(p), tensor, xray.pixels, pre))
    return out


def save_explanation(image: LoadedImage, heatmap: torch.Tensor, out_dir: PathLike, method: str,
                     label: str, boxes=(), signed: Optional[bool] = None, *, name: Optional[str] = None,
                     logit: Optional[float] = None, probability: Optional[float] = None,
                     explained: Optional[float] = None, finding: Optional[str] = None) -> tuple[Path, Path]:
    """Write ``<name>_<label>_<method>.npy`` (model-resolution map, float32) and ``….png``: the map
    over the original image with a header (file; method, target ``label``, ``probability`` and
    ``logit`` of ``finding``, the ``explained`` value when it differs), a colour bar and ``boxes``
    (original pixels), the map's colour in proportion to its strength (``report.annotate``).
    Signed maps are drawn in seismic red/blue, CAM-family maps in jet; ``signed`` defaults to what
    the method says. ``name`` (default: the image's file stem) may hold sub-folders."""
    from .report.annotate import annotated_overlay, caption
    from .report.overlay import save_png

    if signed is None:  # ask the method: signed maps in seismic, CAM-family maps in jet
        from .attribution.methods import method_class

        signed = method_class(method).signed
    stem = Path(out_dir) / output_stem(name or image.path.stem, label, method)
    stem.parent.mkdir(parents=True, exist_ok=True)
    h = heatmap.detach().cpu().float().numpy()
    npy = stem.with_name(stem.name + ".npy")
    np.save(npy, h)
    full = image.to_original(h)
    text = caption(method, label, probability=probability, logit=logit, explained=explained, signed=signed,
                   finding=finding)
    rgb = annotated_overlay(image.pixels, full, signed=signed, title=image.path.name, subtitle=text,
                            boxes=list(boxes))
    png = save_png(rgb, stem.with_name(stem.name + ".png"), compress_level=3)
    return npy, png


def output_stem(name: str, label: str, method: str) -> str:
    """``<name>_<label>_<method>``: the name of one saved explanation, without suffix; ``name`` is
    the image's output name (its file stem, or a relative path without suffix)."""
    return f"{name}_{_safe(label)}_{method}"


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


__all__ = ["Explanation", "LoadedImage", "explain", "load_images", "load_model", "save_explanation"]
