"""Overlays that explain themselves: the veil follows |map|, the header and colour bar are there."""
from __future__ import annotations

import numpy as np
import pytest

from cxr_explain.data.types import Box
from cxr_explain.errors import CxrExplainError
from cxr_explain.report.annotate import annotated_overlay, caption
from cxr_explain.report.overlay import heatmap_to_rgb, map_strength, overlay


def _film(h=96, w=80):
    return np.tile(np.linspace(30, 220, w), (h, 1)).astype(np.uint8)


def test_proportional_veil_leaves_zero_relevance_unveiled():
    film = _film()
    h = np.zeros(film.shape)
    h[10:30, 10:30] = 2.0
    h[50:60, 40:60] = -1.0
    out = overlay(film, h, alpha=0.7, symmetric=True, veil="proportional")
    zero = h == 0
    np.testing.assert_array_equal(out[zero], np.repeat(film[zero][:, None], 3, axis=1))
    # the strongest pixel: (1 - alpha) * gray + alpha * colour, exactly as the uniform blend
    uniform = overlay(film, h, alpha=0.7, symmetric=True)
    np.testing.assert_array_equal(out[15, 15], uniform[15, 15])
    # half the strength: half the veil
    colour = heatmap_to_rgb(h)[55, 45].astype(float)
    expect = np.round((1 - 0.35) * film[55, 45] + 0.35 * colour)
    np.testing.assert_allclose(out[55, 45], expect, atol=1)
    # the uniform seismic veil whitens zero-relevance pixels: what the proportional one avoids
    assert (uniform[zero].astype(int) - film[zero][:, None]).max() > 50
    with pytest.raises(CxrExplainError, match="veil"):
        overlay(film, h, veil="half")


def test_map_strength_signed_and_cam():
    h = np.array([[2.0, -4.0, 0.0]])
    np.testing.assert_allclose(map_strength(h), [[0.5, 1.0, 0.0]])
    np.testing.assert_allclose(map_strength(np.array([[1.0, 3.0, 2.0]]), symmetric=False), [[0.0, 1.0, 0.5]])
    assert not map_strength(np.zeros((2, 2))).any()


def test_annotated_overlay_has_film_header_colour_bar_and_box():
    film = _film(200, 160)
    h = np.zeros((8, 8))
    h[1, 1] = 1.0  # relevance only near the top-left: the bottom half of the film is unveiled
    rgb = annotated_overlay(film, h, signed=True, title="x.png", subtitle=caption("lrp", "Mass", 0.7, 0.85),
                            boxes=[Box("Mass", 100, 20, 40, 30)])
    H, W, _ = rgb.shape
    assert H > 200 and W > 160 and rgb.dtype == np.uint8
    film_rows = rgb[H - 200:, :160]  # the film sits at the bottom left, under the header
    np.testing.assert_array_equal(film_rows[150:, :, 0], film[150:])
    red = (film_rows[..., 0] == 255) & (film_rows[..., 1] == 0) & (film_rows[..., 2] == 0)
    assert red[20, 100:140].all() and red[49, 100:140].all()  # the box outline
    header = rgb[: H - 200]
    assert (header < 128).any()  # text was drawn
    bar = rgb[H - 200:, 160:]
    reds = (bar[..., 0] > 100) & (bar[..., 2] < 60)
    blues = (bar[..., 2] > 100) & (bar[..., 0] < 60)
    assert reds[:100].sum() > 50 and blues[100:].sum() > 50  # seismic: + at the top, − at the bottom


def test_annotated_overlay_shrinks_large_films():
    rgb = annotated_overlay(np.zeros((3000, 2500), np.uint16), np.ones((4, 4)), signed=False, title="big.dcm",
                            max_side=512)
    assert rgb.shape[0] < 700 and rgb.shape[1] < 800


def test_caption_names_the_finding_of_a_contrast_and_the_explained_value():
    text = caption("rap", "Pneumonia-vs-Effusion", probability=0.4, logit=-0.3, explained=0.8, finding="Pneumonia")
    assert "p(Pneumonia) = 0.400" in text and "logit(Pneumonia) = -0.300" in text and "explained = 0.8" in text
    plain = caption("cam", "Mass", probability=0.9, logit=2.2, explained=2.2, signed=False)
    assert "p = 0.900" in plain and "explained" not in plain and "CAM" in plain
