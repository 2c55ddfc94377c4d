"""Read chest X-rays (PNG, JPEG, DICOM) into one float array, and the per-checkpoint preprocessing.

Every reader returns an :class:`XRay`: one channel, float32, values in the file's own range
``[0, 2**bits - 1]`` (0..255 for 8-bit, 0..65535 for 16-bit, 0..4095 for 12-bit DICOM), where a
larger value is brighter (denser). :func:`get_preprocessing` turns that into the tensor a model
family expects and carries boxes / masks through the same crop and resize.
"""
from __future__ import annotations

import difflib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..errors import CxrExplainError, DataError
from .types import Box

__all__ = [
    "XRay",
    "read_image",
    "is_dicom",
    "find_images",
    "check_image_size",
    "MIN_IMAGE_SIZE",
    "IMAGE_EXTENSIONS",
    "Geometry",
    "Preprocessing",
    "get_preprocessing",
    "PREPROCESSING_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

PNG_EXTENSIONS = (".png",)
JPEG_EXTENSIONS = (".jpg", ".jpeg")
DICOM_EXTENSIONS = (".dcm", ".dicom")
IMAGE_EXTENSIONS = PNG_EXTENSIONS + JPEG_EXTENSIONS + DICOM_EXTENSIONS

#: The smallest image side (px) read as a radiograph: below it a file is an icon or a thumbnail,
#: not a film (every supported network also downsamples by 32, see ``models.zoo.MIN_INPUT_SIZE``).
MIN_IMAGE_SIZE = 32

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ITU-R 601-2 luma weights, the ones PIL's ``convert('L')`` uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


@dataclass
class XRay:
    """A decoded radiograph: ``pixels`` is float32 H×W in ``[0, 2**bits - 1]``, bright = dense."""

    pixels: np.ndarray
    bits: int
    path: Path

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def maxval(self) -> float:
        """The largest representable value, ``2**bits - 1``."""
        return float(2**self.bits - 1)


# --------------------------------------------------------------------------------------------
# Reading


def is_dicom(path: Union[str, Path]) -> bool:
    """True for a ``.dcm`` / ``.dicom`` name or a file with the ``DICM`` magic at byte 128."""
    p = Path(path)
    if p.suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def find_images(root: Union[str, Path]) -> list[Path]:
    """Every PNG / JPEG / DICOM file under ``root``, recursively, sorted: names with an image
    extension, and extension-less files with the DICOM preamble. Hidden files and folders
    (``.name``, e.g. macOS ``._x.png`` resource forks) are skipped."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            ext = os.path.splitext(f)[1].lower()
            if ext in IMAGE_EXTENSIONS or (not ext and is_dicom(Path(dirpath) / f)):
                found.append(Path(dirpath) / f)
    return found


def check_image_size(xray: XRay, minimum: int = MIN_IMAGE_SIZE) -> XRay:
    """``xray`` unchanged, or a DataError when a side is below ``minimum`` pixels."""
    if xray.height < minimum or xray.width < minimum:
        raise DataError(f"{xray.path}: image is {xray.width}×{xray.height} px; a chest X-ray needs at least "
                        f"{minimum} px on each side")
    return xray


def read_image(path: Union[str, Path], apply_voi: bool = True) -> XRay:
    """Read a PNG, JPEG or DICOM chest X-ray as one float32 channel in its original value range.

    Colour images are reduced to one channel: if R == G == B the first channel is taken (exact);
    otherwise the ITU-R 601-2 luma ``0.299 R + 0.587 G + 0.114 B`` (as PIL's ``convert('L')``,
    without rounding). Alpha is ignored. DICOM: see :func:`_read_dicom`.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: image file not found; check the path and the image folder")
    if not p.is_file():
        raise DataError(f"{p}: not a file; pass an image file (png, jpg, dcm)")
    if is_dicom(p):
        return _read_dicom(p, apply_voi=apply_voi)
    ext = p.suffix.lower()
    if ext in PNG_EXTENSIONS or ext in JPEG_EXTENSIONS:
        return _read_pil(p)
    raise DataError(
        f"{p}: unknown image type {ext or '(no extension)'!r}; supported: "
        f"{', '.join(IMAGE_EXTENSIONS)} (or a DICOM file with the DICM preamble)"
    )


def _read_pil(p: Path) -> XRay:
    """PNG / JPEG through Pillow; truncated or corrupt files raise DataError naming the file."""
    try:
        with Image.open(p) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
                arr = np.asarray(im).astype(np.float32)
                bits = 16
            elif mode == "I":
                arr = np.asarray(im).astype(np.float32)
                if arr.size and (arr.min() < 0 or arr.max() > 65535):
                    raise DataError(
                        f"{p}: 32-bit integer image with values outside 0..65535; "
                        "save it as 8- or 16-bit grayscale"
                    )
                bits = 16
            elif mode == "L":
                arr = np.asarray(im).astype(np.float32)
                bits = 8
            elif mode in ("1", "LA", "La"):
                arr = np.asarray(im.convert("L") if mode == "1" else im.getchannel(0)).astype(
                    np.float32
                )
                bits = 8
            elif mode in ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                rgb = np.asarray(im.convert("RGB"))
                arr = _reduce_rgb(rgb)
                bits = 8
            else:
                raise DataError(
                    f"{p}: unsupported image mode {mode!r}; save it as 8- or 16-bit grayscale PNG"
                )
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        msg = " ".join(str(e).split())
        raise DataError(f"{p}: cannot decode image ({msg}); the file is truncated or corrupt") from e
    if arr.ndim != 2:
        raise DataError(f"{p}: expected a 2-D image after decoding, got shape {arr.shape}")
    return XRay(np.ascontiguousarray(arr, dtype=np.float32), bits, p)


def _reduce_rgb(rgb: np.ndarray) -> np.ndarray:
    """H×W×3 → H×W: channel 0 when R == G == B, else the luma 0.299 R + 0.587 G + 0.114 B."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if np.array_equal(r, g) and np.array_equal(r, b):
        return r.astype(np.float32)
    return (rgb.astype(np.float64) @ _LUMA).astype(np.float32)


def _read_dicom(p: Path, apply_voi: bool = True) -> XRay:
    """DICOM → float32 in ``[0, 2**BitsStored - 1]``.

    Steps: stored values → Modality LUT / rescale (``apply_modality_lut``) → VOI LUT or window
    (``apply_voi_lut``, when present and ``apply_voi``) → the output range of those LUTs is mapped
    linearly onto ``[0, 2**bits - 1]`` (a no-op for plain unsigned data) → MONOCHROME1 is inverted
    as ``2**bits - 1 - x``. ``bits`` is BitsStored (or the VOI LUT's entry depth).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(p, force=p.suffix.lower() in DICOM_EXTENSIONS)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError) as e:
        msg = " ".join(str(e).split())
        raise DataError(f"{p}: cannot read DICOM ({msg}); the file is truncated or not DICOM") from e
    if any("End of file" in str(w.message) for w in caught):
        raise DataError(f"{p}: DICOM file is truncated (ends inside an element); copy it again")
    if "PixelData" not in ds:
        raise DataError(f"{p}: DICOM has no pixel data (no PixelData element); it is not an image")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(
            f"{p}: colour DICOM ({photometric}, SamplesPerPixel={spp}) is not supported; "
            "chest X-rays must be MONOCHROME1/MONOCHROME2 — convert it to grayscale first"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DataError(f"{p}: multi-frame DICOM ({frames} frames) is not supported; export one frame")
    try:
        stored = ds.pixel_array
    except Exception as e:  # decoders raise many types (RuntimeError, NotImplementedError, ...)
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        msg = " ".join(str(e).split())
        raise DataError(
            f"{p}: cannot decode DICOM pixel data (transfer syntax {ts}: {msg}); the file may be "
            "truncated, or the codec needs a plugin such as pylibjpeg"
        ) from e
    if stored.ndim != 2:
        raise DataError(f"{p}: expected one 2-D frame in the DICOM, got shape {stored.shape}")

    bits_stored = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 8) or 8)
    lo, hi = _modality_range(ds, bits_stored)
    arr = apply_modality_lut(stored, ds)
    bits = bits_stored
    if apply_voi and (ds.get("VOILUTSequence") or "WindowCenter" in ds and "WindowWidth" in ds):
        if ds.get("VOILUTSequence"):
            depth = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            lo, hi = 0.0, float(2**depth - 1)
            bits = depth
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = apply_voi_lut(arr, ds)
    arr = np.asarray(arr, dtype=np.float64)
    top = float(2**bits - 1)
    if (lo, hi) != (0.0, top):
        if hi <= lo:
            raise DataError(f"{p}: DICOM rescale/LUT gives an empty value range [{lo}, {hi}]")
        arr = (arr - lo) / (hi - lo) * top
    arr = np.clip(arr, 0.0, top)
    if photometric == "MONOCHROME1":
        arr = top - arr
    return XRay(np.ascontiguousarray(arr, dtype=np.float32), bits, p)


def _modality_range(ds, bits_stored: int) -> tuple[float, float]:
    """The value range after the Modality LUT / rescale, as pydicom's windowing assumes it."""
    if ds.get("ModalityLUTSequence"):
        depth = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**depth - 1)
    if int(ds.get("PixelRepresentation", 0) or 0) == 0:
        lo, hi = 0.0, float(2**bits_stored - 1)
    else:
        lo, hi = float(-(2 ** (bits_stored - 1))), float(2 ** (bits_stored - 1) - 1)
    slope = ds.get("RescaleSlope", None)
    intercept = ds.get("RescaleIntercept", None)
    if slope is not None and intercept is not None:
        a, b = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
        lo, hi = min(a, b), max(a, b)
    return lo, hi


