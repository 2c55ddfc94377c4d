"""Image readers (PNG / JPEG / DICOM) and the per-checkpoint preprocessing."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxr_explain.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    XRay,
    get_preprocessing,
    is_dicom,
    read_image,
)
from cxr_explain.data.types import Box
from cxr_explain.errors import CxrExplainError, DataError

DATA = Path(__file__).parent / "data"
RGBA_PNG = DATA / "nih_png" / "00001369_000.png"
L_PNG = DATA / "nih_png" / "00004296_000.png"
DCM_MONO2 = DATA / "dicom" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
DCM_MONO1 = DATA / "dicom" / "Fake_MONOHR1.dcm"


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- real files


def test_rgba_png_reduced_to_one_channel_exactly():
    with Image.open(RGBA_PNG) as im:
        assert im.mode == "RGBA"
        rgba = np.asarray(im)
        gray = np.asarray(im.convert("L"))
    x = read_image(RGBA_PNG)
    assert x.pixels.shape == (1024, 1024) and x.pixels.dtype == np.float32
    assert (x.height, x.width, x.bits, x.maxval) == (1024, 1024, 8, 255.0)
    np.testing.assert_array_equal(x.pixels, rgba[..., 0])
    np.testing.assert_array_equal(x.pixels, gray)


def test_grayscale_png_read_unchanged():
    with Image.open(L_PNG) as im:
        assert im.mode == "L"
        ref = np.asarray(im)
    x = read_image(str(L_PNG))
    assert x.path == L_PNG and x.bits == 8
    np.testing.assert_array_equal(x.pixels, ref)


def test_dicom_monochrome2_matches_pydicom():
    ref = pydicom.dcmread(DCM_MONO2).pixel_array
    x = read_image(DCM_MONO2)
    assert x.bits == 8 and x.pixels.shape == (1024, 1024) and x.pixels.dtype == np.float32
    np.testing.assert_array_equal(x.pixels, ref)


def test_dicom_monochrome1_is_inverted():
    a = read_image(DCM_MONO2).pixels
    b = read_image(DCM_MONO1).pixels
    assert pydicom.dcmread(DCM_MONO1, stop_before_pixels=True).PhotometricInterpretation == "MONOCHROME1"
    np.testing.assert_array_equal(b, 255.0 - a)


def test_dicom_detected_by_magic_without_extension(tmp_path):
    p = tmp_path / "scan_without_ext"
    shutil.copy(DCM_MONO2, p)
    assert is_dicom(p)
    np.testing.assert_array_equal(read_image(p).pixels, read_image(DCM_MONO2).pixels)


# ---------------------------------------------------------------- generated files


def test_16bit_png_keeps_range(tmp_path):
    a = (np.arange(40 * 30, dtype=np.int64).reshape(40, 30) * 54).astype(np.uint16)
    a[0, 0] = 65535
    p = tmp_path / "x16.png"
    Image.fromarray(a).save(p)
    x = read_image(p)
    assert x.bits == 16 and x.maxval == 65535.0
    np.testing.assert_array_equal(x.pixels, a.astype(np.float32))
    t, _, _ = get_preprocessing("gray", size=30)(XRay(x.pixels[:30], x.bits, x.path))
    assert float(t.max()) == pytest.approx(1.0)  # scaled by 2**16-1, not by 255


def test_jpeg_gray_and_rgb(tmp_path):
    rng = np.random.default_rng(0)
    base = np.clip(rng.normal(128, 20, (64, 80)), 0, 255).astype(np.uint8)
    base = np.kron(base[::8, ::8], np.ones((8, 8), np.uint8))  # smooth blocks: small JPEG error
    p = tmp_path / "g.jpg"
    Image.fromarray(base).save(p, quality=95)
    x = read_image(p)
    assert x.bits == 8 and x.pixels.shape == (64, 80)
    assert np.abs(x.pixels - base).mean() < 2.0
    p2 = tmp_path / "c.JPEG"
    Image.fromarray(np.stack([base] * 3, -1)).save(p2, quality=95)
    y = read_image(p2)
    assert y.pixels.shape == (64, 80) and np.abs(y.pixels - base).mean() < 2.0


def test_rgb_with_different_channels_uses_luma(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    p = tmp_path / "colour.png"
    Image.fromarray(rgb).save(p)
    x = read_image(p)
    expect = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    np.testing.assert_allclose(x.pixels, expect, atol=1e-3)
    # within rounding of PIL's own convert('L')
    assert np.abs(x.pixels - np.asarray(Image.fromarray(rgb).convert("L"))).max() <= 1.0


def _dicom(path: Path, arr: np.ndarray | None, **attrs) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    if arr is not None:
        ds.Rows, ds.Columns = arr.shape[:2]
        ds.SamplesPerPixel = 1 if arr.ndim == 2 else arr.shape[2]
        ds.PhotometricInterpretation = "MONOCHROME2" if arr.ndim == 2 else "RGB"
        if arr.ndim == 3:
            ds.PlanarConfiguration = 0
        ds.BitsAllocated = arr.dtype.itemsize * 8
        ds.BitsStored = ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = arr.tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    return path


def _ramp12() -> np.ndarray:
    return (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 4).astype(np.uint16)  # 0..4092


def test_dicom_12bit_monochrome1_and_rescale(tmp_path):
    a = _ramp12()
    p = _dicom(tmp_path / "m2.dcm", a, BitsStored=12, HighBit=11)
    x = read_image(p)
    assert x.bits == 12
    np.testing.assert_array_equal(x.pixels, a)
    p1 = _dicom(tmp_path / "m1.dcm", a, BitsStored=12, HighBit=11, PhotometricInterpretation="MONOCHROME1")
    np.testing.assert_array_equal(read_image(p1).pixels, 4095.0 - a)
    # Rescale slope 2: modality range [0, 8190] is mapped back onto [0, 4095] -> unchanged values
    pr = _dicom(tmp_path / "r.dcm", a, BitsStored=12, HighBit=11, RescaleSlope=2, RescaleIntercept=0)
    np.testing.assert_allclose(read_image(pr).pixels, a, atol=1e-3)


def test_dicom_window_applied(tmp_path):
    a = _ramp12()
    p = _dicom(tmp_path / "w.dcm", a, BitsStored=12, HighBit=11, WindowCenter=2048, WindowWidth=1024)
    x = read_image(p).pixels
    assert x[a < 1500].max() == 0.0 and x[a > 2600].min() == 4095.0
    mid = (a > 1700) & (a < 2400)
    assert np.all(np.diff(x[mid]) > 0)  # strictly increasing inside the window
    assert not np.array_equal(read_image(p, apply_voi=False).pixels, x)


# ---------------------------------------------------------------- malformed inputs


def test_truncated_png_is_one_line_data_error(tmp_path):
    p = tmp_path / "cut.png"
    p.write_bytes(L_PNG.read_bytes()[:20000])
    with pytest.raises(DataError) as e:
        read_image(p)
    assert "cut.png" in one_line(e) and "truncated" in str(e.value)


def test_dicom_without_pixel_data(tmp_path):
    p = _dicom(tmp_path / "nopix.dcm", None)
    with pytest.raises(DataError) as e:
        read_image(p)
    assert "nopix.dcm" in one_line(e) and "pixel data" in str(e.value)


def test_rgb_dicom_refused(tmp_path):
    p = _dicom(tmp_path / "rgb.dcm", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError) as e:
        read_image(p)
    assert "rgb.dcm" in one_line(e) and "colour" in str(e.value)


def test_truncated_dicom(tmp_path):
    p = tmp_path / "cut.dcm"
    p.write_bytes(DCM_MONO2.read_bytes()[:5000])
    with pytest.raises(DataError) as e:
        read_image(p)
    assert "cut.dcm" in one_line(e) and "truncated" in str(e.value)


def test_unknown_extension_and_missing_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(DataError) as e:
        read_image(p)
    assert "notes.txt" in one_line(e) and ".txt" in str(e.value)
    with pytest.raises(DataError) as e:
        read_image(tmp_path / "nope.png")
    assert "nope.png" in one_line(e) and "not found" in str(e.value)


# ---------------------------------------------------------------- preprocessing


def test_imagenet_rgb_intensity_and_shape():
    x = XRay(np.full((50, 70), 51.0, np.float32), 8, Path("c.png"))
    t, boxes, masks = get_preprocessing("imagenet-rgb")(x)
    assert t.shape == (3, 224, 224) and t.dtype == torch.float32 and boxes == [] and masks is None
    for c in range(3):
        assert torch.allclose(t[c], torch.tensor((0.2 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]), atol=1e-5)


def test_imagenet_rgb_close_to_torchvision_pil_pipeline():
    from torchvision import transforms as T

    ref_tf = T.Compose([T.Resize((224, 224)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with Image.open(L_PNG) as im:
        ref = ref_tf(im.convert("RGB"))
    t, _, _ = get_preprocessing("imagenet-rgb")(read_image(L_PNG))
    # differences come from PIL's uint8 rounding after resizing (about 1/255/0.225 = 0.017)
    assert (t - ref).abs().mean() < 0.01 and (t - ref).abs().max() < 0.1


def test_xrv_range_and_center_crop():
    px = np.zeros((300, 500), np.float32)
    px[:, 100:400] = 255.0  # exactly the central square of a 300x500 image
    t, _, _ = get_preprocessing("xrv")(XRay(px, 8, Path("w.png")))
    assert t.shape == (1, 224, 224)
    assert torch.allclose(t, torch.full_like(t, 1024.0))  # crop keeps only the bright square
    t0, _, _ = get_preprocessing("xrv", size=64)(XRay(np.zeros((80, 80), np.float32), 8, Path("z.png")))
    assert t0.shape == (1, 64, 64) and torch.all(t0 == -1024.0)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("name", ["gray", "imagenet-rgb", "xrv"])
@pytest.mark.parametrize("shape", [(600, 400), (400, 600), (512, 512)])
def test_box_stays_on_the_same_pixels(name, shape):
    h, w = shape
    box = Box("Mass", 150.3, 120.6, 97.2, 140.8)
    px = np.zeros((h, w), np.float32)
    px[box.to_mask(h, w)] = 255.0
    pre = get_preprocessing(name)
    t, (b,), masks = pre(XRay(px, 8, Path("s.png")), [box], {"Mass": box.to_mask(h, w)})
    unit = t[0].numpy()
    unit = (unit - unit.min()) / (unit.max() - unit.min())
    bright = unit > 0.5
    assert _iou(bright, b.to_mask(224, 224)) > 0.93
    assert masks["Mass"].dtype == bool and masks["Mass"].shape == (224, 224)
    assert _iou(masks["Mass"], b.to_mask(224, 224)) > 0.93
    assert _iou(masks["Mass"], bright) > 0.93
    # and back: the indicator of the input-space box lands on the original box
    back = pre.to_original(b.to_mask(224, 224).astype(np.float32), h, w)
    assert isinstance(back, np.ndarray) and back.shape == (h, w)
    assert _iou(back > 0.5, box.to_mask(h, w)) > 0.95
    (ob,) = pre.boxes_to_original([b], h, w)
    np.testing.assert_allclose([ob.x, ob.y, ob.w, ob.h], [box.x, box.y, box.w, box.h], atol=1e-6)


def test_xrv_crop_clips_and_drops_boxes():
    pre = get_preprocessing("xrv", size=100)
    h, w = 200, 400  # crop = columns 100..300, scale 0.5
    inside = Box("Nodule", 150, 20, 40, 40)
    partly = Box("Mass", 50, 10, 100, 20)  # x 50..150 -> clipped to 100..150
    outside = Box("Effusion", 320, 10, 50, 50)
    with pytest.warns(UserWarning, match="outside the center crop"):
        out = pre.boxes_to_input([inside, partly, outside], h, w)
    assert [b.finding for b in out] == ["Nodule", "Mass"]
    assert (out[0].x, out[0].y, out[0].w, out[0].h) == (25.0, 10.0, 20.0, 20.0)
    assert (out[1].x, out[1].w) == (0.0, 25.0)
    back = pre.to_original(torch.ones(7, 7), h, w)
    assert isinstance(back, torch.Tensor) and back.shape == (h, w)
    assert back[:, 100:300].min() == 1.0 and back[:, :100].abs().max() == 0.0


def test_to_original_keeps_leading_dims():
    pre = get_preprocessing("gray")
    m = torch.rand(2, 3, 224, 224)
    out = pre.to_original(m, 100, 120)
    assert out.shape == (2, 3, 100, 120)
    assert torch.allclose(pre.to_original(m[1, 2], 100, 120), out[1, 2])


def test_mask_shape_mismatch_and_unknown_preprocessing():
    pre = get_preprocessing("gray")
    with pytest.raises(DataError):
        pre(XRay(np.zeros((10, 10), np.float32), 8, Path("a.png")), masks=np.zeros((9, 10), bool))
    with pytest.raises(CxrExplainError) as e:
        get_preprocessing("imagenet_rgb")
    assert "did you mean 'imagenet-rgb'" in one_line(e)
