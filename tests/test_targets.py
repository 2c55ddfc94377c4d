"""Targets as objects: indices, names, contrasts of two findings, probabilities and functions of
the logits, each checked against autograd or conservation; one label table with one alias list."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from nets import build, images

from cxr_explain.attribution import Contrast, Finding, Index, Predicted, Probability, explain
from cxr_explain.attribution.targets import PerImage, as_target, parse_target
from cxr_explain.cli import main
from cxr_explain.data.labels import find_label, label_index
from cxr_explain.errors import CxrExplainError

F64 = torch.float64
LABELS = ["Atelectasis", "Infiltration", "Effusion", "Pneumonia", "No Finding"]


@pytest.fixture(scope="module")
def model():
    m = build("resnet18", num_classes=len(LABELS), size=32).to(F64)
    m.labels = list(LABELS)
    return m


def _grad(model, x, fn):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(model(x)).sum(), x)
    return g


def test_written_targets_parse_to_objects():
    assert parse_target("predicted") == Predicted()
    assert parse_target("3") == Index(3)
    assert parse_target("Pneumonia-vs-No Finding") == Contrast(Finding("Pneumonia"), Finding("No Finding"))
    assert parse_target("prob:Pneumonia") == Probability(Finding("Pneumonia"))
    assert as_target([[0, 2], [1, -1]]) == PerImage(([0, 2], [1, -1]))
    for bad, msg in [("-1", "negative"), (-1, "negative"), ("", "empty target"), (True, "not a class")]:
        with pytest.raises(CxrExplainError, match=msg):
            as_target(bad)


@pytest.mark.parametrize("method", ["lrp", "rap"])
def test_a_contrast_is_conserved_by_propagation_methods(model, method):
    x = images(2, 32, seed=31, dtype=F64)
    e = explain(model, x, method, target="Pneumonia-vs-No Finding")
    with torch.no_grad():
        y = model(x)
    expected = y[:, 3] - y[:, 4]
    torch.testing.assert_close(e.explained, expected)
    torch.testing.assert_close(e.maps.flatten(1).sum(1), expected, rtol=1e-8, atol=1e-10)
    assert e.target_names == ["Pneumonia-vs-No Finding"] * 2 and e.targets.tolist() == [3, 3]


def test_a_contrast_is_the_gradient_seed_and_the_cam_weight(model):
    x = images(2, 32, seed=32, dtype=F64)
    g = explain(model, x, "gradient", target=Contrast("Pneumonia", "Effusion"))
    torch.testing.assert_close(g.maps, _grad(model, x, lambda y: y[:, 3] - y[:, 2]).sum(1))
    both = explain(model, x, "cam", target=[["Pneumonia", "Effusion"]] * 2).raw_maps
    diff = explain(model, x, "cam", target="Pneumonia-vs-Effusion").raw_maps
    torch.testing.assert_close(diff, both[:, 0] - both[:, 1])


def test_probability_and_function_targets_for_gradient_methods_only(model):
    x = images(2, 32, seed=33, dtype=F64)
    p = explain(model, x, "gradient", target="prob:Effusion")
    torch.testing.assert_close(p.maps, _grad(model, x, lambda y: torch.sigmoid(y[:, 2])).sum(1))
    torch.testing.assert_close(p.explained, torch.sigmoid(model(x)[:, 2]).detach())
    assert p.target_names == ["p(Effusion)"] * 2

    def margin(y):
        return y[:, 1] - torch.logsumexp(y, 1)

    f = explain(model, x, "gradient-x-input", target=margin)
    torch.testing.assert_close(f.maps, (_grad(model, x, margin) * x).sum(1))
    assert explain(model, x, "gradcam", target=margin).maps.shape == (2, 32, 32)
    with pytest.raises(CxrExplainError, match="propagation methods explain linear targets"):
        explain(model, x, "lrp", target=margin)
    with pytest.raises(CxrExplainError, match="use gradcam for function targets"):
        explain(model, x, "cam", target="prob:Effusion")


def test_lists_per_image_mix_names_indices_and_contrasts(model):
    x = images(2, 32, seed=34, dtype=F64)
    e = explain(model, x, "lrp", target=[["Effusion", Contrast(3, 4)], [1]])
    assert e.maps.shape == (2, 2, 32, 32)
    assert e.target_names == [["Effusion", "Pneumonia-vs-No Finding"], ["Infiltration", ""]]
    assert torch.isnan(e.explained[1, 1]) and float(e.maps[1, 1].abs().sum()) == 0
    single = explain(model, x[:1], "lrp", target="Pneumonia-vs-No Finding")
    torch.testing.assert_close(e.maps[0, 1], single.maps[0], rtol=1e-9, atol=1e-12)


def test_one_label_table_with_aliases():
    nih = ["Atelectasis", "Infiltration", "Effusion", "Pleural_Thickening"]
    assert find_label("Infiltrate", nih) == 1  # the box file's spelling
    assert find_label("pleural effusion", nih) == 2  # CheXpert's name for it
    assert find_label("pleural thickening", nih) == 3
    assert find_label("Mass", nih) is None
    assert find_label("effusion", ["Effusion", "effusion"]) is None or find_label("Effusion", ["Effusion", "effusion"]) == 0
    with pytest.raises(CxrExplainError, match="did you mean 'Effusion'"):
        label_index("Efusion", nih)


def test_cli_contrast_target_names_its_outputs(tmp_path):
    from PIL import Image

    img = tmp_path / "film.png"
    Image.fromarray((np.random.default_rng(1).random((40, 40)) * 255).astype(np.uint8)).save(img)
    rc = main(["explain", str(img), "--arch", "resnet18", "--labels", ",".join(LABELS), "--size", "32",
               "--method", "lrp,gradcam", "--target", "Pneumonia-vs-No Finding", "--out", str(tmp_path / "o")])
    assert rc == 0
    for m in ("lrp", "gradcam"):
        assert (tmp_path / "o" / f"film_Pneumonia-vs-No_Finding_{m}.npy").is_file()