# --------------------------------------------------------------------------------------------
# Preprocessing


@dataclass(frozen=True)
class Geometry:
    """Where the model input comes from: crop ``[y0, y0+crop_h) × [x0, x0+crop_w)`` of the
    original image, resized to ``size × size``. Original → input: ``u = (x - x0) * size / crop_w``."""

    height: int
    width: int
    x0: int
    y0: int
    crop_w: int
    crop_h: int
    size: int

    @property
    def sx(self) -> float:
        return self.size / self.crop_w

    @property
    def sy(self) -> float:
        return self.size / self.crop_h


MaskInput = Union[None, np.ndarray, torch.Tensor, dict]


@dataclass(frozen=True)
class Preprocessing:
    """A named input pipeline: optional center crop to square, bilinear resize to ``size``,
    intensity map, channel repeat.

    Intensity (``x`` in ``[0, 2**bits-1]``, ``m = 2**bits - 1``):
    ``"imagenet"``: ``(x/m - mean_c) / std_c``; ``"xrv"``: ``(2 x/m - 1) * 1024``; ``"unit"``: ``x/m``.
    Resizing is ``torch.nn.functional.interpolate(bilinear, align_corners=False, antialias=True)``
    (PIL-style bilinear); masks use ``nearest-exact`` on the same grid, boxes the same affine map.
    """

    name: str
    size: int = 224
    channels: int = 3
    center_crop: bool = False
    intensity: str = "imagenet"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    # -- geometry ----------------------------------------------------------------------------
    def geometry(self, height: int, width: int) -> Geometry:
        """The crop and scale for an image of ``height × width`` (xrv's center-crop offsets)."""
        if self.center_crop:
            c = min(height, width)
            x0, y0 = width // 2 - c // 2, height // 2 - c // 2
            return Geometry(height, width, x0, y0, c, c, self.size)
        return Geometry(height, width, 0, 0, width, height, self.size)

    # -- forward -----------------------------------------------------------------------------
    def __call__(
        self, xray: XRay, boxes: Iterable[Box] = (), masks: MaskInput = None
    ) -> tuple[torch.Tensor, list[Box], MaskInput]:
        """Return ``(tensor C×S×S float32, boxes in input space, masks S×S bool)``."""
        g = self.geometry(xray.height, xray.width)
        img = torch.from_numpy(np.ascontiguousarray(xray.pixels, dtype=np.float32))
        img = img[g.y0 : g.y0 + g.crop_h, g.x0 : g.x0 + g.crop_w]
        img = _resize(img[None, None], self.size, "bilinear")[0, 0]
        x = self._intensity(img, xray.maxval)
        out_boxes = self.boxes_to_input(boxes, xray.height, xray.width)
        out_masks = self.masks_to_input(masks, xray.height, xray.width)
        return x.contiguous(), out_boxes, out_masks

    def _intensity(self, img: torch.Tensor, maxval: float) -> torch.Tensor:
        unit = img / float(maxval)
        if self.intensity == "xrv":
            x = (2.0 * unit - 1.0) * 1024.0
            return x.unsqueeze(0).repeat(self.channels, 1, 1)
        if self.intensity == "unit":
            return unit.unsqueeze(0).repeat(self.channels, 1, 1)
        if self.intensity == "imagenet":
            mean = torch.tensor(self.mean[: self.channels], dtype=torch.float32)[:, None, None]
            std = torch.tensor(self.std[: self.channels], dtype=torch.float32)[:, None, None]
            return (unit.unsqueeze(0).repeat(self.channels, 1, 1) - mean) / std
        raise CxrExplainError(f"preprocessing {self.name!r}: unknown intensity map {self.intensity!r}")

    # -- boxes -------------------------------------------------------------------------------
    def boxes_to_input(self, boxes: Iterable[Box], height: int, width: int) -> list[Box]:
        """Original-pixel boxes → input-space boxes: shift by the crop, scale by ``size/crop``,
        clip to the input. A box wholly outside the crop is dropped with a warning."""
        g = self.geometry(height, width)
        out: list[Box] = []
        dropped = []
        for b in boxes:
            x1 = min(max(b.x - g.x0, 0.0), g.crop_w)
            y1 = min(max(b.y - g.y0, 0.0), g.crop_h)
            x2 = min(max(b.x + b.w - g.x0, 0.0), g.crop_w)
            y2 = min(max(b.y + b.h - g.y0, 0.0), g.crop_h)
            if x2 <= x1 or y2 <= y1:
                dropped.append(b.finding)
                continue
            out.append(Box(b.finding, x1 * g.sx, y1 * g.sy, (x2 - x1) * g.sx, (y2 - y1) * g.sy))
        if dropped:
            warnings.warn(
                f"preprocessing {self.name!r}: {len(dropped)} box(es) lie outside the center crop "
                f"and were dropped ({', '.join(dropped)})",
                stacklevel=2,
            )
        return out

    def boxes_to_original(self, boxes: Iterable[Box], height: int, width: int) -> list[Box]:
        """Input-space boxes → original pixels: ``x = u * crop_w / size + x0`` (inverse map)."""
        g = self.geometry(height, width)
        return [
            Box(b.finding, b.x / g.sx + g.x0, b.y / g.sy + g.y0, b.w / g.sx, b.h / g.sy) for b in boxes
        ]

    # -- masks -------------------------------------------------------------------------------
    def masks_to_input(self, masks: MaskInput, height: int, width: int) -> MaskInput:
        """Crop and resize masks (H×W, or a dict of them) to S×S bool with ``nearest-exact``."""
        if masks is None:
            return None
        if isinstance(masks, dict):
            return {k: self.masks_to_input(v, height, width) for k, v in masks.items()}
        g = self.geometry(height, width)
        is_tensor = isinstance(masks, torch.Tensor)
        m = masks if is_tensor else torch.from_numpy(np.asarray(masks))
        if tuple(m.shape[-2:]) != (height, width):
            raise DataError(
                f"preprocessing {self.name!r}: mask of shape {tuple(m.shape)} does not match "
                f"the image ({height}×{width})"
            )
        m = m[..., g.y0 : g.y0 + g.crop_h, g.x0 : g.x0 + g.crop_w].to(torch.float32)
        lead = m.shape[:-2]
        m = m.reshape(1, -1, g.crop_h, g.crop_w)
        r = F.interpolate(m, size=(self.size, self.size), mode="nearest-exact")
        r = r.reshape(*lead, self.size, self.size) > 0.5
        return r if is_tensor else r.numpy()

    # -- maps back ---------------------------------------------------------------------------
    def to_original(
        self, map2d: Union[np.ndarray, torch.Tensor], height: int, width: int
    ) -> Union[np.ndarray, torch.Tensor]:
        """Resize a map over the model input (any ``h×w``, e.g. 224×224 or a 7×7 CAM; leading
        dims allowed) bilinearly onto the crop region of the ``height × width`` original; pixels
        outside the crop (xrv on non-square images) are 0. Returns the input's type, float32."""
        g = self.geometry(height, width)
        is_tensor = isinstance(map2d, torch.Tensor)
        t = map2d if is_tensor else torch.from_numpy(np.asarray(map2d))
        t = t.to(torch.float32)
        if t.ndim < 2:
            raise CxrExplainError(f"to_original: expected a map with 2 or more dims, got {tuple(t.shape)}")
        lead = t.shape[:-2]
        flat = t.reshape(1, -1, t.shape[-2], t.shape[-1])
        r = F.interpolate(flat, size=(g.crop_h, g.crop_w), mode="bilinear", align_corners=False)
        r = r.reshape(*lead, g.crop_h, g.crop_w)
        if (g.crop_h, g.crop_w) != (height, width):
            full = r.new_zeros(*lead, height, width)
            full[..., g.y0 : g.y0 + g.crop_h, g.x0 : g.x0 + g.crop_w] = r
            r = full
        return r if is_tensor else r.numpy()


