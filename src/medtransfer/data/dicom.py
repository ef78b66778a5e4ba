"""DICOM files as PACS exports them -> an 8-bit PIL image ("L" or "RGB") of the first frame.

Read:

- Part 10 files (128-byte preamble and ``DICM``) and files without preamble or file meta,
  recognised by their first element (see :func:`is_dicom`). A file without a transfer
  syntax gets the encoding pydicom detected while reading it (native pixel data only).
- Every transfer syntax pydicom decodes with its maintained plugins: native little and big
  endian, deflated, RLE; JPEG baseline, 12-bit extended and lossless (pylibjpeg-libjpeg),
  JPEG-LS (pyjpegls), JPEG 2000 (pylibjpeg-openjpeg).
- Multi-frame files: only the first frame is decoded; :func:`dicom_to_image` returns the
  frame count so that the caller can say so.
- Colour: pydicom converts YBR to RGB; PALETTE COLOR goes through the file's colour LUT;
  samples deeper than 8 bits are scaled by BitsStored (not wrapped modulo 256).
- Grayscale: modality LUT, then the file's VOI window, MONOCHROME1 inverted.

Decompression bombs: the header's Rows x Columns is checked against the pixel limit
(:mod:`medtransfer.data.limits`) before any pixel is decoded, and Rows x Columns x frames
x samples x bytes per sample (all the pixel data) against the byte cap derived from it.
The transfer syntax comes from the file meta as pydicom's own reader parses it (never
from a byte search), so a file pydicom will inflate is always seen as deflated. Deflated
files are inflated in bounded steps (``zlib.decompressobj`` with ``max_length``) before
pydicom inflates them, and refused when they grow beyond what the header declares or
past the byte cap. A compressed frame must not be larger than the header says: its
codestream's own size (JPEG SOF, JPEG 2000 SIZ), by which decoders allocate, is read
first (a codestream whose size cannot be read is refused), and RLE segments are measured
before pydicom expands them.

pydicom's warnings about malformed values it works around are silenced: a file either
decodes or fails with one :class:`~medtransfer.errors.DataError`.

:func:`read_dicom_header` reads only the tags that group and filter images (PatientID,
ViewPosition), never the pixel data; a deflated file is inflated by at most one step for it.
"""

from __future__ import annotations

import io
import itertools
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medtransfer.data.limits import check_expanded_bytes, check_pixels, expanded_past_cap, max_expanded_bytes
from medtransfer.errors import DataError, missing_extra

__all__ = ["DicomHeader", "dicom_to_image", "is_dicom", "read_dicom_header"]

_FIRST_GROUPS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")  # (0002,xxxx) or (0008,xxxx), LE or BE
_DEFLATED = "1.2.840.10008.1.2.1.99"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # F7: JPEG-LS
_STEP = 1 << 20  # bytes inflated at a time; the first step holds the header
_HEADER_TAGS = (0x00100020, 0x00185101)  # PatientID, ViewPosition
_HEAD = 8192  # bytes read to recognise a DICOM file
_PIXEL_TAGS = {  # (7FE0,0008/0009/0010) as little- and big-endian bytes: where a complete header ends
    *(struct.pack("<HH", 0x7FE0, e) for e in (8, 9, 0x10)), *(struct.pack(">HH", 0x7FE0, e) for e in (8, 9, 0x10))
}


class _Truncated(Exception):
    """The header read ran into the end of the file."""


@dataclass(frozen=True)
class DicomHeader:
    """The header values that group and filter images; blank values are None.

    ``patient_id`` is the clear PatientID: hash it (``data.patients.dicom_patient_id``) before
    it goes anywhere; it is left out of ``repr`` so that logging the header does not show it.
    """

    patient_id: str | None = field(repr=False)
    view_position: str | None


