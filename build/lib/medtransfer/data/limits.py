"""The one pixel limit every image decoder obeys (train and its cache, predict, explain, serve).

A few hundred kilobytes of PNG, or of deflated DICOM, can declare 13000 x 13000 16-bit
pixels and take gigabytes and many seconds to decode. Every decoder therefore reads the
dimensions from the file's header and calls :func:`check_pixels` **before** decoding.

The limit counts width x height of the one frame that is decoded (like Pillow's own guard,
colour channels are not counted). Default: :data:`DEFAULT_MAX_PIXELS` = 50 megapixels,
e.g. 7000 x 7000: about twice the largest mammography detectors (4728 x 5928 = 28 MP)
and five times a large chest radiograph (3000 x 3000); one decode at this size needs
about 1 GB of memory. Precedence: a ``max_pixels`` argument, else the environment variable
:data:`MAX_PIXELS_ENV`, else the default (see :func:`max_pixels_limit`).

Bytes follow from the same limit: whatever a file expands to before or while it is decoded
(a deflated DICOM dataset, all frames of a multi-frame or encapsulated DICOM's pixel data)
may take at most :func:`max_expanded_bytes` = limit x :data:`EXPANDED_BYTES_PER_PIXEL`
(286 MiB at the default), checked with :func:`check_expanded_bytes` before allocation.
"""

from __future__ import annotations

import os

from medtransfer.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "EXPANDED_BYTES_PER_PIXEL",
    "MAX_PIXELS_ENV",
    "ImageTooLargeError",
    "check_expanded_bytes",
    "check_pixels",
    "expanded_past_cap",
    "format_bytes",
    "max_expanded_bytes",
    "max_pixels_limit",
]

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest width x height decoded when neither ``max_pixels`` nor the environment sets one."""

MAX_PIXELS_ENV = "MEDTRANSFER_MAX_PIXELS"
"""Environment variable that sets the pixel limit for every command and the server."""


EXPANDED_BYTES_PER_PIXEL = 6
"""Bytes per pixel of the byte cap: three 16-bit samples, the deepest image a radiology file commonly holds."""


class ImageTooLargeError(DataError):
    """An image whose header declares more pixels than the limit (refused before decoding)."""


def max_pixels_limit(max_pixels: int | None = None) -> int:
    """The pixel limit in force: ``max_pixels`` if given, else ``$MEDTRANSFER_MAX_PIXELS``, else the default.

    Raises:
        ConfigError: the value is not a positive integer (the message names its source).

    Example:
        >>> max_pixels_limit(1000)
        1000
    """
    if max_pixels is not None:
        return _positive(max_pixels, "max_pixels")
    text = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(text)) if "e" in text.lower() else int(text)  # accepts 60000000 and 6e7
    except ValueError:
        raise ConfigError(f"{MAX_PIXELS_ENV}={text!r}: expected a positive number of pixels, e.g. 60000000.") from None
    return _positive(value, MAX_PIXELS_ENV)


def check_pixels(width: int, height: int, *, limit: int, frames: int = 1) -> None:
    """Raise :class:`ImageTooLargeError` when ``width x height`` (x ``frames``) exceeds ``limit``.

    ``frames`` counts frames that must all be expanded to reach the first one (deflated DICOM).
    """
    pixels = int(width) * int(height) * max(int(frames), 1)
    if pixels <= limit:
        return
    shape = f"{width} x {height}" + (f" x {frames} frames" if frames > 1 else "")
    raise ImageTooLargeError(
        f"image too large ({shape} = {pixels / 1e6:.1f} megapixels, over the limit of {limit / 1e6:g} "
        f"megapixels, checked before decoding; if the file is genuine, raise the limit with "
        f"{MAX_PIXELS_ENV}={pixels})"
    )


def max_expanded_bytes(limit: int) -> int:
    """The byte cap that goes with the pixel limit ``limit``: ``limit x EXPANDED_BYTES_PER_PIXEL``.

    Example:
        >>> max_expanded_bytes(50_000_000) // 2**20
        286
    """
    return int(limit) * EXPANDED_BYTES_PER_PIXEL


def check_expanded_bytes(nbytes: int, *, limit: int, what: str) -> None:
    """Raise :class:`ImageTooLargeError` when ``nbytes`` (what ``what`` expands to) exceeds the byte cap.

    The message is one line: ``"<what> = <size>, past the <cap> cap ..."`` and the setting that raises it.
    """
    cap = max_expanded_bytes(limit)
    if nbytes <= cap:
        return
    needed = -(-int(nbytes) // EXPANDED_BYTES_PER_PIXEL)
    raise ImageTooLargeError(
        f"{what} = {format_bytes(nbytes)}, past the {format_bytes(cap)} {_cap_text(limit, needed)}"
    )


def expanded_past_cap(what: str, *, limit: int) -> ImageTooLargeError:
    """The refusal for data found expanding past the byte cap while it is expanded in bounded steps."""
    cap = max_expanded_bytes(limit)
    return ImageTooLargeError(f"{what} past {format_bytes(cap)}, the {_cap_text(limit)}")


def _cap_text(limit: int, needed: int | None = None) -> str:
    setting = MAX_PIXELS_ENV + (f"={needed}" if needed else "")
    return (
        f"cap ({limit / 1e6:g} megapixels x {EXPANDED_BYTES_PER_PIXEL} bytes), checked before decoding; "
        f"if the file is genuine, raise the limit with {setting}"
    )


def format_bytes(nbytes: int) -> str:
    """``"286 MiB"``, ``"29.3 KiB"``, ``"512 bytes"``: a size for a message."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            value = nbytes / size
            return f"{value:.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"
    return f"{nbytes} bytes"


def _positive(value: object, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source} must be a positive number of pixels, got {value!r}.")
    return value