def _resize(t: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """N×C×h×w → N×C×size×size, bilinear with antialiasing when shrinking (PIL-like)."""
    if t.shape[-2:] == (size, size):
        return t
    return F.interpolate(t, size=(size, size), mode=mode, align_corners=False, antialias=True)


def _make(name: str, size: int) -> Preprocessing:
    if name == "imagenet-rgb":
        return Preprocessing(name, size, channels=3, center_crop=False, intensity="imagenet")
    if name == "xrv":
        return Preprocessing(name, size, channels=1, center_crop=True, intensity="xrv")
    if name == "gray":
        return Preprocessing(name, size, channels=1, center_crop=False, intensity="unit")
    raise KeyError(name)


PREPROCESSING_NAMES: tuple[str, ...] = ("imagenet-rgb", "xrv", "gray")


def get_preprocessing(name: str, size: int = 224) -> Preprocessing:
    """The named preprocessing: ``imagenet-rgb`` (CheXNet / jrzech / torchvision models: whole image
    resized to size×size, 3 channels, ImageNet mean/std), ``xrv`` (torchxrayvision: center crop,
    1 channel, ``(2x/m - 1)·1024``), ``gray`` (1 channel, ``x/m`` in [0, 1])."""
    if not isinstance(size, int) or size < 1:
        raise CxrExplainError(f"preprocessing size must be a positive integer, got {size!r}")
    try:
        return _make(name, size)
    except KeyError:
        close = difflib.get_close_matches(str(name), PREPROCESSING_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CxrExplainError(
            f"unknown preprocessing {name!r}{hint}; choose one of {', '.join(PREPROCESSING_NAMES)}"
        ) from None
