"""Image decoding: JPEG/PNG/BMP/TIFF/DICOM file -> uint8 array of a fixed square size.

Used by the image cache (decode once per file) and by predict, explain and serve on new
images, so that every image meets the model through exactly the same pixels.

1. JPEGs are decoded at reduced size by libjpeg's DCT scaling (``Image.draft``): the
   largest power-of-two reduction (up to 1/8) that keeps both sides >= ``size``.
2. EXIF orientation is applied.
3. Mode: grayscale sources ("1", "L", "LA") stay single-channel. 16-bit and 32-bit
   sources ("I;16", "I", "F") are stretched to 8 bits by their own min-max range.
   Colour sources ("RGB", "RGBA", "P", "CMYK", ...) become RGB, and then single-channel
   when the three channels agree to within ``GRAY_TOLERANCE`` (many X-rays are stored as
   RGB with identical channels), or always when ``keep_color=False``.
   DICOM files (recognised by content, not suffix) go through :func:`dicom_to_image`.
4. The image is resized to ``size x size`` **without keeping the aspect ratio** (the
   image is stretched, nothing is cropped or padded) with an antialiasing filter.

Result: uint8 array of shape ``(size, size)`` (grayscale) or ``(size, size, 3)`` (RGB).

Limits: the formats are those Pillow opens (plus DICOM through pydicom); Pillow's
decompression-bomb guard stays on (its warning is silenced, its error above twice
``Image.MAX_IMAGE_PIXELS`` marks the file unreadable). The image cache stores this
output: a change to it needs a new ``medtransfer.data.cache.FORMAT_VERSION``.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps

from medtransfer.errors import ConfigError, DataError

__all__ = [
    "GRAY_TOLERANCE",
    "RESAMPLE_FILTERS",
    "ResampleName",
    "check_size",
    "decode_bytes",
    "decode_image",
    "dicom_to_image",
    "is_dicom",
    "resample_filter",
]

GRAY_TOLERANCE = 2
"""An RGB image whose channels differ by at most this many levels everywhere is gray."""

RESAMPLE_FILTERS: dict[str, Image.Resampling] = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}
ResampleName = Literal["lanczos", "bicubic", "bilinear", "box"]

_HIGH_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
_GRAY_MODES = {"1", "L", "LA", "La"}


def decode_image(
    source: str | Path | bytes | BinaryIO,
    *,
    size: int,
    keep_color: bool = True,
    resample: ResampleName = "lanczos",
) -> np.ndarray:
    """Decode one image (see the module docstring).

    Args:
        source: a file path, the file's bytes, or a binary file object.
        size: output side length; the image is stretched to ``size x size``.
        keep_color: ``False`` makes every image single-channel.
        resample: resize filter, one of :data:`RESAMPLE_FILTERS`.

    Returns:
        uint8 array, ``(size, size)`` for grayscale or ``(size, size, 3)`` for colour.

    Raises:
        ConfigError: ``size`` or ``resample`` is invalid.
        DataError: the file cannot be read or is not a decodable image; the message
            names the file and the fix.

    Example:
        >>> import io; from PIL import Image
        >>> buf = io.BytesIO(); Image.new("L", (600, 400), 90).save(buf, "JPEG")
        >>> decode_image(buf.getvalue(), size=64).shape
        (64, 64)
    """
    check_size(size)
    resample_filter(resample)
    name = str(source) if isinstance(source, (str, Path)) else "<image bytes>"
    if isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise DataError(f"{name}: cannot read file ({exc.strerror or exc}).") from exc
    elif isinstance(source, bytes):
        data = source
    else:
        data = source.read()
    try:
        return decode_bytes(data, size=size, keep_color=keep_color, resample=resample)
    except DataError as exc:
        raise DataError(
            f"{name}: {exc}; fix or remove the file, or use --skip-bad-images to leave it out."
        ) from exc.__cause__


def decode_bytes(
    data: bytes, *, size: int, keep_color: bool = True, resample: ResampleName = "lanczos"
) -> np.ndarray:
    """:func:`decode_image` on a file's bytes.

    Raises:
        ConfigError: ``size`` or ``resample`` is invalid.
        DataError: ``"not a readable image (<reason>)"``, without a file name, so that
            callers can name the file in their own message (the cache lists many).
    """
    check_size(size)
    filt = resample_filter(resample)
    try:
        return _decode(data, size=size, keep_color=keep_color, resample=filt)
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise DataError(f"not a readable image ({_describe(exc)})") from exc


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble."""
    return len(data) > 132 and data[128:132] == b"DICM"


