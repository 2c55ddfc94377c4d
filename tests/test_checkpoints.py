"""Checkpoint loading: every format users have, built here with random weights and the real key names.

Each format must load bit-exactly and strictly; wrong keys / shapes fail with one-line messages that
list the keys; pickles load only with trust_pickle=True.
"""
from __future__ import annotations

import hashlib
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from cxr_explain.errors import CheckpointError, CxrExplainError
from cxr_explain.models import (
    ARCHS,
    CHEXNET_LABELS,
    XRV_LABELS,
    build_model,
    infer_architecture,
    load_checkpoint,
    save_checkpoint,
)

X3 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
X1 = X3[:, :1]


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running stats so that a buffer lost in loading would change the output."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.num_batches_tracked.fill_(7)
    return model.eval()


def _assert_same_weights(src: dict[str, torch.Tensor], model: nn.Module, skip_counters: bool = False) -> None:
    got = model.state_dict()
    assert set(got) == set(src)
    for k, v in src.items():
        if skip_counters and k.endswith("num_batches_tracked"):
            continue
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def chexnet_src() -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(torchvision.models.densenet121(num_classes=14))


def _arnoweng_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision DenseNet keys -> arnoweng's (PyTorch 0.3) names: module.densenet121., norm.1, classifier.0."""
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue  # PyTorch 0.3 had no such buffer
        k = re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k)
        k = re.sub(r"^classifier\.", "classifier.0.", k)
        out["module.densenet121." + k] = v
    return out