def read_dicom_header(path: str | os.PathLike[str]) -> DicomHeader:
    """PatientID and ViewPosition of a DICOM file, read without its pixel data.

    Raises:
        DataError: the file cannot be read, is not DICOM, its header is corrupt, or the file
            ends before its pixel data (truncated: pydicom would silently shorten the last
            value read). The message names the file, never the PatientID.
    """
    path = Path(path)
    try:
        import pydicom  # noqa: F401  (a clear message when missing)
    except ImportError:
        raise missing_extra("reading DICOM headers", "dicom") from None
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEAD)
    except OSError as exc:
        raise DataError(
            f"DICOM file {path}: cannot be read ({exc.strerror or exc}); check the path and its permissions"
        ) from None
    if not is_dicom(head):
        raise DataError(
            f"DICOM file {path}: not DICOM content (no 'DICM' marker, no DICOM first element); leave it out"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every value it works around
        try:
            with open(path, "rb") as handle:
                deflated = _file_meta(handle)[0] == _DEFLATED
            dataset = _deflated_header(path) if deflated else _plain_header(path)
            values = [dataset.get(tag) for tag in _HEADER_TAGS]
            patient, view = (None if v is None else str(v.value).strip() or None for v in values)
        except _Truncated:
            raise DataError(
                f"DICOM file {path}: the header ends before the pixel data (a truncated file, or not an image); "
                "re-export it or leave it out"
            ) from None
        except Exception as exc:  # pydicom raises many types for a corrupt header
            raise DataError(
                f"DICOM file {path}: unreadable header ({type(exc).__name__}); the file is corrupt or "
                "truncated: re-export it or leave it out"
            ) from None
    return DicomHeader(patient_id=patient, view_position=view)


def _plain_header(path: Path):
    """The header tags; the read must stop at the pixel data, not at the end of the file."""
    from pydicom import dcmread

    with open(path, "rb") as handle:
        dataset = dcmread(handle, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS), force=True)
        if handle.read(4) not in _PIXEL_TAGS:  # pydicom reads a truncated value as a shorter one, silently
            raise _Truncated
    return dataset


def _deflated_header(path: Path):
    """The header tags of a deflated file from its first inflated step (pydicom would inflate all)."""
    from pydicom.filereader import read_dataset

    data = path.read_bytes()
    start = _file_meta(io.BytesIO(data))[1]
    head = b""
    for piece in _inflated(memoryview(data)[start:]):
        head += piece
        if len(head) >= _STEP:
            break
    stream = io.BytesIO(head)
    dataset = read_dataset(stream, is_implicit_VR=False, is_little_endian=True,
                           stop_when=lambda tag, *_: tag > _HEADER_TAGS[-1], specific_tags=list(_HEADER_TAGS))
    if stream.tell() >= len(head):  # ended inside the header tags: truncated
        raise _Truncated
    return dataset


def _file_meta(stream) -> tuple[str | None, int]:
    """``(transfer syntax UID or None, offset where the dataset starts)``, read as ``dcmread(force=True)``
    reads them (pydicom's ``read_partial``): its own preamble, file-meta and command-set readers, so
    that what is checked here is what pydicom then decodes: a padded meta cannot hide the syntax,
    and a deflated dataset is inflated here from the byte pydicom inflates it from (command-set
    elements, group 0000, are read before it; bytes there could also pass for a short deflate stream).
    """
    from pydicom import filereader

    filereader.read_preamble(stream, True)
    # pydicom >= 3.0: private, but what dcmread calls; else the same reads with public functions
    read_meta = getattr(filereader, "_read_file_meta_info", None) or (lambda fp: filereader.read_dataset(
        fp, is_implicit_VR=False, is_little_endian=True, stop_when=lambda tag, *_: tag.group != 2))
    read_commands = getattr(filereader, "_read_command_set_elements", None) or (lambda fp: filereader.read_dataset(
        fp, is_implicit_VR=True, is_little_endian=True, stop_when=lambda tag, *_: tag.group != 0))
    syntax = read_meta(stream).get("TransferSyntaxUID")
    read_commands(stream)
    return (None if syntax is None else str(syntax)), stream.tell()


def is_dicom(data: bytes) -> bool:
    """True for DICOM content: 'DICM' after the 128-byte preamble, or a file that starts with
    a group 0002/0008 element followed by an explicit VR or a plausible implicit length.

    No other accepted format (JPEG, PNG, BMP, TIFF) starts with those bytes.
    """
    if len(data) > 132 and data[128:132] == b"DICM":
        return True
    if len(data) < 8 or data[:2] not in _FIRST_GROUPS:
        return False
    explicit_vr = data[4:6].isalpha() and data[4:6].isupper()
    return explicit_vr or int.from_bytes(data[4:8], "little") < len(data)


def dicom_to_image(data: bytes, *, max_pixels: int) -> tuple[Image.Image, int]:
    """The first frame as a radiologist's viewer would show it, and the file's frame count.

    Raises:
        DataError: no pixel data, compressed data without a transfer syntax, a compressed
            frame larger than the header or of a size that cannot be read, deflated data that
            inflates beyond its header, or a header over ``max_pixels`` or pixel data past
            the byte cap (:class:`~medtransfer.data.limits.ImageTooLargeError`).
        Exception: pydicom's or a plugin's own error for a corrupt file (the caller words it).
    """
    try:
        import pydicom  # noqa: F401  (a clear message when missing)
    except ImportError:
        raise missing_extra("reading DICOM images", "dicom") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every value it works around
        dataset = _read(data, max_pixels)
        if "Rows" not in dataset or "Columns" not in dataset:
            raise DataError("DICOM pixel data without Rows and Columns (a corrupt or partial file)")
        frames = max(int(dataset.get("NumberOfFrames") or 1), 1)
        check_pixels(int(dataset.Columns), int(dataset.Rows), limit=max_pixels)
        _check_pixel_bytes(dataset, frames, max_pixels)
        _check_encoded_frame(dataset, frames)
        dataset.pixel_array_options(index=0, as_rgb=True)  # decode the first frame only
        return _to_image(dataset.pixel_array, dataset), frames