def dicom_to_image(data: bytes) -> Image.Image:
    """A DICOM radiograph as an 8-bit grayscale image, as a radiologist's viewer would show it.

    Stored values are turned into modality values (RescaleSlope/Intercept), then the file's
    own window (VOI LUT or WindowCenter/Width) is applied when present, else the full range;
    MONOCHROME1 (bright = low values) is inverted so that bone is always bright.
    """
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise DataError("DICOM images need pydicom: pip install pydicom") from None
    dataset = pydicom.dcmread(io.BytesIO(data))
    pixels = dataset.pixel_array
    if pixels.ndim == 3 and getattr(dataset, "SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: the first frame
    if getattr(dataset, "SamplesPerPixel", 1) == 3:
        return Image.fromarray(pixels.astype(np.uint8), mode="RGB")
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    if "VOILUTSequence" in dataset or "WindowCenter" in dataset:
        values = apply_voi_lut(values, dataset).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if getattr(dataset, "PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        scaled = 1.0 - scaled
    return Image.fromarray(np.rint(scaled * 255.0).astype(np.uint8), mode="L")


def check_size(size: int) -> None:
    """Raise ConfigError unless ``size`` is a positive integer."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"Image cache size must be a positive integer, got {size!r}.")


def resample_filter(name: str) -> Image.Resampling:
    """The Pillow filter for ``name``; ConfigError listing the choices otherwise."""
    try:
        return RESAMPLE_FILTERS[name]
    except KeyError:
        choices = ", ".join(RESAMPLE_FILTERS)
        raise ConfigError(f"Unknown resample filter {name!r}; choose one of: {choices}.") from None


def _decode(data: bytes, *, size: int, keep_color: bool, resample: Image.Resampling) -> np.ndarray:
    if is_dicom(data):
        im = dicom_to_image(data)
        im = _to_8bit_mode(im, keep_color=keep_color)
        return np.asarray(im.resize((size, size), resample, reducing_gap=3.0), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
        if im.format == "JPEG":
            # DCT-domain downscaling; "L" also makes libjpeg skip colour conversion.
            want = "RGB" if keep_color and im.mode not in _GRAY_MODES else "L"
            im.draft(want, (size, size))
        im.load()
    im = ImageOps.exif_transpose(im)
    im = _to_8bit_mode(im, keep_color=keep_color)
    if im.size != (size, size):
        im = im.resize((size, size), resample, reducing_gap=3.0)
    return np.asarray(im, dtype=np.uint8)


def _to_8bit_mode(im: Image.Image, *, keep_color: bool) -> Image.Image:
    """Return an "L" or "RGB" image (see module docstring, step 3)."""
    if im.mode in _GRAY_MODES:
        return im if im.mode == "L" else im.convert("L")
    if im.mode in _HIGH_DEPTH_MODES:
        arr = np.asarray(im).astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    if not keep_color or _channels_equal(rgb):
        return rgb.convert("L")
    return rgb


def _channels_equal(rgb: Image.Image) -> bool:
    """True when R, G and B agree to within GRAY_TOLERANCE at every pixel."""
    arr = np.asarray(rgb)
    r = arr[..., 0].astype(np.int16)
    return bool(
        np.abs(r - arr[..., 1]).max() <= GRAY_TOLERANCE
        and np.abs(r - arr[..., 2]).max() <= GRAY_TOLERANCE
    )


def _describe(exc: BaseException) -> str:
    # PIL names an in-memory buffer ("<_io.BytesIO object at 0x...>"), which means nothing to the user.
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
