"""Model zoo: heads output logits of the right size, 1-channel stems, label sets and label lookup."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from cxr_explain.errors import CxrExplainError
from cxr_explain.models import (
    BENCHMARK_LABELS,
    CHEXNET_LABELS,
    PNEUMONIA_LABELS,
    XRV_LABELS,
    ModelSpec,
    build_model,
    label_index,
)

HEADS = {"densenet121": "classifier", "resnet18": "fc", "resnet34": "fc", "resnet50": "fc",
         "vgg16": "classifier.6", "vgg16_bn": "classifier.6"}
STEMS = {"densenet121": "features.conv0", "resnet18": "conv1", "resnet34": "conv1", "resnet50": "conv1",
         "vgg16": "features.0", "vgg16_bn": "features.0"}


@pytest.mark.parametrize("arch", ["densenet121", "resnet18", "resnet34", "resnet50", "vgg16", "vgg16_bn"])
def test_head_outputs_logits_of_requested_size(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=3).eval()
    head = model.get_submodule(HEADS[arch])
    assert isinstance(head, nn.Linear) and head.out_features == 3
    # logits, not probabilities: the model output is the Linear head's output, untouched
    seen = {}
    head.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    with torch.no_grad():
        y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 3) and torch.equal(y, seen["out"])
    assert not any(isinstance(m, (nn.Sigmoid, nn.Softmax)) for m in model.modules())
    assert model.cxr_spec.arch == arch and model.cxr_spec.num_classes == 3


@pytest.mark.parametrize("arch", ["densenet121", "resnet18", "vgg16"])
def test_one_channel_stem(arch: str) -> None:
    model = build_model(arch, labels="xrv" if arch == "densenet121" else ["a", "b"], in_channels=1,
                        preprocessing="xrv" if arch == "densenet121" else None)
    stem = model.get_submodule(STEMS[arch])
    with torch.device("meta"):  # geometry of the torchvision 3-channel stem, without the init cost
        ref = build_model(arch, num_classes=2).get_submodule(STEMS[arch])
    assert stem.in_channels == 1 and ref.in_channels == 3
    assert (stem.out_channels, stem.kernel_size, stem.stride, stem.padding) == \
        (ref.out_channels, ref.kernel_size, ref.stride, ref.padding)
    assert (stem.bias is None) == (ref.bias is None)
    assert stem.weight.device.type == "cpu" and torch.isfinite(stem.weight).all()
    with torch.no_grad():
        y = model.eval()(torch.randn(1, 1, 32, 32))
    assert y.shape[1] == model.cxr_spec.num_classes
    assert model.cxr_spec.in_channels == 1


def test_label_sets() -> None:
    assert len(CHEXNET_LABELS) == 14 and CHEXNET_LABELS[12] == "Pleural_Thickening"
    assert BENCHMARK_LABELS == CHEXNET_LABELS[:8]
    assert len(XRV_LABELS) == 18 and XRV_LABELS[8] == "Pneumonia" and XRV_LABELS[16] == "Lung Opacity"
    assert PNEUMONIA_LABELS == ["Pneumonia"]
    assert build_model("resnet18", labels="benchmark").cxr_spec.labels == CHEXNET_LABELS[:8]
    assert build_model("resnet18").cxr_spec.labels == CHEXNET_LABELS  # default: CheXNet 14
    assert build_model("resnet18", num_classes=1).cxr_spec.labels == ["Pneumonia"]
    two = build_model("resnet18", num_classes=2).cxr_spec
    assert two.labels == ["Normal", "Pneumonia"] and two.multilabel is False
    assert build_model("resnet18", num_classes=5).cxr_spec.labels[4] == "class_4"


def test_label_index_by_name_not_position() -> None:
    xrv = build_model("densenet121", labels="xrv", in_channels=1, preprocessing="xrv")
    chexnet = build_model("densenet121", labels="chexnet")
    assert label_index(xrv, "Cardiomegaly") == 10
    assert label_index(chexnet, "Cardiomegaly") == 1
    assert label_index(chexnet.cxr_spec, "Infiltrate") == 3  # BBox_List spelling
    assert label_index(chexnet, "pleural thickening") == 12
    with pytest.raises(CxrExplainError, match="did you mean 'Pneumothorax'"):
        label_index(chexnet, "Pneumothrax")
    with pytest.raises(CxrExplainError, match="no label names"):
        label_index(nn.Linear(2, 2), "Mass")


def test_bad_arguments_raise_one_line_errors() -> None:
    for call, pattern in [
        (lambda: build_model("densenet12"), "did you mean 'densenet121'"),
        (lambda: build_model("resnet18", num_classes=3, labels=["a", "b"]), "num_classes=3"),
        (lambda: build_model("resnet18", labels="nope"), "unknown label set"),
        (lambda: build_model("resnet18", in_channels=2), "in_channels"),
        (lambda: build_model("resnet18", in_channels=1, preprocessing="imagenet-rgb"), "channel"),
    ]:
        with pytest.raises(CxrExplainError, match=pattern) as info:
            call()
        assert "\n" not in str(info.value)


def test_spec_survives_copy_pickle_and_dict_round_trip() -> None:
    model = build_model("resnet18", labels=["x", "y"], provenance={"run": 7})
    spec = model.cxr_spec
    assert copy.deepcopy(model).cxr_spec == spec
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["provenance"] == {"run": 7}
