"""torchxrayvision's DenseNet and ResNet objects, explained as they are: every method runs, the
explained output is the logit before xrv's op_norm calibration, LRP / RAP conserve in float64.

Nothing is downloaded: DenseNet is built with ``weights=None``; ResNet insists on its weights file,
so a random state dict (realistic norm statistics) is written where torchxrayvision 1.5.7 looks for
it (``cache_dir`` / basename of the weights URL), and its downloader is replaced by one that fails."""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch
import torchvision
xrv = pytest.importorskip("torchxrayvision")  # optional; CI installs it
from nets import realistic
from PIL import Image

from cxr_explain.api import load_images
from cxr_explain.attribution import explain
from cxr_explain.attribution.graph import try_trace
from cxr_explain.data.images import get_preprocessing
from cxr_explain.errors import CxrExplainError
from cxr_explain.models import explainable_model, model_spec

F64 = torch.float64
RESNET_WEIGHTS = "resnet50-res512-all"
#: The labels of xrv's NIH weights: outputs the weights do not train are "".
NIH_LABELS = xrv.models.model_urls["densenet121-res224-nih"]["labels"]


def xray(b: int, size: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Images in xrv's input range [−1024, 1024], one channel."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(b, 1, size, size, generator=g) * 2 - 1) * 1024).to(dtype)


def densenet(op_threshs=None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None, op_threshs=op_threshs)
    return realistic(model, size=64, channels=1, scale=600.0)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """xrv.models.ResNet("resnet50-res512-all") from a random weights file; never a download."""
    folder = tmp_path_factory.mktemp("xrv_cache")
    torch.manual_seed(1)
    net = torchvision.models.resnet50(num_classes=18, weights=None)
    net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    realistic(net, size=64, channels=1, scale=600.0)
    url = xrv.models.model_urls[RESNET_WEIGHTS]["weights_url"]
    torch.save(net.state_dict(), os.path.join(folder, os.path.basename(url)))
    del net

    def no_download(*args, **kwargs):
        raise AssertionError("torchxrayvision tried to download weights")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(xrv.utils, "download", no_download)
        model = xrv.models.ResNet(weights=RESNET_WEIGHTS, cache_dir=str(folder))
    assert model.input_resolution == 512 and model.op_threshs is not None
    yield model
    del model
    gc.collect()


def xrv_logits(model, x):
    """xrv's own forward up to the logits, read from its code (before sigmoid and op_norm)."""
    with torch.no_grad():
        if isinstance(model, xrv.models.DenseNet):
            return model.classifier(model.features2(x))
        return model.model(x)


def test_densenet_logits_are_xrvs_before_op_norm_and_labels_its_pathologies():
    thr = torch.full((18,), 0.3)
    model = densenet(op_threshs=thr).eval()
    model.pathologies = list(NIH_LABELS)
    x = xray(2, 64, seed=1)
    e = explain(model, x, "gradient", target="Pneumonia")
    logits = xrv_logits(model, x)
    assert torch.equal(e.logits, logits)
    with torch.no_grad():  # what xrv returns is calibrated: sigmoid then op_norm, not the logit
        assert not torch.allclose(model(x), logits)
    assert e.target_names == ["Pneumonia", "Pneumonia"] and torch.equal(e.explained, logits[:, 8])
    assert explain(model, x, "gradient", target=14).target_names[0] == "class14"  # an untrained output: ""
    with pytest.raises(CxrExplainError, match="no output named 'Lung Lesion'"):
        explain(model, x, "gradient", target="Lung Lesion")
    spec = model_spec(model)
    assert spec.labels == list(NIH_LABELS) and spec.preprocessing == "xrv" and spec.input_size == 224
    assert spec.provenance["op_threshs"] == pytest.approx([0.3] * 18)


def test_the_view_is_traceable_shares_the_layers_and_follows_replacements():
    model = densenet()
    view = explainable_model(model)
    assert try_trace(view) is not None and view is explainable_model(model)
    assert view.features is model.features and view.classifier is model.classifier
    model.classifier = torch.nn.Linear(1024, 3)
    view2 = explainable_model(model)
    assert view2 is not view and view2.classifier is model.classifier


@pytest.mark.parametrize("arch", ["densenet", "resnet"])
def test_every_method_explains_xrv_models_and_lrp_rap_conserve(arch, request):
    if arch == "densenet":
        model, size = densenet(), 64
    else:
        model, size = request.getfixturevalue("resnet"), 128
        model.input_resolution = 128  # xrv resizes to this attribute; lowered to keep float64 runs small
    model64 = model.to(F64)  # moved in place: one float64 copy, freed with the model
    try:
        x = xray(1, size, seed=2, dtype=F64)
        logits = xrv_logits(model64, x)
        t = int(logits[0].argmax())
        for method in ["lrp", "rap", "gradient", "gradient-x-input", "integrated-gradients", "gradcam",
                       "gradcam++", "cam"]:
            opts = {"steps": 4} if method == "integrated-gradients" else {}
            e = explain(model64, x, method, target=t, **opts)
            assert e.maps.shape == (1, size, size) and torch.isfinite(e.maps).all(), method
            assert float(e.maps.abs().sum()) > 0, method
            assert torch.equal(e.logits, logits), method
            if method in ("lrp", "rap"):
                tol = 1e-8 if method == "rap" else 1e-6
                assert abs(float(e.maps.sum()) - float(logits[0, t])) < tol * abs(float(logits[0, t])), method
            if method in ("cam", "gradcam"):  # DenseNet: the functional ReLU after features, as in xrv
                assert e.feature_layer == ("relu" if arch == "densenet" else "model.layer4"), method
                assert e.feature_layout == "channels-first"
    finally:
        if arch == "resnet":
            model.input_resolution = 512
            model.to(torch.float32)


def test_resnet_at_its_native_resolution_and_other_sizes_refused(resnet):
    x = xray(1, 512, seed=3)
    e = explain(resnet, x, "gradcam", target="Effusion")
    assert torch.equal(e.logits, xrv_logits(resnet, x)) and e.feature_layer == "model.layer4"
    assert e.target_names == ["Effusion"] and e.raw_maps.shape == (1, 16, 16)
    with pytest.raises(CxrExplainError, match=r"works at 512×512.*resize these 224×224.*load_images"):
        explain(resnet, xray(1, 224), "gradient", target=0)
    assert try_trace(resnet) is None  # the xrv object itself: fix_resolution's checks stop torch.fx


def test_load_images_applies_xrvs_convention_at_the_models_resolution(tmp_path, resnet):
    px = (np.random.default_rng(0).random((90, 120)) * 255).astype(np.uint8)
    path = tmp_path / "cxr.png"
    Image.fromarray(px).save(path)
    for model, size in ((densenet(), 224), (resnet, 512)):
        (img,) = load_images([path], model)
        assert img.tensor.shape == (1, size, size)
        assert -1024 <= float(img.tensor.min()) and float(img.tensor.max()) <= 1024
        ref = get_preprocessing("xrv", size=size)
        assert img.preprocessing.name == "xrv" and torch.equal(img.tensor, ref(ref_read(path))[0])


def ref_read(path):
    from cxr_explain.data.images import read_image

    return read_image(path)
