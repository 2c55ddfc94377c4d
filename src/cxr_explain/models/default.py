"""The model that ships with cxr-explain: a DenseNet-121 trained on the synthetic benchmark.

``load_default_model()`` returns it in eval mode with its :class:`~cxr_explain.models.zoo.ModelSpec`
(8 NIH box findings, ``imagenet-rgb`` preprocessing at the training resolution). The asset also
holds the model card's numbers (:func:`default_model_info`) and reference logits on a few test-split
films, so a user (and the tests) can check that the installed weights reproduce the card:
:func:`reference_check` regenerates those films from the benchmark seed and compares.

The asset is made from a training run by :mod:`cxr_explain.training.package`
(``python -m cxr_explain.training.package --package RUN/best.pt --data DATA``).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError
from .checkpoints import load_checkpoint
from .provenance import strip_machine_paths
from .zoo import ModelSpec

__all__ = ["DEFAULT_ASSET", "CARD_NAME", "default_checkpoint_path", "load_default_model", "default_model_info",
           "render_films", "reference_inputs", "reference_check", "trained_on_benchmark", "synthetic_model_warning"]

DEFAULT_ASSET = "default_densenet121.pt"
CARD_NAME = "MODEL_CARD.md"


def default_checkpoint_path() -> Path:
    """Path of the shipped checkpoint inside the installed package (``cxr_explain/assets``)."""
    p = Path(str(resources.files("cxr_explain") / "assets" / DEFAULT_ASSET))
    if not p.is_file():
        raise CheckpointError(f"{p}: the shipped default model is missing; reinstall cxr-explain "
                              "or pass --checkpoint with your own model")
    return p


def load_default_model() -> nn.Module:
    """The shipped DenseNet-121 (benchmark labels, eval mode, ``model.cxr_spec`` set), float32.
    Its provenance loses the training machine's paths (:func:`~.provenance.strip_machine_paths`),
    so run records and reports made with it hold none."""
    model, spec, _ = load_checkpoint(default_checkpoint_path())
    spec.provenance = strip_machine_paths(dict(spec.provenance))
    return model.eval()


def trained_on_benchmark(model: nn.Module) -> bool:
    """Whether ``model`` was trained on cxr-explain's synthetic benchmark (the shipped model, or any
    checkpoint ``cxr_explain.training`` wrote from a phantom dataset: its provenance names it)."""
    prov = getattr(getattr(model, "cxr_spec", None), "provenance", None) or {}
    return bool(prov.get("phantom"))


def synthetic_model_warning(model: nn.Module, data: Sequence[Any], shipped: bool = False) -> Optional[str]:
    """The one line a run warns with (once) and records when a model trained only on the synthetic
    benchmark is applied to films that are not from it; None for any other model, or when every path
    in ``data`` (files or folders) lies inside a benchmark folder. ``shipped``: the model is the
    default one (no ``--checkpoint`` given)."""
    if not trained_on_benchmark(model):
        return None
    from ..data.phantom import benchmark_root

    paths = list(data)
    if paths and all(benchmark_root(p) is not None for p in paths):
        return None
    who = ("the shipped default model (a DenseNet-121 trained only on cxr-explain's synthetic benchmark)"
           if shipped else "this model was trained only on cxr-explain's synthetic benchmark and")
    return (f"{who} is applied here to films that are not from that benchmark: its predictions and maps "
            "on real radiographs mean nothing; pass --checkpoint with a model trained on real chest X-rays")


def default_model_info(path: Optional[Path] = None) -> dict[str, Any]:
    """The card's numbers stored in the asset: ``{"card": {...}, "reference": {...}, "provenance": {...}}``
    (card and provenance without machine paths)."""
    obj = torch.load(path or default_checkpoint_path(), map_location="cpu", weights_only=True)
    extra = obj.get("extra", {}) if isinstance(obj, dict) else {}
    return {"card": strip_machine_paths(extra.get("card", {})), "reference": extra.get("reference", {}),
            "provenance": strip_machine_paths(obj.get("provenance", {}))}


def render_films(indices: Sequence[int], seed: int, size: int) -> np.ndarray:
    """Films ``indices`` of benchmark ``seed`` at ``size`` px as uint8 (n, size, size): the same
    pixels as the PNGs ``phantom.generate(..., seed, size=size)`` writes (PNG is lossless)."""
    from ..data.phantom import render_phantom

    return np.stack([render_phantom(int(i), seed=int(seed), size=int(size)).image for i in indices])


def reference_inputs(films: np.ndarray, spec: ModelSpec) -> torch.Tensor:
    """uint8 films (n, H, W) preprocessed as ``spec`` says (n, C, S, S)."""
    from ..data.images import XRay, get_preprocessing

    pre = get_preprocessing(spec.preprocessing, spec.input_size)
    return torch.stack([pre(XRay(np.asarray(f, dtype=np.float32), 8, Path("reference.png")))[0] for f in films])


def reference_check(model: Optional[nn.Module] = None, path: Optional[Path] = None,
                    regenerate: bool = True) -> dict[str, float]:
    """Compare the model's logits on the asset's reference test films with the stored logits.

    Returns ``max_logit_diff`` (on the films stored in the asset) and, with ``regenerate``,
    ``regen_max_pixel_diff`` (films re-rendered from the card's seed vs the stored ones: 0 while
    the generator is unchanged) and ``regen_max_logit_diff`` (logits on the re-rendered films).
    """
    info = default_model_info(path)
    ref = info["reference"]
    if not ref:
        raise CheckpointError("the checkpoint stores no reference predictions; package it with "
                              "python -m cxr_explain.training.package")
    model = model if model is not None else (load_checkpoint(path)[0] if path else load_default_model())
    model.eval()
    stored = ref["films"].numpy()
    want = torch.tensor(ref["logits"])
    with torch.no_grad():
        out = {"max_logit_diff": float((model(reference_inputs(stored, model.cxr_spec)) - want).abs().max())}
        if regenerate:
            films = render_films(ref["indices"], ref["seed"], ref["size"])
            out["regen_max_pixel_diff"] = float(np.abs(films.astype(np.int16) - stored.astype(np.int16)).max())
            out["regen_max_logit_diff"] = float((model(reference_inputs(films, model.cxr_spec)) - want).abs().max())
    return out
