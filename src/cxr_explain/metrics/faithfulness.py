"""Faithfulness and sanity checks of explanations (docs/evaluation.md §4).

Model-agnostic: :func:`deletion_insertion` takes any callable ``f(images (B, C, H, W)) -> scores (B,)``
(for instance the explained logit), and :func:`randomization_sanity` any
``explain_fn(model, image) -> heatmap``; neither needs the explanation engine.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Callable, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats
from skimage.metrics import structural_similarity
from torchvision.transforms.functional import gaussian_blur

from cxr_explain.errors import CxrExplainError

ArrayLike = Union[np.ndarray, torch.Tensor]
BASELINES = ("blur", "mean", "zero")
SSIM_WINDOW = 7  # structural_similarity's default window side


# --------------------------------------------------------------------------- deletion / insertion
def make_baseline(image: torch.Tensor, baseline: Union[str, torch.Tensor], blur_sigma: float) -> torch.Tensor:
    """The image that removed pixels are replaced with: ``blur`` (Gaussian, sigma ``blur_sigma``
    pixels; Petsiuk et al. 2018), ``mean`` (per-channel mean), ``zero``, or a tensor like ``image``.

    ``blur`` is ``torchvision.transforms.functional.gaussian_blur`` with a kernel of radius
    ``ceil(3 sigma)`` (at most the image side minus one) and reflected borders; ``sigma <= 0`` copies."""
    if isinstance(baseline, torch.Tensor):
        if baseline.shape != image.shape:
            raise CxrExplainError(
                f"baseline tensor has shape {tuple(baseline.shape)}, the image {tuple(image.shape)}; "
                "pass a baseline of the image's shape")
        return baseline.to(image)
    if baseline == "blur":
        if blur_sigma <= 0:
            return image.clone()
        r = min(math.ceil(3 * blur_sigma), min(image.shape[-2:]) - 1)  # reflect padding must fit the image
        return gaussian_blur(image, [2 * r + 1, 2 * r + 1], [float(blur_sigma), float(blur_sigma)])
    if baseline == "mean":
        return image.mean(dim=(1, 2), keepdim=True).expand_as(image).clone()
    if baseline == "zero":
        return torch.zeros_like(image)
    raise CxrExplainError(f"unknown baseline {baseline!r}; use one of {', '.join(BASELINES)} or a tensor")


def patch_order(heatmap: np.ndarray, patch: int) -> tuple[np.ndarray, int]:
    """Rank of each pixel's patch when patches are sorted by summed relevance, high first.

    The map is cut into a grid of ``patch x patch`` cells (the last row/column may be smaller);
    ties keep row-major order. Returns ``(rank map (H, W) int64, number of patches)``.
    """
    h, w = heatmap.shape
    gh, gw = -(-h // patch), -(-w // patch)
    pad = np.zeros((gh * patch, gw * patch), dtype=np.float64)
    pad[:h, :w] = heatmap
    sums = pad.reshape(gh, patch, gw, patch).sum(axis=(1, 3)).ravel()
    order = np.argsort(-sums, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    rank_map = np.repeat(np.repeat(rank.reshape(gh, gw), patch, 0), patch, 1)[:h, :w]
    return rank_map, order.size


def deletion_insertion(
    f: Callable[[torch.Tensor], ArrayLike],
    image: torch.Tensor,
    heatmap: ArrayLike,
    patch: int = 16,
    steps: int | None = None,
    baseline: Union[str, torch.Tensor] = "blur",
    mode: str = "deletion",
    batch_size: int = 32,
    blur_sigma: float = 5.0,
) -> tuple[np.ndarray, float]:
    """Pixel-flipping curve and its area (Samek et al. 2017; Petsiuk et al. 2018, RISE).

    Patches of ``patch x patch`` pixels are ordered by summed relevance (high first). At step
    ``k = 0..steps`` the first ``n_k = round(k * P / steps)`` of the ``P`` patches are
    ``deletion``: replaced by the baseline in the image, or ``insertion``: copied from the image into
    the baseline; ``curve[k] = f(x_k)``. ``steps`` defaults to ``P`` (one patch per step).
    ``AUC = trapz(curve, x = k / steps)`` on [0, 1]. Lower deletion AUC / higher insertion AUC =
    more faithful. ``f`` is called under ``torch.no_grad`` on batches of up to ``batch_size`` images.
    A heatmap of another size than the image is resized to it (bilinear) first.
    """
    if mode not in ("deletion", "insertion"):
        raise CxrExplainError(f"unknown mode {mode!r}; use 'deletion' or 'insertion'")
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3:
        raise CxrExplainError(f"image has shape {tuple(image.shape)}; pass one (C, H, W) tensor")
    if patch < 1 or batch_size < 1:
        raise CxrExplainError("patch and batch_size must be positive integers")
    hm = heatmap.detach().cpu().double() if isinstance(heatmap, torch.Tensor) else torch.as_tensor(
        np.asarray(heatmap, dtype=np.float64))
    while hm.dim() > 2 and hm.shape[0] == 1:
        hm = hm[0]
    if hm.dim() != 2:
        raise CxrExplainError(f"heatmap has shape {tuple(hm.shape)}; pass one (H, W) map")
    size = tuple(image.shape[-2:])
    if tuple(hm.shape) != size:
        hm = F.interpolate(hm[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    rank_map, n_patches = patch_order(hm.numpy(), patch)
    steps = n_patches if steps is None else int(steps)
    if steps < 1:
        raise CxrExplainError("steps must be at least 1")
    n_k = np.rint(np.arange(steps + 1) * n_patches / steps).astype(np.int64)

    base = make_baseline(image, baseline, blur_sigma)
    start, end = (image, base) if mode == "deletion" else (base, image)
    rank_t = torch.from_numpy(rank_map).to(image.device)
    scores = []
    with torch.no_grad():
        for i in range(0, steps + 1, batch_size):
            nk = torch.from_numpy(n_k[i:i + batch_size]).to(image.device)
            switched = (rank_t[None] < nk[:, None, None]).unsqueeze(1)  # (b, 1, H, W)
            batch = torch.where(switched, end[None], start[None])
            out = f(batch)
            out = out.detach().float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
            out = out.reshape(-1)
            if out.size != nk.numel():
                raise CxrExplainError(
                    f"f returned {out.size} scores for a batch of {nk.numel()} images; "
                    "it must return one per image")
            scores.append(out.astype(np.float64))
    curve = np.concatenate(scores)
    auc = float(np.sum(curve[1:] + curve[:-1]) / (2 * steps))  # trapezoid rule, x = k / steps
    return curve, auc


# --------------------------------------------------------------------------- randomisation sanity check
def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _to_map(h: ArrayLike) -> np.ndarray:
    a = h.detach().cpu().double().numpy() if isinstance(h, torch.Tensor) else np.asarray(h, dtype=np.float64)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise CxrExplainError(f"explain_fn returned shape {a.shape}; it must return one (H, W) heatmap")
    return a


def _similarities(ref: np.ndarray, new: np.ndarray) -> dict[str, float]:
    """Spearman rank correlation and SSIM (on min-max normalised maps) of signed and |maps|.

    SSIM is ``skimage.metrics.structural_similarity(a, b, data_range=1)`` (7 x 7 uniform window);
    NaN for a map smaller than the window."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant map has no rank correlation (NaN)
        for key, (x, y) in {"": (ref, new), "_abs": (np.abs(ref), np.abs(new))}.items():
            rho = stats.spearmanr(x.ravel(), y.ravel()).statistic
            out[f"spearman{key}"] = float(rho)
            out[f"ssim{key}"] = (float(structural_similarity(_minmax(x), _minmax(y), data_range=1.0))
                                 if min(x.shape) >= SSIM_WINDOW else float("nan"))
    return out