def test_arnoweng_chexnet_loads_bit_exactly(tmp_path: Path, chexnet_src: nn.Module) -> None:
    src = chexnet_src.state_dict()
    aw = _arnoweng_dict(src)
    assert "module.densenet121.features.denseblock1.denselayer1.norm.1.weight" in aw
    assert "module.densenet121.classifier.0.weight" in aw
    path = tmp_path / "model.pth.tar"
    torch.save({"epoch": 9, "arch": "densenet121", "state_dict": aw, "best_auc": 0.84}, path,
               _use_new_zipfile_serialization=False)  # legacy format, as in 2017
    model, spec, report = load_checkpoint(path)

    _assert_same_weights(src, model, skip_counters=True)
    counters = [k for k in src if k.endswith("num_batches_tracked")]
    assert sorted(report.filled) == sorted(counters) and len(counters) == 121
    assert all(int(model.state_dict()[k]) == 0 for k in counters)
    assert report.format == "arnoweng-chexnet" and report.arch == "densenet121"
    assert report.remapped["strip prefix 'module.densenet121.'"] == len(aw)
    n_legacy = sum(bool(re.search(r"denselayer\d+\.(norm|conv)\.[12]\.", k)) for k in aw)
    assert n_legacy > 0 and sum(n for r, n in report.remapped.items() if "legacy" in r) == n_legacy
    assert report.remapped["Sequential head classifier.0 -> classifier"] == 2
    assert report.n_keys == len(src)
    assert spec.labels == CHEXNET_LABELS and spec.preprocessing == "imagenet-rgb"
    assert spec.provenance["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert spec.provenance["container"]["epoch"] == 9
    assert model.cxr_spec is spec and not model.training
    with torch.no_grad():
        assert torch.equal(model(X3), chexnet_src(X3))  # logits, no sigmoid inside
    assert "num_batches_tracked" in report.summary()


def test_jrzech_needs_trust_pickle_then_loads_bit_exactly(tmp_path: Path, chexnet_src: nn.Module) -> None:
    jz = torchvision.models.densenet121()
    jz.classifier = nn.Sequential(nn.Linear(1024, 14), nn.Sigmoid())
    jz.load_state_dict(_jrzech_keys(chexnet_src.state_dict()))
    jz.eval()
    path = tmp_path / "checkpoint"
    torch.save({"model": jz, "best_loss": 0.15, "epoch": 12, "rng_state": torch.get_rng_state(), "LR": 1e-4},
               path)

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = _one_line(info)
    assert str(path) in msg and "trust_pickle=True" in msg and "arbitrary code" in msg
    assert "torchvision.models.densenet.DenseNet" in msg

    model, spec, report = load_checkpoint(path, trust_pickle=True)
    assert report.format == "jrzech-chexnet"
    assert report.remapped == {"Sequential head classifier.0 -> classifier": 2}
    assert report.filled == []
    _assert_same_weights(chexnet_src.state_dict(), model)
    assert spec.labels == CHEXNET_LABELS
    with torch.no_grad():
        assert torch.allclose(torch.sigmoid(model(X3)), jz(X3), atol=0, rtol=0)


def _jrzech_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {re.sub(r"^classifier\.", "classifier.0.", k): v for k, v in sd.items()}


def _xrv_model(seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    m = torchvision.models.densenet121(num_classes=18)
    m.features.conv0 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return _randomise_bn(m, seed)


def test_xrv_state_dict_with_op_threshs(tmp_path: Path) -> None:
    src_model = _xrv_model()
    src = src_model.state_dict()
    thr = torch.tensor([0.07, 0.04] + [0.05] * 16)
    path = tmp_path / "xrv.pt"
    torch.save({**src, "op_threshs": thr}, path)
    model, spec, report = load_checkpoint(path)
    _assert_same_weights(src, model)
    assert report.format == "torchxrayvision" and report.in_channels == 1
    assert report.dropped == ["op_threshs"] and report.remapped == {}
    assert spec.provenance["op_threshs"] == pytest.approx(thr.tolist())
    assert spec.preprocessing == "xrv" and spec.in_channels == 1 and spec.labels == XRV_LABELS
    assert model.features.conv0.weight.shape == (64, 1, 7, 7)
    with torch.no_grad():
        assert torch.equal(model(X1), src_model(X1))


def test_pickled_xrv_object_loads_without_torchxrayvision(tmp_path: Path, monkeypatch) -> None:
    """A whole pickled xrv DenseNet, unpickled with stub classes because xrv is not installed."""
    pkg, sub = types.ModuleType("torchxrayvision"), types.ModuleType("torchxrayvision.models")
    pkg.models = sub

    class DenseNet(torchvision.models.densenet.DenseNet):
        def __init__(self) -> None:
            super().__init__(num_classes=18)

    DenseNet.__module__ = "torchxrayvision.models"
    DenseNet.__qualname__ = "DenseNet"
    sub.DenseNet = DenseNet
    monkeypatch.setitem(sys.modules, "torchxrayvision", pkg)
    monkeypatch.setitem(sys.modules, "torchxrayvision.models", sub)
    obj = DenseNet()
    src_model = _xrv_model(5)
    obj.features.conv0 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    obj.load_state_dict(src_model.state_dict())
    obj.register_buffer("op_threshs", torch.full((18,), 0.1))
    obj.pathologies = list(XRV_LABELS[:14]) + ["", "", "", ""]  # like densenet121-res224-nih
    path = tmp_path / "nih-densenet121.pt"
    torch.save(obj, path)
    # as if torchxrayvision were not installed, also where it is: a None entry makes imports fail
    monkeypatch.setitem(sys.modules, "torchxrayvision", None)
    monkeypatch.setitem(sys.modules, "torchxrayvision.models", None)

    with pytest.raises(CheckpointError, match="trust_pickle"):
        load_checkpoint(path)
    model, spec, report = load_checkpoint(path, trust_pickle=True)
    assert report.format == "torchxrayvision" and report.dropped == ["op_threshs"]
    assert any("torchxrayvision.models.DenseNet" in n for n in report.notes)  # stubbed, named
    assert spec.labels[:14] == XRV_LABELS[:14] and spec.labels[14:] == [""] * 4  # from .pathologies
    _assert_same_weights(src_model.state_dict(), model)


def test_xrv_style_wrapped_resnet(tmp_path: Path) -> None:
    """xrv's ResNet keeps torchvision's under ``model.`` with op_threshs at the root."""
    torch.manual_seed(6)
    src_model = build_model("resnet18", labels="xrv", in_channels=1, preprocessing="xrv")
    src = src_model.state_dict()
    path = tmp_path / "xrv-resnet.pt"
    torch.save({"op_threshs": torch.rand(18), **{"model." + k: v for k, v in src.items()}}, path)
    model, spec, report = load_checkpoint(path)
    assert report.format == "torchxrayvision" and report.dropped == ["op_threshs"]
    assert report.remapped == {"strip prefix 'model.'": len(src)}
    assert spec.preprocessing == "xrv" and spec.input_size == 512
    _assert_same_weights(src, model)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_plain_resnet_state_dict_infers_arch_and_loads(tmp_path: Path, prefix: str) -> None:
    torch.manual_seed(1)
    src_model = _randomise_bn(torchvision.models.resnet18(num_classes=3))
    src = src_model.state_dict()
    path = tmp_path / "r18.pt"
    torch.save({"state_dict": {prefix + k: v for k, v in src.items()}, "epoch": 2}, path)
    model, spec, report = load_checkpoint(path)
    assert report.format == "torchvision-state-dict" and report.arch == "resnet18"
    assert report.remapped == ({"strip prefix 'module.'": len(src)} if prefix else {})
    _assert_same_weights(src, model)
    assert spec.labels == ["class_0", "class_1", "class_2"]
    assert any("labels guessed" in n for n in report.notes)
    with torch.no_grad():
        assert torch.equal(model(X3), src_model(X3))
    # explicit label names win over the guess
    _, spec2, _ = load_checkpoint(path, labels=["a", "b", "c"])
    assert spec2.labels == ["a", "b", "c"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("in_channels", [3, 1])
def test_arch_inference_from_keys_and_shapes(arch: str, in_channels: int) -> None:
    with torch.device("meta"):  # real key names and shapes, no weights to allocate
        sd = build_model(arch, num_classes=5, in_channels=in_channels).state_dict()
    assert infer_architecture(sd) == (arch, 5, in_channels)


@pytest.mark.parametrize("ctor, expected", [
    (torchvision.models.densenet169, "densenet(blocks=(6, 12, 32, 32))"),
    (torchvision.models.resnet101, "resnet(bottleneck blocks=(3, 4, 23, 3))"),
    (torchvision.models.vgg19, "vgg(16 convs)"),
])
def test_unsupported_variants_are_named(ctor, expected: str) -> None:
    with torch.device("meta"):
        sd = ctor().state_dict()
    assert infer_architecture(sd)[0] == expected
    assert infer_architecture({"encoder.weight": torch.zeros(2, 2)}) is None


@pytest.fixture(scope="module")
def r18() -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    return torchvision.models.resnet18(num_classes=3).state_dict()


def test_wrong_keys_fail_listing_them(tmp_path: Path, r18: dict[str, torch.Tensor]) -> None:
    sd = dict(r18)
    sd["layer1.0.bn1.gamma"] = sd.pop("layer1.0.bn1.weight")
    sd["extra.thing"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = _one_line(info)
    assert str(path) in msg
    assert "1 missing key(s) [layer1.0.bn1.weight]" in msg
    assert "2 unexpected key(s) [layer1.0.bn1.gamma, extra.thing]" in msg


def test_many_missing_keys_are_previewed(tmp_path: Path, r18: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "r18.pt"
    torch.save(r18, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, arch="resnet34")
    msg = _one_line(info)
    assert re.search(r"\d+ missing key\(s\) \[layer1\.2\.conv1\.weight, .*\(\+\d+ more\)\]", msg)
    assert "keys look like resnet18 with 3 outputs" in msg


def test_wrong_arch_names_what_the_keys_look_like(tmp_path: Path, r18: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "r18.pt"
    torch.save(r18, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, arch="vgg16")
    msg = _one_line(info)
    assert "does not fit vgg16 (num_classes=3" in msg and "unexpected key(s) [conv1.weight" in msg
    assert "keys look like resnet18 with 3 outputs" in msg


def test_shape_mismatch_fails(tmp_path: Path, r18: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "r18.pt"
    torch.save(r18, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, num_classes=5)
    msg = _one_line(info)
    assert "fc.weight file [3, 512] vs model [5, 512]" in msg and "fc.bias" in msg


def test_partly_missing_counters_are_not_filled(tmp_path: Path, r18: dict[str, torch.Tensor]) -> None:
    sd = dict(r18)
    del sd["layer2.0.bn1.num_batches_tracked"]  # one gone, the rest present: not a legacy file
    path = tmp_path / "r18.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \[layer2\.0\.bn1\.num_batches_tracked\]"):
        load_checkpoint(path)


def test_unreadable_files_fail_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(missing)
    assert "not found" in _one_line(info) and str(missing) in str(info.value)
    text = tmp_path / "notes.txt"
    text.write_text("hello\nworld\n")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(text)
    assert "not a PyTorch checkpoint" in _one_line(info) and str(text) in str(info.value)
    odd = tmp_path / "odd.pt"
    torch.save({"optimizer": {"lr": 0.1}, "epoch": 3}, odd)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(odd)
    assert "no state dict" in _one_line(info)
    unknown = tmp_path / "unknown.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, unknown)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(unknown)
    assert "cannot tell the architecture" in _one_line(info) and "encoder.weight" in str(info.value)


def test_trust_pickle_hint_only_for_a_genuine_pickle(tmp_path: Path) -> None:
    """Random bytes, an empty file, a truncated archive or pickle are "not a PyTorch checkpoint";
    only a well-formed pickle of objects (zip or legacy format) earns the --trust-pickle hint."""
    import os

    module = nn.Linear(2, 2)
    zipped, legacy = tmp_path / "obj.pt", tmp_path / "obj_legacy.pt"
    torch.save({"model": module}, zipped)
    torch.save({"model": module}, legacy, _use_new_zipfile_serialization=False)
    bad = {
        "random.pt": os.urandom(4096),
        "empty.pt": b"",
        "truncated_zip.pt": zipped.read_bytes()[:300],
        "truncated_legacy.pt": legacy.read_bytes()[:120],
        "pickle_then_noise.pt": legacy.read_bytes()[:40] + os.urandom(200),
    }
    for name, data in bad.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        msg = _one_line(info)
        assert msg.startswith(f"not a PyTorch checkpoint: {path}"), msg
        assert "trust" not in msg.replace(str(path), "").lower(), msg
    for path in (zipped, legacy):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        msg = _one_line(info)
        assert "torch.nn.modules.linear.Linear" in msg.split(",")[0] and "--trust-pickle" in msg, msg


def test_own_format_round_trip_fp32(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = _randomise_bn(build_model("resnet18", labels="benchmark", provenance={"trained_on": "phantom"}))
    path = save_checkpoint(tmp_path / "m.pt", model, extra={"epoch": 3, "history": [0.5, 0.4]})
    raw = torch.load(path, weights_only=True)  # no pickled objects inside
    assert raw["format"] == "cxr-explain/1" and raw["arch"] == "resnet18" and raw["extra"]["epoch"] == 3
    assert set(raw) >= {"labels", "preprocessing", "input_size", "multilabel", "provenance", "state_dict"}
    loaded, spec, report = load_checkpoint(path)
    assert spec == model.cxr_spec and report.format == "cxr-explain/1"
    _assert_same_weights(model.state_dict(), loaded)
    with pytest.raises(CheckpointError, match="resnet18"):
        load_checkpoint(path, arch="resnet34")
    with pytest.raises(CheckpointError, match="8 outputs"):
        load_checkpoint(path, num_classes=3)


def test_own_format_fp16_loads_into_fp32_exactly_as_stored(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = _randomise_bn(build_model("densenet121", labels="pneumonia", in_channels=1, preprocessing="xrv"))
    full = save_checkpoint(tmp_path / "full.pt", model)
    half = save_checkpoint(tmp_path / "half.pt", model, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    stored = torch.load(half, weights_only=True)["state_dict"]
    loaded, spec, report = load_checkpoint(half)
    assert spec.preprocessing == "xrv" and spec.labels == ["Pneumonia"]
    assert any("float16" in n for n in report.notes)
    for k, v in loaded.state_dict().items():
        ref = model.state_dict()[k]
        assert v.dtype == ref.dtype
        if ref.is_floating_point():
            assert stored[k].dtype == torch.float16 and torch.equal(v, stored[k].float())
        else:
            assert torch.equal(v, ref)


def test_save_refuses_what_a_weights_only_load_cannot_read(tmp_path: Path) -> None:
    model = build_model("resnet18", num_classes=2)
    with pytest.raises(CxrExplainError, match="extra.when"):
        save_checkpoint(tmp_path / "m.pt", model, extra={"when": object()})
    with torch.no_grad():
        model.fc.weight[0, 0] = 1e6
    with pytest.raises(CxrExplainError, match="fc.weight .*float16"):
        save_checkpoint(tmp_path / "m.pt", model, half=True)
    assert not (tmp_path / "m.pt").exists()