def _read(data: bytes, max_pixels: int):
    """The dataset, with a transfer syntax; deflated files checked before pydicom expands them."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    syntax, start = _file_meta(io.BytesIO(data))
    if syntax == _DEFLATED:  # the same test as pydicom's before it inflates the whole dataset
        _check_deflated(data, start, max_pixels)
    dataset = dcmread(io.BytesIO(data), force=True)
    keyword = next((k for k in _PIXEL_KEYWORDS if k in dataset), None)
    if keyword is None:
        raise DataError("DICOM file without pixel data (a report, RT plan or DICOMDIR?): nothing to classify")
    if "TransferSyntaxUID" not in dataset.file_meta:
        if dataset[keyword].is_undefined_length:
            raise DataError(
                "compressed DICOM pixel data without a transfer syntax (no file meta); "
                "re-export it as a DICOM Part 10 file"
            )
        implicit, little = dataset.original_encoding
        dataset.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return dataset


def _check_deflated(data: bytes, start: int, max_pixels: int) -> None:
    """Refuse a deflated dataset (from ``start``) whose header or whose expanded size exceeds the limits.

    pydicom inflates the whole dataset in one call; a few hundred KB can expand to GB. Here
    it is inflated in steps of at most ``_STEP`` bytes, counted and dropped, and refused as
    soon as it passes what the header declares (plus slack for the other elements) or the
    byte cap, whichever is smaller: pydicom's own inflation is then bounded by that.
    """
    from pydicom.filereader import read_dataset

    chunks = _inflated(memoryview(data)[start:])
    head = b""
    for piece in chunks:  # the first step's worth of the dataset holds its header
        head += piece
        if len(head) >= _STEP:
            break
    header = read_dataset(io.BytesIO(head), is_implicit_VR=False, is_little_endian=True,
                          stop_when=lambda tag, *_: tag >= 0x7FE00008)  # stop before any pixel data
    rows, columns = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
    frames = max(int(header.get("NumberOfFrames") or 1), 1)
    check_pixels(columns, rows, limit=max_pixels, frames=frames)  # all frames are inflated
    declared = _check_pixel_bytes(header, frames, max_pixels)
    budget = min(declared + 2 * _STEP, max_expanded_bytes(max_pixels))  # header and trailing elements fit the slack
    total = 0
    for chunk in itertools.chain((head,), chunks):
        total += len(chunk)
        if total <= budget:
            continue
        if budget < declared + 2 * _STEP:
            raise expanded_past_cap("deflated DICOM inflates", limit=max_pixels)
        raise DataError(
            f"deflated DICOM expands beyond what its header declares ({columns} x {rows} pixels, "
            f"{frames} frame(s)); refused before decoding"
        )


def _check_pixel_bytes(header, frames: int, max_pixels: int) -> int:
    """Bytes all of the pixel data takes expanded (Rows x Columns x frames x samples x bytes), from
    the header; refused past the byte cap (:func:`~medtransfer.data.limits.check_expanded_bytes`)."""
    rows, columns = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
    samples, bits = max(int(header.get("SamplesPerPixel") or 1), 1), max(int(header.get("BitsAllocated") or 8), 1)
    declared = (rows * columns * frames * samples * bits + 7) // 8
    what = (f"DICOM pixel data of {frames} frame(s) of {columns} x {rows} pixels, {samples} sample(s) of "
            f"{bits} bits")
    check_expanded_bytes(declared, limit=max_pixels, what=what)
    return declared


def _inflated(body: memoryview) -> Iterator[bytes]:
    """Raw-deflate output in pieces of at most ``_STEP`` bytes (never the whole at once)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    for start in range(0, len(body), _STEP):
        pending: bytes | memoryview = body[start : start + _STEP]
        while pending:
            piece = inflater.decompress(pending, _STEP)
            pending = inflater.unconsumed_tail
            if piece:
                yield piece
        if inflater.eof:
            return
    while piece := inflater.decompress(b"", _STEP):
        yield piece


