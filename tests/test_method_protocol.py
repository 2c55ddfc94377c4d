"""The method protocol: one registry that every part of the tool asks, methods as small classes,
options that reach the API and the CLI. A CAM variant and an LRP composite are each added here in
one class, as a user would, and checked against an independent reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
from nets import build, images
from pytorch_grad_cam import XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cxr_explain.attribution import explain, rules as R
from cxr_explain.attribution.methods import (Family, GradCamFamily, PropagationMethod, available_methods, get_method,
                                             method_class, parse_method_options, register, structural_rules,
                                             unregister)
from cxr_explain.cli import main
from cxr_explain.errors import CxrExplainError
from cxr_explain.report.figures import map_style

F64 = torch.float64


# ------------------------------------------------------------------ two methods, one class each
@dataclass(frozen=True)
class XGradCam(GradCamFamily):
    """XGrad-CAM (Fu et al. 2020): ``α_c = Σ_hw A·g / Σ_hw A``."""

    name = "xgradcam-test"
    description = "XGrad-CAM (test): α_c = Σ A·g / Σ A"

    def channel_weights(self, A, g):
        return (A * g).sum((2, 3), keepdim=True) / (A.sum((2, 3), keepdim=True) + 1e-7)


@dataclass(frozen=True)
class LrpZero(PropagationMethod):
    """LRP-0: the plain z-rule without bias on every layer."""

    name = "lrp-zero-test"
    description = "LRP-0 (test): z-rule without bias everywhere"

    def rules(self):
        z = R.ZRule([R.Term("id", "id")], "safe", name="z")
        return structural_rules(conv=z, linear=z)


@pytest.fixture
def registered():
    register(XGradCam)
    register(LrpZero)
    yield
    unregister(XGradCam.name)
    unregister(LrpZero.name)


def test_every_method_knows_its_family_and_has_its_own_description():
    classes = [method_class(m) for m in available_methods()]
    assert len({c.description for c in classes}) == len(classes)  # no shared one-liners
    fam = {c.name: c.family for c in classes}
    assert fam["lrp"] is fam["rap"] is fam["rsp"] is Family.PROPAGATION
    assert fam["gradient"] is fam["integrated-gradients"] is Family.GRADIENT
    assert fam["cam"] is fam["gradcam"] is fam["gradcam++"] is Family.CAM
    for c in classes:
        assert c.signed == (c.family is not Family.CAM)
    assert get_method("lrp").conserving and get_method("rap").conserving and not get_method("rap-noshift").conserving
    assert get_method("lrp-a2b1").conserving and not get_method("lrp-a2b1", alpha=3.0).conserving


def test_a_cam_variant_in_one_class_is_picked_up_everywhere(registered, capsys):
    model = build("resnet18", size=64)
    x = images(2, 64, seed=21)
    ours = explain(model, x, "xgradcam-test", target=[2, 4], layer="layer4")
    with XGradCAM(model=model, target_layers=[model.layer4]) as cam:
        cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in (2, 4)])
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        ref = np.maximum(cam.get_cam_image(x, model.layer4, None, acts, grads), 0)
    np.testing.assert_allclose(ours.raw_maps.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert ours.signed is False and ours.feature_layer == "layer4"  # the module named, whose output it read
    assert ours.feature_layout == "channels-first"
    assert map_style("xgradcam-test") == map_style("gradcam") != map_style("lrp")  # figures colour it as a CAM
    assert main(["methods"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("xgradcam-test"))
    assert "cam" in line and "CAM" in line and "XGrad-CAM (test)" in line


def test_an_lrp_composite_in_one_class_equals_gradient_times_input(registered):
    """LRP-0 on a bias-free ReLU network (max-pools, no BatchNorm) is exactly gradient × input."""
    model = build("vgg11", size=32)
    model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 6))
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    model = model.to(F64).eval()
    x = images(2, 32, seed=22, dtype=F64)
    lrp0 = explain(model, x, "lrp-zero-test", target=[1, 3])
    gxi = explain(model, x, "gradient-x-input", target=[1, 3])
    torch.testing.assert_close(lrp0.maps, gxi.maps, rtol=1e-9, atol=1e-12 * float(gxi.maps.abs().max()))
    assert float(lrp0.conservation_error.max()) < 1e-9


def test_options_reach_the_method_and_unknown_ones_are_one_line_errors():
    assert get_method("lrp-epsilon", epsilon=0.1).epsilon == 0.1
    assert get_method("integrated-gradients").steps == 32
    with pytest.raises(CxrExplainError, match="has no option 'gamma' \\(its options: epsilon\\)"):
        get_method("lrp-epsilon", gamma=1.0)
    opts = parse_method_options(["lrp-epsilon", "lrp-epsilon-plus", "rap"], ["epsilon=0.5", "lrp-epsilon.epsilon=0.1"])
    assert opts == {"lrp-epsilon": {"epsilon": 0.1}, "lrp-epsilon-plus": {"epsilon": 0.5}, "rap": {}}
    with pytest.raises(CxrExplainError, match="no method run here has an option 'steps'"):
        parse_method_options(["lrp"], ["steps=3"])
    with pytest.raises(CxrExplainError, match="expected a int"):
        parse_method_options(["ig"], ["steps=many"])
    model = build("resnet18", size=32)
    x = images(1, 32, seed=23)
    small = explain(model, x, "lrp-epsilon", target=1, epsilon=1e-3).maps
    large = explain(model, x, "lrp-epsilon", target=1, method_options={"epsilon": 10.0}).maps
    assert float(small.abs().sum()) > float(large.abs().sum())  # a larger ε absorbs more relevance


def test_cli_method_option_changes_the_maps_and_bad_ones_fail_before_work(tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((48, 48)) * 255).astype(np.uint8)).save(img)
    base = ["explain", str(img), "--arch", "resnet18", "--num-classes", "3", "--size", "32", "--target", "1",
            "--method", "lrp-epsilon"]
    assert main(base + ["--out", str(tmp_path / "a"), "--method-option", "epsilon=0.001"]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--method-option", "epsilon=100"]) == 0
    (a,) = [np.load(p) for p in (tmp_path / "a").glob("a_*_lrp-epsilon.npy")]
    (b,) = [np.load(p) for p in (tmp_path / "b").glob("a_*_lrp-epsilon.npy")]
    assert not np.allclose(a, b)
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "c"), "--method-option", "gamma=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no method run here has an option 'gamma'" in err[0]
    assert not (tmp_path / "c").exists()
