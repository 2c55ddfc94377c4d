"""Deletion / insertion curves and the randomisation sanity check (docs/evaluation.md §4)."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import structural_similarity
from torch import nn

from cxr_explain.errors import CxrExplainError
from cxr_explain.metrics.faithfulness import (
    deletion_insertion,
    make_baseline,
    patch_order,
    randomization_sanity,
)

H = W = 32
REGION = (slice(0, 8), slice(8, 16))  # the only evidence the toy model uses (one 8x8 patch)


def region_sum(x: torch.Tensor) -> torch.Tensor:
    """Toy linear 'model': the sum of the pixels inside REGION."""
    return x[:, :, REGION[0], REGION[1]].sum(dim=(1, 2, 3))


@pytest.fixture
def image() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, H, W, generator=g) + 0.5


def evidence_map() -> np.ndarray:
    h = np.zeros((H, W))
    h[REGION] = 1.0
    return h


# ---------------------------------------------------------------- deletion / insertion
def test_deletion_auc_lower_for_true_evidence_than_for_reverse(image):
    s = float(region_sum(image[None]))
    good, auc_good = deletion_insertion(region_sum, image, evidence_map(), patch=8, baseline="zero")
    bad, auc_bad = deletion_insertion(region_sum, image, -evidence_map(), patch=8, baseline="zero")
    assert good.shape == bad.shape == (17,)  # 16 patches -> 17 points
    # good: the evidence patch goes first -> [s, 0, 0, ...]; reverse: it goes last
    np.testing.assert_allclose(good, [s] + [0.0] * 16, rtol=1e-5)
    np.testing.assert_allclose(bad, [s] * 16 + [0.0], rtol=1e-5)
    assert auc_good == pytest.approx(s / 32, rel=1e-5)
    assert auc_bad == pytest.approx(15.5 * s / 16, rel=1e-5)
    assert auc_good < auc_bad


def test_insertion_auc_higher_for_true_evidence(image):
    s = float(region_sum(image[None]))
    good, auc_good = deletion_insertion(region_sum, image, evidence_map(), patch=8, baseline="zero",
                                        mode="insertion")
    _, auc_bad = deletion_insertion(region_sum, image, -evidence_map(), patch=8, baseline="zero",
                                    mode="insertion")
    np.testing.assert_allclose(good, [0.0] + [s] * 16, rtol=1e-5)
    assert auc_good == pytest.approx(15.5 * s / 16, rel=1e-5)
    assert auc_bad == pytest.approx(s / 32, rel=1e-5)


def test_fewer_steps_than_patches(image):
    # 16 patches in 4 steps = 4 patches a step; the evidence patch is ranked 5th (four patches
    # score higher), so it goes at step 2
    h = np.zeros((H, W))
    h[16:32, 16:32] = 2.0
    h[REGION] = 1.0
    curve, auc = deletion_insertion(region_sum, image, h, patch=8, steps=4, baseline="zero")
    s = float(region_sum(image[None]))
    np.testing.assert_allclose(curve, [s, s, 0, 0, 0], rtol=1e-5)
    assert auc == pytest.approx(0.25 * (s + s / 2), rel=1e-5)  # trapezoids on x = 0, .25, ..., 1


def test_batching_does_not_change_the_curve(image):
    rng = np.random.default_rng(1)
    h = rng.random((H, W))
    calls = []

    def f(x):
        calls.append(x.shape[0])
        return x.mean(dim=(1, 2, 3)) * 3.0

    c1, a1 = deletion_insertion(f, image, h, patch=4, batch_size=7, baseline="mean")
    n_calls = len(calls)
    c2, a2 = deletion_insertion(f, image, h, patch=4, batch_size=1000, baseline="mean")
    assert n_calls == int(np.ceil(65 / 7)) and max(calls[:n_calls]) == 7
    np.testing.assert_allclose(c1, c2, rtol=1e-6)
    assert a1 == pytest.approx(a2)


def test_curve_ends_at_baseline_and_handles_partial_patches():
    g = torch.Generator().manual_seed(2)
    img = torch.rand(3, 20, 20, generator=g)
    h = np.random.default_rng(2).random((20, 20))
    rank, n = patch_order(h, 8)
    assert n == 9 and rank.shape == (20, 20) and set(np.unique(rank)) == set(range(9))
    f = lambda x: x.sum(dim=(1, 2, 3))  # noqa: E731
    for b in ("blur", "mean", "zero"):
        curve, _ = deletion_insertion(f, img, h, patch=8, baseline=b)
        base = make_baseline(img, b, 5.0)
        assert curve[0] == pytest.approx(float(img.sum()), rel=1e-5)
        assert curve[-1] == pytest.approx(float(base.sum()), rel=1e-5)


def test_patch_order_ranks_by_summed_relevance():
    h = np.zeros((4, 4))
    h[0:2, 2:4] = 1.0  # top-right patch: sum 4
    h[2, 0] = 3.0  # bottom-left patch: sum 3
    h[3, 3] = -1.0  # bottom-right patch: sum -1
    rank, n = patch_order(h, 2)
    assert n == 4
    assert rank[0, 2] == 0 and rank[2, 0] == 1 and rank[0, 0] == 2 and rank[3, 3] == 3


def test_baselines():
    g = torch.Generator().manual_seed(3)
    img = torch.rand(2, 24, 24, generator=g)
    mean = make_baseline(img, "mean", 5.0)
    torch.testing.assert_close(mean[:, 0, 0], img.mean(dim=(1, 2)))
    blur = make_baseline(img, "blur", 2.0)
    assert blur.shape == img.shape and blur.std() < 0.5 * img.std()
    const = torch.full((1, 16, 16), 0.7)
    torch.testing.assert_close(make_baseline(const, "blur", 3.0), const)
    assert not make_baseline(img, "zero", 5.0).any()
    with pytest.raises(CxrExplainError, match="baseline"):
        make_baseline(img, "noise", 5.0)


@pytest.mark.parametrize("sigma,size", [(2.0, (24, 30)), (1.5, (16, 16)), (5.0, (9, 12))])
def test_blur_baseline_is_a_gaussian_with_reflected_borders(sigma, size):
    img = torch.rand(2, *size, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    r = min(int(np.ceil(3 * sigma)), min(size) - 1)  # (5.0, 9 px): the radius shrinks to 8
    want = ndimage.gaussian_filter(img.numpy(), sigma=(0, sigma, sigma), mode="mirror", truncate=r / sigma)
    np.testing.assert_allclose(make_baseline(img, "blur", sigma).numpy(), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(make_baseline(img, "blur", 0.0), img)


def test_heatmap_of_other_size_is_resized(image):
    small = np.zeros((4, 4))
    small[0, 1] = 1.0  # the 8x8 cell that is REGION
    curve, _ = deletion_insertion(region_sum, image, small, patch=8, baseline="zero")
    assert curve[1] == pytest.approx(0.0, abs=1e-5)


def test_bad_inputs_raise(image):
    with pytest.raises(CxrExplainError, match="one per image"):
        deletion_insertion(lambda x: torch.zeros(1), image, evidence_map(), patch=8)
    with pytest.raises(CxrExplainError, match="mode"):
        deletion_insertion(region_sum, image, evidence_map(), mode="both")


# ---------------------------------------------------------------- SSIM / randomisation
def _ssim_reference(a: np.ndarray, b: np.ndarray, win: int = 7) -> float:
    """Wang et al. 2004 with skimage's defaults, written out: uniform 7x7 window, sample covariances,
    K1 = 0.01, K2 = 0.03, data range 1, mean over the image cropped by (win - 1) / 2."""
    f = lambda x: ndimage.uniform_filter(x, size=win)  # noqa: E731
    cov = win * win / (win * win - 1)
    ua, ub = f(a), f(b)
    vaa, vbb, vab = cov * (f(a * a) - ua * ua), cov * (f(b * b) - ub * ub), cov * (f(a * b) - ua * ub)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * ua * ub + c1) * (2 * vab + c2) / ((ua ** 2 + ub ** 2 + c1) * (vaa + vbb + c2))
    p = (win - 1) // 2
    return float(s[p:-p, p:-p].mean())


def _minmax(a):
    return (a - a.min()) / (a.max() - a.min())


def test_ssim_of_the_sanity_check_is_skimage_on_minmax_maps():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 33))
    b = a + 0.8 * rng.normal(size=a.shape)
    calls = iter([a, b])
    df = randomization_sanity(lambda m, x: next(calls), tiny_net(), torch.rand(1, 8, 8), ["fc"])
    want = structural_similarity(_minmax(a), _minmax(b), data_range=1.0)
    assert df["ssim"].iloc[1] == want and df["ssim"].iloc[0] == 1.0
    assert want == pytest.approx(_ssim_reference(_minmax(a), _minmax(b)), abs=1e-12)
    assert df["ssim_abs"].iloc[1] == structural_similarity(_minmax(abs(a)), _minmax(abs(b)), data_range=1.0)
    calls = iter([a[:6, :20], b[:6, :20]])  # smaller than the 7x7 window: SSIM undefined
    df = randomization_sanity(lambda m, x: next(calls), tiny_net(), torch.rand(1, 8, 8), ["fc"])
    assert df[["ssim", "ssim_abs"]].isna().all().all() and df["spearman"].notna().all()


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 8, 3, padding=1), relu1=nn.ReLU(),
        conv2=nn.Conv2d(8, 8, 3, padding=1), relu2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(8, 1),
    ))


def grad_x_input(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    x = image[None].clone().requires_grad_(True)
    model(x).sum().backward()
    return (x.grad * x)[0].sum(0).detach()


def test_randomization_drops_correlation_for_gradient_x_input():
    model = tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    img = torch.randn(1, 24, 24, generator=torch.Generator().manual_seed(1))
    rng_state = torch.get_rng_state()
    df = randomization_sanity(grad_x_input, model, img, ["fc", "conv2", "conv1"], seed=0)
    assert list(df["layer"]) == ["original", "fc", "conv2", "conv1"]
    assert list(df.columns) == ["step", "layer", "spearman", "ssim", "spearman_abs", "ssim_abs"]
    first = df.iloc[0]
    assert first["spearman"] == pytest.approx(1.0) and first["ssim"] == pytest.approx(1.0)
    last = df.iloc[-1]
    assert last["spearman"] < 0.7 and last["ssim"] < 0.7  # (|rho| < 0.62 over seeds 0..19)
    assert (df["spearman"].iloc[1:] < 0.99).all()
    # the model itself and the global RNG are untouched; same seed -> same table
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert torch.equal(torch.get_rng_state(), rng_state)
    df2 = randomization_sanity(grad_x_input, model, img, ["fc", "conv2", "conv1"], seed=0)
    np.testing.assert_allclose(df[["spearman", "ssim"]].to_numpy(), df2[["spearman", "ssim"]].to_numpy())


def test_model_independent_map_fails_the_sanity_check():
    # an "explanation" that ignores the model keeps correlation 1: the check must show it
    img = torch.rand(1, 24, 24, generator=torch.Generator().manual_seed(4))
    df = randomization_sanity(lambda m, x: x[0] ** 2, tiny_net(), img, ["fc", "conv2", "conv1"])
    np.testing.assert_allclose(df["spearman"], 1.0)
    np.testing.assert_allclose(df["ssim_abs"], 1.0)


def test_unknown_layer_names_the_layer():
    with pytest.raises(CxrExplainError, match="'conv9'"):
        randomization_sanity(grad_x_input, tiny_net(), torch.rand(1, 8, 8), ["fc", "conv9"])
