"""Heatmap colouring and overlays (docs/rules.md §2.13 display convention)."""
from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from cxr_explain.data.types import Box
from cxr_explain.errors import CxrExplainError
from cxr_explain.report.overlay import (
    draw_contour,
    figure_grid,
    heatmap_to_rgb,
    overlay,
    save_png,
    to_gray_uint8,
)


def test_seismic_positive_red_negative_blue_zero_white():
    h = np.array([[3.0, -3.0, 0.0, 1.5]])
    rgb = heatmap_to_rgb(h)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    r, g, b = rgb[0, 0].astype(int)
    assert r > 100 and r > b + 100 and g < 10  # positive: red-dominant
    r, g, b = rgb[0, 1].astype(int)
    assert b > 70 and b > r + 70 and g < 10  # negative: blue-dominant
    assert (rgb[0, 2] >= 250).all()  # zero relevance: white
    # 1.5 / max|h| = 0.5 -> v = 0.75 in seismic (a light red)
    expected = np.round(np.array(matplotlib.colormaps["seismic"](0.75)[:3]) * 255)
    np.testing.assert_array_equal(rgb[0, 3], expected)


def test_seismic_divides_by_max_abs_not_max():
    h = np.array([[1.0, -4.0]])
    rgb = heatmap_to_rgb(h)
    expected = np.round(np.array(matplotlib.colormaps["seismic"](0.625)[:3]) * 255)  # (1/4 + 1) / 2
    np.testing.assert_array_equal(rgb[0, 0], expected)
    np.testing.assert_array_equal(heatmap_to_rgb(h * 17.0), rgb)  # scale-free


def test_non_symmetric_minmax_with_jet_and_constant_maps():
    h = np.array([[2.0, 3.0, 4.0]])
    rgb = heatmap_to_rgb(h, symmetric=False)
    jet = matplotlib.colormaps["jet"]
    np.testing.assert_array_equal(rgb[0, 0], np.round(np.array(jet(0.0)[:3]) * 255))
    np.testing.assert_array_equal(rgb[0, 2], np.round(np.array(jet(1.0)[:3]) * 255))
    assert (heatmap_to_rgb(np.zeros((2, 2)))[..., :] >= 250).all()  # all-zero signed map: white
    inferno = heatmap_to_rgb(h, cmap="inferno", symmetric=False)
    assert not np.array_equal(inferno, rgb)
    with pytest.raises(CxrExplainError, match="colormap"):
        heatmap_to_rgb(h, cmap="no-such-map")


def test_overlay_shapes_dtypes_and_resize():
    xray = np.linspace(0, 1, 64 * 48).reshape(64, 48)  # float in [0, 1]
    cam = np.zeros((7, 7))
    cam[0, 0] = 1.0
    out = overlay(xray, cam, alpha=0.5, symmetric=False)
    assert out.shape == (64, 48, 3) and out.dtype == np.uint8
    # alpha = 0: the gray X-ray only
    gray = overlay(xray, cam, alpha=0.0)
    np.testing.assert_array_equal(gray[..., 0], np.round(xray * 255).astype(np.uint8))
    assert (gray[..., 0] == gray[..., 2]).all()
    # alpha = 1: the heat colour only; the CAM peak (top-left) is the hottest colour of jet
    full = overlay(xray, cam, alpha=1.0, symmetric=False)
    assert full[0, 0, 0] > full[0, 0, 2] and full[-1, -1, 2] > full[-1, -1, 0]


def test_box_pixels_are_red_and_interior_is_not():
    xray = np.full((40, 40), 0.5)
    h = -np.ones((40, 40))  # all blue, so red pixels can only be the box
    out = overlay(xray, h, boxes=[Box("Mass", 10, 5, 20, 15)], box_width=2)
    red = (out[..., 0] == 255) & (out[..., 1] == 0) & (out[..., 2] == 0)
    expected = np.zeros((40, 40), bool)
    expected[5:20, 10:30] = True
    expected[7:18, 12:28] = False  # 2-px outline of [5, 20) x [10, 30)
    np.testing.assert_array_equal(red, expected)


def test_box_space_scales_boxes_to_the_shown_image():
    xray = np.zeros((256, 256), np.uint8)
    box = Box("Nodule", x=512, y=256, w=256, h=128)  # in 1024 x 1024 space
    out = overlay(xray, np.zeros((8, 8)), boxes=[box], box_space=(1024, 1024), box_width=1)
    red = (out[..., 0] == 255) & (out[..., 1] == 0)
    ys, xs = np.nonzero(red)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (64, 95, 128, 191)
    with pytest.raises(CxrExplainError, match="Box"):
        overlay(xray, np.zeros((8, 8)), boxes=[(1, 2, 3, 4)])


def test_mask_contour_drawn_on_boundary_only():
    rgb = np.zeros((10, 10, 3), np.uint8)
    m = np.zeros((10, 10), bool)
    m[2:8, 3:9] = True
    draw_contour(rgb, m, color=(0, 255, 0))
    green = rgb[..., 1] == 255
    assert green[2, 3:9].all() and green[7, 3:9].all() and green[2:8, 3].all() and green[2:8, 8].all()
    assert not green[3:7, 4:8].any() and not green[~m].any()
    out = overlay(np.zeros((20, 20)), np.zeros((20, 20)), masks=[m])  # 10x10 mask on a 20x20 image
    assert (out[..., 1] == 255).sum() > 0 and out[0, 0, 1] != 255


def test_to_gray_uint8_variants():
    u16 = np.array([[100, 300], [500, 900]], dtype=np.uint16)
    np.testing.assert_array_equal(to_gray_uint8(u16), [[0, 64], [128, 255]])
    chw = torch.stack([torch.zeros(2, 2), torch.ones(2, 2), torch.full((2, 2), 0.5)])
    np.testing.assert_array_equal(to_gray_uint8(chw), np.full((2, 2), 128))
    standardised = np.array([[-2.0, 2.0]])
    np.testing.assert_array_equal(to_gray_uint8(standardised), [[0, 255]])
    with pytest.raises(CxrExplainError):
        to_gray_uint8(np.zeros((2, 2, 2, 2)))


def test_save_png_round_trip(tmp_path):
    rgb = overlay(np.random.default_rng(0).random((16, 16)), np.random.default_rng(1).normal(size=(4, 4)))
    p = save_png(rgb, tmp_path / "sub" / "a.png")
    np.testing.assert_array_equal(np.asarray(Image.open(p)), rgb)
    with pytest.raises(CxrExplainError, match="uint8"):
        save_png(rgb.astype(np.float32), tmp_path / "b.png")


def test_figure_grid_writes_png_and_pdf(tmp_path):
    x = np.random.default_rng(0).random((24, 24))
    rows = [[x, heatmap_to_rgb(x, symmetric=False), heatmap_to_rgb(x - 0.5)] for _ in range(2)]
    paths = figure_grid(rows, ["X-ray", "CAM", "RAP"], tmp_path / "fig3.png", row_titles=["a", "b"])
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert Image.open(paths[0]).size[0] > 100
    assert paths[1].read_bytes()[:4] == b"%PDF"
    with pytest.raises(CxrExplainError, match="title"):
        figure_grid(rows, ["X-ray", "CAM"], tmp_path / "bad")