def _reinit(module: torch.nn.Module, std: float = 0.01) -> None:
    """Re-initialise every parameter of ``module``: ``reset_parameters`` where a submodule has it
    (torch's default init), otherwise N(0, std^2)."""
    done: set[int] = set()
    for m in module.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()
            done.update(id(p) for p in m.parameters(recurse=False))
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in done:
                p.normal_(0.0, std)


def randomization_sanity(
    explain_fn: Callable[[torch.nn.Module, torch.Tensor], ArrayLike],
    model: torch.nn.Module,
    image: torch.Tensor,
    layers_top_down: Sequence[str],
    seed: int = 0,
) -> pd.DataFrame:
    """Cascading model-parameter randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps").

    A deep copy of ``model`` has the parameters of ``layers_top_down`` (module names, output layer
    first) re-initialised cumulatively; after each layer ``explain_fn(model_copy, image)`` is compared
    with the original map: Spearman rank correlation (scipy) and SSIM (scikit-image's
    ``structural_similarity``, on min-max normalised maps), of the signed map and of its absolute value.
    Returns one row per step: ``step`` (0 = the original model), ``layer``, ``spearman``, ``ssim``,
    ``spearman_abs``, ``ssim_abs``. ``model`` is not modified; the global RNG is left as it was.
    A map that stays similar as the model is destroyed explains the image, not the model.
    """
    names = dict(model.named_modules())
    missing = [n for n in layers_top_down if n not in names or n == ""]
    if missing:
        known = ", ".join(list(n for n in names if n)[:8])
        raise CxrExplainError(
            f"layer {missing[0]!r} is not a module of the model; use names like: {known}, ...")
    ref = _to_map(explain_fn(model, image))
    rows = [{"step": 0, "layer": "original", **_similarities(ref, ref)}]
    model_copy = copy.deepcopy(model)
    devices = [p.device for p in model.parameters()][:1]
    with torch.random.fork_rng(devices=[d for d in devices if d.type == "cuda"]):
        torch.manual_seed(seed)
        for i, name in enumerate(layers_top_down, start=1):
            _reinit(model_copy.get_submodule(name))
            new = _to_map(explain_fn(model_copy, image))
            if new.shape != ref.shape:
                raise CxrExplainError(
                    f"explain_fn returned shape {new.shape} after randomising {name!r}, first {ref.shape}; "
                    "it must return maps of one size")
            rows.append({"step": i, "layer": name, **_similarities(ref, new)})
    return pd.DataFrame(rows, columns=["step", "layer", "spearman", "ssim", "spearman_abs", "ssim_abs"])
