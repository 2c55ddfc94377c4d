"""Gradient methods on models torch.fx cannot trace (plain autograd), against the traced graph of
the same network."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from nets import build, images

from cxr_explain.attribution import explain
from cxr_explain.attribution.graph import try_trace
from cxr_explain.errors import CxrExplainError

F64 = torch.float64


class Checked(nn.Module):
    """``sigmoid(net(x))`` behind a shape check: data-dependent control flow, so torch.fx fails."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        if x.shape[-1] != x.shape[-2]:
            raise ValueError("square images only")
        return torch.sigmoid(self.net(x))


class Plain(nn.Module):
    """The same network without the check: traceable (module paths equal :class:`Checked`'s)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.sigmoid(self.net(x))


@pytest.fixture(scope="module")
def resnet():
    return build("resnet18", size=64).to(F64)


METHODS = [("gradient", {}), ("gradient-x-input", {}), ("integrated-gradients", {"steps": 4})]


@pytest.mark.parametrize("method, options", METHODS)
def test_untraceable_model_gives_exactly_the_traced_result(resnet, method, options):
    checked, plain = Checked(resnet), Plain(resnet)
    assert try_trace(checked) is None and try_trace(plain) is not None
    x = images(2, 64, seed=11, dtype=F64)
    targets = [[1, 3], [0, 2]]
    hooked = explain(checked, x, method, target=targets, return_input_relevance=True, **options)
    traced = explain(plain, x, method, target=targets, return_input_relevance=True, **options)
    assert torch.equal(hooked.maps, traced.maps)
    assert torch.equal(hooked.logits, traced.logits)
    with torch.no_grad():  # the explained outputs are the logits, not the sigmoid the model returns
        logits = resnet(x)
    assert torch.equal(hooked.explained, torch.stack([logits[0, [1, 3]], logits[1, [0, 2]]]))
    assert torch.equal(hooked.input_relevance, traced.input_relevance)


class TwoOutputs(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        if x.shape[-1] != x.shape[-2]:
            raise ValueError("square images only")
        y = self.net(x)
        return y, y


def test_a_model_returning_a_tuple_gets_a_clear_error(resnet):
    with pytest.raises(CxrExplainError, match="returns a tuple, not a tensor of logits"):
        explain(TwoOutputs(resnet), images(1, 64, dtype=F64), "gradient", target=0)


def test_softmax_functional_output_is_skipped_too():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 3)).to(F64)

    class SoftmaxOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            if x.shape[-1] != x.shape[-2]:
                raise ValueError("square")
            return self.net(x).softmax(1)

    x = images(2, 16, seed=14, dtype=F64)
    e = explain(SoftmaxOut(), x, "gradient", target=1)
    with torch.no_grad():
        assert torch.equal(e.logits, net(x))
