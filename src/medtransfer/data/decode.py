"""Image decoding: JPEG/PNG/BMP/TIFF/DICOM file -> uint8 array of a fixed square size.

Used by the image cache (decode once per file) and by predict, explain and serve on new
images, so that every image meets the model through exactly the same pixels.

0. Formats: JPEG, PNG, BMP, TIFF (through Pillow, restricted to those plugins) and DICOM
   (recognised by content, not suffix; :mod:`medtransfer.data.dicom`). Anything else (GIF,
   EPS, WebP, PDF, ...) is refused with a message listing :data:`ACCEPTED_FORMATS`.
   Before any pixel is decoded, the header's width x height is checked against the pixel
   limit of :mod:`medtransfer.data.limits` (``max_pixels``, else ``$MEDTRANSFER_MAX_PIXELS``,
   else 50 megapixels); Pillow's own bomb warning and error give way to that check.
   Multi-frame files (DICOM, TIFF) give their first frame; for DICOM a warning says so.
1. JPEGs are decoded at reduced size by libjpeg's DCT scaling (``Image.draft``): the
   largest power-of-two reduction (up to 1/8) that keeps both sides >= ``size``.
2. EXIF orientation is applied.
3. Transparency (RGBA, LA, PA, or a palette/colour-key ``transparency``) is composited onto
   black: in a radiograph black is air, no signal; white would paint transparent regions as
   the densest tissue and add a bright border that a model can learn as a shortcut.
4. Mode: grayscale sources ("1", "L", "LA") stay single-channel. 16-bit and 32-bit
   sources ("I;16", "I", "F") are stretched to 8 bits by their own min-max range.
   Colour sources ("RGB", "RGBA", "P", "CMYK", ...) become RGB, and then single-channel
   when the three channels agree to within ``GRAY_TOLERANCE`` (many X-rays are stored as
   RGB with identical channels), or always when ``keep_color=False``.
5. The image is resized to ``size x size`` **without keeping the aspect ratio** (the
   image is stretched, nothing is cropped or padded) with an antialiasing filter.

Result: uint8 array of shape ``(size, size)`` (grayscale) or ``(size, size, 3)`` (RGB).
The image cache stores this output: a change to it needs a new
``medtransfer.data.cache.FORMAT_VERSION``.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps

from medtransfer.data.dicom import dicom_to_image, is_dicom
from medtransfer.data.limits import check_pixels, max_pixels_limit
from medtransfer.errors import ConfigError, DataError

__all__ = [
    "ACCEPTED_FORMATS",
    "GRAY_TOLERANCE",
    "RESAMPLE_FILTERS",
    "ResampleName",
    "check_size",
    "decode_bytes",
    "decode_image",
    "resample_filter",
]

LOGGER = logging.getLogger(__name__)

ACCEPTED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "DICOM")
"""The image formats medtransfer reads; every other format is refused."""

GRAY_TOLERANCE = 2
"""An RGB image whose channels differ by at most this many levels everywhere is gray."""

RESAMPLE_FILTERS: dict[str, Image.Resampling] = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}
ResampleName = Literal["lanczos", "bicubic", "bilinear", "box"]

_PIL_FORMATS = ("JPEG", "PNG", "BMP", "TIFF")  # Image.open(formats=...) tries only these plugins
_PIL_RESULTS = {*_PIL_FORMATS, "MPO"}  # Pillow's JPEG plugin names a multi-picture JPEG "MPO"
_FOREIGN_MAGIC = {  # formats worth naming in the refusal; the rest are "unrecognised"
    b"GIF8": "GIF", b"%!PS": "EPS", b"\xc5\xd0\xd3\xc6": "EPS", b"%PDF": "PDF", b"RIFF": "WebP or another RIFF",
    b"\x00\x00\x01\x00": "ICO", b"8BPS": "PSD", b"\x00\x00\x00\x0cjP": "JPEG 2000 (outside DICOM)",
}
_HIGH_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
_GRAY_MODES = {"1", "L", "LA", "La"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def decode_image(
    source: str | Path | bytes | BinaryIO,
    *,
    size: int,
    keep_color: bool = True,
    resample: ResampleName = "lanczos",
    max_pixels: int | None = None,
) -> np.ndarray:
    """Decode one image (see the module docstring).

    Args:
        source: a file path, the file's bytes, or a binary file object.
        size: output side length; the image is stretched to ``size x size``.
        keep_color: ``False`` makes every image single-channel.
        resample: resize filter, one of :data:`RESAMPLE_FILTERS`.
        max_pixels: largest width x height decoded; ``None``: ``$MEDTRANSFER_MAX_PIXELS``
            or :data:`medtransfer.data.limits.DEFAULT_MAX_PIXELS`.

    Returns:
        uint8 array, ``(size, size)`` for grayscale or ``(size, size, 3)`` for colour.

    Raises:
        ConfigError: ``size``, ``resample`` or the pixel limit is invalid.
        DataError: the file cannot be read, is not an accepted format, holds no pixel data,
            or is larger than the pixel limit
            (:class:`~medtransfer.data.limits.ImageTooLargeError`); the message names the
            file and the fix.

    Example:
        >>> import io; from PIL import Image
        >>> buf = io.BytesIO(); Image.new("L", (600, 400), 90).save(buf, "JPEG")
        >>> decode_image(buf.getvalue(), size=64).shape
        (64, 64)
    """
    check_size(size)
    resample_filter(resample)
    max_pixels_limit(max_pixels)
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
        return decode_bytes(data, size=size, keep_color=keep_color, resample=resample, max_pixels=max_pixels, name=name)
    except DataError as exc:
        raise type(exc)(
            f"{name}: {exc}; fix or remove the file, or use --skip-bad-images to leave it out."
        ) from exc.__cause__


def decode_bytes(
    data: bytes,
    *,
    size: int,
    keep_color: bool = True,
    resample: ResampleName = "lanczos",
    max_pixels: int | None = None,
    name: str = "<image bytes>",
) -> np.ndarray:
    """:func:`decode_image` on a file's bytes; ``name`` only labels the multi-frame warning.

    Raises:
        ConfigError: ``size``, ``resample`` or the pixel limit is invalid.
        DataError: without a file name, so that callers can name the file in their own
            message (the cache lists many): ``"not a readable image (<reason>)"`` for
            unreadable or refused formats, ``"image too large (...)"``
            (:class:`~medtransfer.data.limits.ImageTooLargeError`), or ``"DICOM file
            without pixel data ..."``.
    """
    check_size(size)
    filt = resample_filter(resample)
    limit = max_pixels_limit(max_pixels)
    try:
        im = _open(data, size=size, keep_color=keep_color, limit=limit, name=name)
        im = _to_8bit_mode(_flatten_alpha(im), keep_color=keep_color)
        if im.size != (size, size):
            im = im.resize((size, size), filt, reducing_gap=3.0)
        return np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # PIL and pydicom raise many types (OSError, SyntaxError, ValueError, ...)
        raise DataError(f"not a readable image ({_describe(exc)})") from exc


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


def _open(data: bytes, *, size: int, keep_color: bool, limit: int, name: str) -> Image.Image:
    """The decoded, upright image, checked against the pixel limit before decoding."""
    if is_dicom(data):
        im, frames = dicom_to_image(data, max_pixels=limit)
        if frames > 1:
            LOGGER.warning("%s: multi-frame DICOM (%d frames); only the first frame is used.", name, frames)
        return im
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
        except Image.UnidentifiedImageError:
            raise DataError(f"not a readable image ({_unaccepted(data)})") from None
        except Image.DecompressionBombError:  # Pillow's fixed limit; ours (maybe higher) decides
            im = _open_unchecked(data)
        if im.format not in _PIL_RESULTS:
            raise DataError(f"not a readable image ({_unaccepted(data, im.format)})")
        check_pixels(*im.size, limit=limit)
        if im.format in ("JPEG", "MPO"):
            # DCT-domain downscaling; "L" also makes libjpeg skip colour conversion.
            want = "RGB" if keep_color and im.mode not in _GRAY_MODES else "L"
            im.draft(want, (size, size))
        im.load()
    return ImageOps.exif_transpose(im)


def _open_unchecked(data: bytes) -> Image.Image:
    """Open through the matching plugin directly, which skips Pillow's decompression-bomb
    check (our own pixel limit is checked next, before anything is decoded)."""
    for fmt in _PIL_FORMATS:
        factory, accept = Image.OPEN[fmt]
        if accept is None or accept(data[:16]):
            return factory(io.BytesIO(data), "")  # no file name, as Image.open passes for a stream
    raise DataError(f"not a readable image ({_unaccepted(data)})")


def _unaccepted(data: bytes, found: str | None = None) -> str:
    """Why a file is refused: its format when recognisable, and the accepted ones."""
    found = found or next((fmt for magic, fmt in _FOREIGN_MAGIC.items() if data.startswith(magic)), None)
    accepted = ", ".join(ACCEPTED_FORMATS[:-1]) + " or " + ACCEPTED_FORMATS[-1]
    what = f"{found} files are not accepted" if found else "unrecognised format"
    return f"{what}; medtransfer reads {accepted}"


def _flatten_alpha(im: Image.Image) -> Image.Image:
    """Composite transparency onto black (module docstring, step 3); other images unchanged."""
    keyed = "transparency" in im.info and im.mode in {"1", "L", "P", "RGB"}
    if im.mode not in _ALPHA_MODES and not keyed:
        return im
    rgba = im.convert("RGBA")  # also applies a palette's or colour key's transparency
    flat = Image.new("RGB", im.size, 0)
    flat.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return flat


def _to_8bit_mode(im: Image.Image, *, keep_color: bool) -> Image.Image:
    """Return an "L" or "RGB" image (see module docstring, step 4)."""
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
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
    text = " ".join(text.split())  # one line: pydicom lists each plugin's failure on its own line
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
