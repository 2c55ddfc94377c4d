"""Conservation warnings name the node that lost relevance and, for known causes, what to do."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from cxr_explain.attribution import explain
from cxr_explain.attribution.methods import get_method
from cxr_explain.attribution.methods.propagation import conservation_message


class BiasOnly(nn.Module):
    """conv1 → ReLU → conv2 (channel 0: zero weights, bias 1, so active only through its bias) → ReLU
    → GAP → fc with positive weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(2, 2, 1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 1)
        with torch.no_grad():  # everything else positive and bias-free: conserved exactly
            self.conv1.weight.abs_()
            self.conv1.bias.zero_()
            self.conv2.bias[1] = 0.0
            self.conv2.weight[0] = 0.0
            self.conv2.bias[0] = 1.0
            self.conv2.weight[1] = self.conv2.weight[1].abs()
            self.fc.weight.copy_(torch.tensor([[1.0, 0.5]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))), 1))


def test_lrp_warning_names_the_bias_only_layer_and_the_remedy():
    model = BiasOnly().double()
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.warns(RuntimeWarning) as caught:
        explain(model, x, "lrp", target=0)
    (msg,) = [str(w.message) for w in caught]
    assert msg.startswith("lrp: Σ map = ") and "explained output is" in msg
    assert "arises at conv2 (conv, " in msg and "bias" in msg and "use rap" in msg, msg
    # the lost share is channel 0's: fc weight 1 × its constant activation 1, over the logit
    with torch.no_grad():
        logit = float(model(x))
    share = float(msg.split("(conv, ")[1].split(" of")[0])
    assert share == pytest.approx(1.0 / logit, rel=0.01)


def _node(name, kind, role):
    return SimpleNamespace(name=name, kind=kind, role=role, module_path=name)


def test_rap_head_rescaling_is_not_counted_as_a_loss():
    """RAP starts from 1 at the head and rescales to the logit y: Σ out − Σ in = 1 − y there by
    design. The message must name the node that actually lost relevance."""
    traced = SimpleNamespace(by_name={"fc": _node("fc", "linear", "head"),
                                      "features.pool0": _node("features.pool0", "maxpool", "hidden")})
    y, lost = 3.0, 0.06
    explained = torch.tensor([[y]])
    total = torch.tensor([[y - lost]])
    cons = (total - explained).abs() / explained.abs()
    leaks = {"fc": torch.tensor([[1.0 - y]]), "features.pool0": torch.tensor([[lost]])}
    sums = {"fc": torch.tensor([[1.0]]), "features.pool0": torch.tensor([[y]])}
    msg = conservation_message(get_method("rap"), traced, cons, total, explained, leaks, sums)
    assert "arises at features.pool0 (maxpool, 0.02 of the explained output lost)" in msg, msg
    # LRP starts at the logit: there a head leak is a real loss and is named
    leaks_lrp = {"fc": torch.tensor([[0.5]]), "features.pool0": torch.tensor([[lost]])}
    msg = conservation_message(get_method("lrp"), traced, cons, total, explained, leaks_lrp, sums)
    assert "arises at fc (linear, " in msg and "bias" in msg


def test_explain_command_names_image_and_size_in_the_warning(tmp_path, recwarn):
    import numpy as np
    from PIL import Image

    from cxr_explain.cli import main
    from cxr_explain.models import build_model, save_checkpoint

    model = build_model("resnet18", labels="chexnet", input_size=32)
    with torch.no_grad():
        model.fc.weight.clamp_(max=0)  # every z⁺ denominator of the head is 0: LRP loses it all there
    save_checkpoint(tmp_path / "m.pt", model, model.cxr_spec)
    film = tmp_path / "film.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48), dtype=np.uint8)).save(film)
    assert main(["explain", str(film), "--checkpoint", str(tmp_path / "m.pt"), "--method", "lrp",
                 "--target", "Mass", "--out", str(tmp_path / "out")]) == 0
    msgs = [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and msgs[0].startswith("film.png (32 px): lrp: Σ map = "), msgs
    assert "arises at fc (linear" in msgs[0]