def _check_encoded_frame(dataset, frames: int) -> None:
    """Compressed first frame: what its decoder will allocate must not exceed the (checked)
    header's Rows x Columns; a larger codestream is corrupt or hostile."""
    from pydicom.encaps import generate_frames
    from pydicom.uid import RLELossless

    if "PixelData" not in dataset or not dataset["PixelData"].is_undefined_length:
        return  # native pixel data: pydicom allocates by the header
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    frame = next(generate_frames(dataset.PixelData, number_of_frames=frames), b"")
    if dataset.file_meta.TransferSyntaxUID == RLELossless:
        _check_rle(frame, rows * columns)
        return
    size = _codestream_size(frame)
    if size is None or 0 in size:
        found = "no JPEG frame header (SOF) or JPEG 2000 size marker (SIZ)" if size is None else (
            f"a codestream of {size[0]} x {size[1]} pixels")
        raise DataError(
            f"compressed frame whose size cannot be established ({found} in {len(frame)} bytes of "
            f"{dataset.file_meta.TransferSyntaxUID.name} data); refused before decoding"
        )
    width, height, components = size
    samples = max(int(dataset.get("SamplesPerPixel") or 1), 1)
    if width * height > rows * columns:
        raise DataError(
            f"compressed frame larger than its header ({width} x {height} pixels, the header says "
            f"{columns} x {rows}); refused before decoding"
        )
    if components > samples:
        raise DataError(
            f"compressed frame with more components than its header ({components}, the header says "
            f"{samples} sample(s) per pixel); refused before decoding"
        )


def _codestream_size(frame: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG / JPEG-LS frame header or a JPEG 2000 SIZ marker; None if absent."""
    if frame[:2] == b"\xff\xd8":
        pos = 2
        while pos + 9 <= len(frame) and frame[pos] == 0xFF:
            marker = frame[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker in _SOF_MARKERS:
                if pos + 10 > len(frame):
                    return None
                height, width, components = struct.unpack(">HHB", frame[pos + 5 : pos + 10])
                return width, height, components
            pos += 2 + int.from_bytes(frame[pos + 2 : pos + 4], "big")
        return None
    siz = frame.find(b"\xff\x4f\xff\x51", 0, 1 << 16)  # SOC then SIZ, bare or inside a JP2 box
    if siz < 0 or len(frame) < siz + 42:
        return None
    x, y, x0, y0 = struct.unpack(">4I", frame[siz + 8 : siz + 24])
    (components,) = struct.unpack(">H", frame[siz + 40 : siz + 42])
    return max(x - x0, 0), max(y - y0, 0), components


def _check_rle(frame: bytes, plane: int) -> None:
    """Every RLE segment must expand to about one plane (Rows x Columns bytes), not more."""
    count = int.from_bytes(frame[:4], "little")
    offsets = [*struct.unpack("<15I", frame[4:64])[: min(count, 15)], len(frame)]
    for start, end in zip(offsets, offsets[1:]):
        cap, out, pos = plane + 1024, 0, start  # slack for encoders' padding
        while pos < end and out <= cap:
            n = frame[pos]
            if n < 128:
                out, pos = out + n + 1, pos + n + 2  # literal run of n + 1 bytes
            else:
                out, pos = out + (257 - n if n > 128 else 0), pos + (2 if n > 128 else 1)  # replicate run
        if out > cap:
            raise DataError(f"RLE segment expands beyond the {plane} bytes its header declares; refused before decoding")


def _to_image(pixels: np.ndarray, dataset) -> Image.Image:
    """RGB or windowed grayscale 8-bit image (see the module docstring)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, dataset)
        return Image.fromarray(_rgb_to_8bit(rgb, bits=8 * rgb.dtype.itemsize), mode="RGB")
    if pixels.ndim == 3:  # RGB samples (pydicom has converted YBR to RGB)
        return Image.fromarray(_rgb_to_8bit(pixels, bits=int(dataset.get("BitsStored") or 8)), mode="RGB")
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    if "VOILUTSequence" in dataset or "WindowCenter" in dataset:
        values = apply_voi_lut(values, dataset).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    return Image.fromarray(np.rint(scaled * 255.0).astype(np.uint8), mode="L")


def _rgb_to_8bit(rgb: np.ndarray, *, bits: int) -> np.ndarray:
    """Scale samples of ``bits`` bits to 0..255 (signed data: by its own range)."""
    if rgb.dtype == np.uint8:
        return rgb
    values = rgb.astype(np.float32)
    if np.issubdtype(rgb.dtype, np.signedinteger):
        low, high = float(values.min()), float(values.max())
        values -= low
        values *= 255.0 / (high - low) if high > low else 0.0
    else:
        values *= 255.0 / float(2 ** min(max(bits, 1), 32) - 1)
    return np.rint(np.clip(values, 0.0, 255.0, out=values), out=values).astype(np.uint8)
