"""DICOM decoding (medtransfer.data.dicom, through decode_image): windowing, every plugin
transfer syntax, multi-frame, colour, files without preamble or meta, no pixel data, and
the bomb guards (pixel limit, deflate, codestreams larger than the header).

Files are generated with pydicom and its encoders; a few JPEG variants that pydicom cannot
encode come from the test files pydicom ships inside its package (skipped when absent).
"""

from __future__ import annotations

import io
import logging
import struct
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels import apply_color_lut, convert_color_space, get_encoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from medtransfer.data.cache import CacheSettings, ImageCache
from medtransfer.data.decode import decode_image
from medtransfer.data.dicom import is_dicom
from medtransfer.data.discover import discover
from medtransfer.data.limits import ImageTooLargeError
from medtransfer.errors import DataError

SIZE = 32


def new_dataset(path: Path | str = "x.dcm") -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = "P1", "CR"
    return ds


def image_dataset(pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None) -> FileDataset:
    """A dataset holding ``pixels``: (rows, cols[, 3]) or (frames, rows, cols[, 3])."""
    ds = new_dataset()
    ds.set_pixel_data(pixels, photometric, bits_stored or 8 * pixels.dtype.itemsize, generate_instance_uid=False)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def to_big_endian(ds: Dataset) -> Dataset:
    """Byte-swap 16-bit pixel data (pydicom writes its bytes as they are) for a big-endian write."""
    if ds.BitsAllocated == 16:
        ds.PixelData = np.frombuffer(ds.PixelData, "<u2").astype(">u2").tobytes()
    return ds


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", slope: float = 1.0,
                intercept: float = 0.0, window: tuple[float, float] | None = None) -> Path:
    ds = image_dataset(pixels.astype(np.uint16), photometric=photometric, bits_stored=12)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    return save(ds, path)


def ramp(rows: int = 40, cols: int = 50) -> np.ndarray:
    return np.tile(np.linspace(0, 4095, cols), (rows, 1)).astype(np.uint16)


def textured(rows: int = 48, cols: int = 64, seed: int = 0) -> np.ndarray:
    """12-bit gray with structure (lossless codecs must reproduce it exactly)."""
    y, x = np.mgrid[0:rows, 0:cols]
    noise = np.random.default_rng(seed).integers(0, 200, (rows, cols))
    return (x * 40 + y * 20 + noise).clip(0, 4095).astype(np.uint16)


def colour(rows: int = 48, cols: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols]
    return np.stack([x * 4 % 256, y * 5 % 256, (x + y) * 2 % 256], axis=-1).astype(np.uint8)


def decoded(path_or_ds: Path | Dataset, tmp_path: Path, name: str = "f.dcm", **kw) -> np.ndarray:
    path = path_or_ds if isinstance(path_or_ds, Path) else save(path_or_ds, tmp_path / name)
    return decode_image(path, size=SIZE, **kw).astype(int)


def bundled(name: str) -> Path:
    """A test file shipped inside the installed pydicom package."""
    import pydicom.data

    path = Path(pydicom.data.__file__).parent / "test_files" / name
    assert path.exists(), f"{name} is not among the test files of the installed pydicom (a runtime dependency)"
    return path


def needs_encoder(uid) -> None:
    # pyjpegls and pylibjpeg-openjpeg are runtime dependencies: a missing encoder is an install fault
    assert get_encoder(uid).is_available, f"no installed plugin encodes {uid.name} (pyjpegls / pylibjpeg-openjpeg)"


# ----------------------------------------------------------------- grayscale rendering


def test_dicom_is_recognised_by_content_not_suffix(tmp_path):
    path = write_dicom(tmp_path / "no_suffix", ramp())
    png = io.BytesIO()
    Image.new("L", (8, 8)).save(png, "PNG")
    assert is_dicom(path.read_bytes()) and not is_dicom(png.getvalue())
    assert decode_image(path, size=16).shape == (16, 16)


def test_dicom_is_decoded_to_uint8_gray_with_the_full_range(tmp_path):
    image = decode_image(write_dicom(tmp_path / "a.dcm", ramp()), size=32)
    assert image.shape == (32, 32) and image.dtype == np.uint8
    assert image[:, 0].mean() < 10 and image[:, -1].mean() > 245  # dark left, bright right


def test_monochrome1_is_inverted_so_bone_stays_bright(tmp_path):
    normal = decode_image(write_dicom(tmp_path / "m2.dcm", ramp()), size=32)
    inverted = decode_image(write_dicom(tmp_path / "m1.dcm", ramp(), photometric="MONOCHROME1"), size=32)
    assert np.abs(normal.astype(int) + inverted.astype(int) - 255).max() <= 2


def test_window_from_the_file_is_applied(tmp_path):
    windowed = decode_image(write_dicom(tmp_path / "w.dcm", ramp(), window=(2048.0, 1024.0)), size=50)
    row = windowed[25].astype(int)
    assert row[:15].max() <= 2 and row[-15:].min() >= 253  # outside the window: clipped to black / white
    assert 60 < row[25] < 195  # the centre of the window is mid-grey


def test_window_is_in_modality_units_after_rescale(tmp_path):
    """Stored values x2 - 1000, window given in those units: the same picture as the raw window."""
    raw = decode_image(write_dicom(tmp_path / "raw.dcm", ramp(), window=(2048.0, 1024.0)), size=50)
    rescaled = write_dicom(tmp_path / "hu.dcm", ramp(), slope=2.0, intercept=-1000.0, window=(3096.0, 2048.0))
    assert np.abs(decode_image(rescaled, size=50).astype(int) - raw.astype(int)).max() <= 2


def test_dicom_files_are_discovered_and_cached_like_other_images(tmp_path):
    for label, n in (("NORMAL", 2), ("PNEUMONIA", 2)):
        for i in range(n):
            write_dicom(tmp_path / "data" / "train" / label / f"IM-{i:04d}-0001.dcm", ramp() // (i + 1))
    records = discover(tmp_path / "data")
    assert len(records) == 4 and {r.label for r in records} == {"NORMAL", "PNEUMONIA"}
    cached = ImageCache(tmp_path / "cache", CacheSettings(size=24)).build([r.path for r in records])
    assert len(cached) == 4 and cached[0].shape == (24, 24)


# ----------------------------------------------------------------- transfer syntaxes


LOSSLESS = [RLELossless, JPEGLSLossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
            ImplicitVRLittleEndian]


@pytest.mark.parametrize("syntax", LOSSLESS)
@pytest.mark.parametrize("kind", ["gray16", "rgb8"])
def test_lossless_syntaxes_decode_exactly_like_the_uncompressed_file(tmp_path, syntax, kind):
    pixels, photometric = (textured(), "MONOCHROME2") if kind == "gray16" else (colour(), "RGB")
    bits = 12 if kind == "gray16" else 8
    reference = decoded(image_dataset(pixels, photometric=photometric, bits_stored=bits), tmp_path, "ref.dcm")
    ds = image_dataset(pixels, photometric=photometric, bits_stored=bits)
    path = tmp_path / "f.dcm"
    if syntax.is_compressed:
        needs_encoder(syntax)
        ds.compress(syntax, generate_instance_uid=False)
        save(ds, path)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
        dcmwrite(path, to_big_endian(ds) if syntax == ExplicitVRBigEndian else ds, enforce_file_format=True,
                 implicit_vr=syntax.is_implicit_VR, little_endian=syntax.is_little_endian)
    out = decoded(path, tmp_path)
    assert out.shape == reference.shape == ((SIZE, SIZE) if kind == "gray16" else (SIZE, SIZE, 3))
    np.testing.assert_array_equal(out, reference)


@pytest.mark.parametrize(("syntax", "options"), [(JPEGLSNearLossless, {"jls_error": 3}), (JPEG2000, {"j2k_cr": [8]})])
def test_lossy_syntaxes_decode_close_to_the_original(tmp_path, syntax, options):
    needs_encoder(syntax)
    reference = decoded(image_dataset(textured(), bits_stored=12), tmp_path, "ref.dcm")
    ds = image_dataset(textured(), bits_stored=12)
    ds.compress(syntax, generate_instance_uid=False, **options)
    out = decoded(ds, tmp_path)
    assert out.shape == (SIZE, SIZE) and np.abs(out - reference).mean() < 3


@pytest.mark.parametrize(
    ("name", "reference", "max_diff"),
    [("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", 0), ("MR_small_jp2klossless.dcm", "MR_small.dcm", 0),
     ("MR_small_RLE.dcm", "MR_small.dcm", 0), ("MR_small_bigendian.dcm", "MR_small.dcm", 0),
     ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", 0),  # JPEG Lossless SV1
     ("SC_rgb_gdcm_KY.dcm", "SC_rgb_rle.dcm", 0),  # JPEG 2000 RGB
     ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", 6),  # JPEG baseline, YBR_FULL
     ("SC_ybr_full_422_uncompressed.dcm", "SC_rgb_rle.dcm", 6),  # native YBR_FULL_422
     ("SC_rgb_jls_lossy_line.dcm", "SC_rgb_rle.dcm", 6)],  # JPEG-LS near-lossless RGB
)
def test_pydicoms_packaged_files_decode_like_their_lossless_twin(tmp_path, name, reference, max_diff):
    out, ref = decoded(bundled(name), tmp_path), decoded(bundled(reference), tmp_path)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= max_diff


def test_12_bit_jpeg_extended_decodes(tmp_path):
    out = decoded(bundled("JPGExtended.dcm"), tmp_path)  # pydicom cannot encode this syntax
    assert out.shape == (SIZE, SIZE) and out.max() - out.min() > 100


# ----------------------------------------------------------------- colour


def test_ybr_full_is_converted_to_rgb(tmp_path):
    rgb = colour()
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    out = decoded(image_dataset(ybr, photometric="YBR_FULL"), tmp_path, "ybr.dcm")
    reference = decoded(image_dataset(rgb, photometric="RGB"), tmp_path, "rgb.dcm")
    assert out.shape == (SIZE, SIZE, 3) and np.abs(out - reference).max() <= 2


@pytest.mark.parametrize("bits", [16, 12])
def test_16_bit_rgb_is_scaled_not_wrapped(tmp_path, bits):
    rgb = colour()
    low_bits = np.random.default_rng(0).integers(0, 2 ** (bits - 8), rgb.shape)  # below one 8-bit level
    deep = (np.rint(rgb.astype(np.float64) * (2**bits - 1) / 255) + low_bits).clip(0, 2**bits - 1).astype(np.uint16)
    out = decoded(image_dataset(deep, photometric="RGB", bits_stored=bits), tmp_path, "deep.dcm")
    reference = decoded(image_dataset(rgb, photometric="RGB"), tmp_path, "rgb.dcm")
    assert np.abs(out - reference).max() <= 2 and np.abs(out - reference).mean() < 1  # the low bits add < 1 level
    wrapped = decoded(image_dataset((deep % 256).astype(np.uint8), photometric="RGB"), tmp_path, "wrapped.dcm")
    assert np.abs(wrapped - reference).mean() > 20  # what "wrapped" would have looked like


def test_palette_colour_goes_through_the_files_lut(tmp_path):
    import pydicom

    path = bundled("examples_palette.dcm")
    lut = apply_color_lut(pydicom.dcmread(path).pixel_array, pydicom.dcmread(path))
    lut8 = np.rint(lut / 257).astype(np.uint8) if lut.dtype == np.uint16 else lut
    expected = Image.fromarray(lut8).resize((SIZE, SIZE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = decoded(path, tmp_path)
    assert out.shape == (SIZE, SIZE, 3)
    assert np.abs(out - np.asarray(expected, dtype=int)).max() <= 2


# ----------------------------------------------------------------- frames, preamble, meta


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless])
@pytest.mark.parametrize("kind", ["gray", "rgb"])
def test_multi_frame_gives_the_first_frame_and_says_so(tmp_path, caplog, syntax, kind):
    if kind == "gray":
        frames, photometric = np.stack([textured(seed=i) // (i + 1) for i in range(3)]), "MONOCHROME2"
    else:
        frames, photometric = np.stack([colour(), 255 - colour(), colour() // 2]), "RGB"
    ds = image_dataset(frames, photometric=photometric, bits_stored=12 if kind == "gray" else 8)
    first = image_dataset(frames[0], photometric=photometric, bits_stored=12 if kind == "gray" else 8)
    if syntax.is_compressed:
        ds.compress(syntax, generate_instance_uid=False)
    path = save(ds, tmp_path / "multi.dcm")
    with caplog.at_level(logging.WARNING, logger="medtransfer.data.decode"):
        out = decoded(path, tmp_path)
    np.testing.assert_array_equal(out, decoded(first, tmp_path, "first.dcm"))
    assert f"{path}: multi-frame DICOM (3 frames); only the first frame is used." in caplog.messages


@pytest.mark.parametrize(
    ("implicit_vr", "little_endian"), [(True, True), (False, True), (False, False)],
    ids=["implicit", "explicit", "big-endian"],
)
def test_files_without_preamble_or_file_meta_are_read(tmp_path, implicit_vr, little_endian):
    reference = decoded(image_dataset(textured(), bits_stored=12), tmp_path, "ref.dcm")
    ds = image_dataset(textured(), bits_stored=12)
    ds = ds if little_endian else to_big_endian(ds)
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    path = tmp_path / "bare.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pydicom deprecates writing big endian
        dcmwrite(path, ds, implicit_vr=implicit_vr, little_endian=little_endian)
    data = path.read_bytes()
    assert data[128:132] != b"DICM" and data[:2] in (b"\x08\x00", b"\x00\x08")
    np.testing.assert_array_equal(decoded(path, tmp_path), reference)


def test_part10_file_without_its_preamble_is_read(tmp_path):
    full = save(image_dataset(textured(), bits_stored=12), tmp_path / "full.dcm")
    bare = tmp_path / "no_preamble.dcm"
    bare.write_bytes(full.read_bytes()[132:])  # starts with the file meta group (0002,xxxx)
    np.testing.assert_array_equal(decoded(bare, tmp_path), decoded(full, tmp_path))


def test_dicom_without_pixel_data_is_one_clear_line(tmp_path):
    ds = new_dataset()
    ds.Modality = "SR"
    path = save(ds, tmp_path / "report.dcm")
    with pytest.raises(DataError) as info:
        decode_image(path, size=SIZE)
    message = str(info.value)
    assert message.startswith(f"{path}: DICOM file without pixel data") and "\n" not in message


def test_a_broken_dicom_is_a_data_error_naming_the_file(tmp_path):
    full = save(image_dataset(textured(), bits_stored=12), tmp_path / "full.dcm").read_bytes()
    path = tmp_path / "broken.dcm"
    path.write_bytes(full[: len(full) - 1000])  # pixel data cut short
    with pytest.raises(DataError) as info:
        decode_image(path, size=16)
    message = str(info.value)
    assert message.startswith(f"{path}: not a readable image (ValueError: The number of bytes of pixel data is less")
    assert "\n" not in message


def test_pydicom_warnings_do_not_leak(tmp_path):
    ds = image_dataset(textured(), bits_stored=12)
    ds.PixelData = ds.PixelData + bytes(128)  # excess padding: pydicom warns, then decodes
    path = save(ds, tmp_path / "padded.dcm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = decoded(path, tmp_path)
    assert caught == []
    np.testing.assert_array_equal(out, decoded(image_dataset(textured(), bits_stored=12), tmp_path, "ref.dcm"))


# ----------------------------------------------------------------- bombs


def test_header_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    path = save(image_dataset(textured(40, 50), bits_stored=12), tmp_path / "big.dcm")
    monkeypatch.setattr(Dataset, "pixel_array", property(lambda self: pytest.fail("pixels were decoded")))
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(path, size=SIZE, max_pixels=1999)
    assert str(info.value).startswith(f"{path}: image too large (50 x 40 = 0.0 megapixels")


def deflated_dicom(rows: int, columns: int, pixel_bytes: int) -> bytes:
    """A deflated 16-bit DICOM whose header says rows x columns and whose pixel data holds
    ``pixel_bytes`` zero bytes, compressed as a stream (never held whole)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = SecondaryCaptureImageStorage, generate_uid(), "CR"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [packer.compress(body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes))]
    block = bytes(1 << 20)
    for start in range(0, pixel_bytes, len(block)):
        parts.append(packer.compress(block[: min(len(block), pixel_bytes - start)]))
    parts.append(packer.flush())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    return head.getvalue() + b"".join(parts)


def test_deflated_dicom_stream_helper_is_valid(tmp_path):
    path = tmp_path / "small_deflated.dcm"
    path.write_bytes(deflated_dicom(20, 30, 20 * 30 * 2))
    assert decode_image(path, size=SIZE).shape == (SIZE, SIZE)  # all zeros, but a valid image


@pytest.mark.parametrize(
    ("rows", "columns", "pixel_bytes", "error", "match"),
    [(8000, 8000, 8000 * 8000 * 2, ImageTooLargeError, r"image too large \(8000 x 8000 = 64\.0 megapixels"),
     (64, 64, 64 << 20, DataError,
      r"deflated DICOM expands beyond what its header declares \(64 x 64 pixels, 1 frame\(s\)\)")],
    ids=["huge-header", "header-lies"],
)
def test_deflated_bombs_are_refused_fast_in_little_memory(tmp_path, rows, columns, pixel_bytes, error, match):
    path = tmp_path / "bomb.dcm"
    path.write_bytes(deflated_dicom(rows, columns, pixel_bytes))
    assert path.stat().st_size < 1_000_000
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(error, match=match):
        decode_image(path, size=SIZE)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 20 * 2**20


def test_deflated_frames_all_count_against_the_limit(tmp_path):
    ds = image_dataset(np.stack([textured(40, 50)] * 2), bits_stored=12)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = save(ds, tmp_path / "frames.dcm")
    with pytest.raises(ImageTooLargeError, match=r"50 x 40 x 2 frames"):
        decode_image(path, size=SIZE, max_pixels=50 * 40 * 2 - 1)
    assert decode_image(path, size=SIZE, max_pixels=50 * 40 * 2).shape == (SIZE, SIZE)


@pytest.mark.parametrize(("syntax", "match"), [
    (JPEGLSLossless, r"compressed frame larger than its header \(64 x 48 pixels, the header says 16 x 12\)"),
    (JPEG2000Lossless, r"compressed frame larger than its header \(64 x 48 pixels, the header says 16 x 12\)"),
    (RLELossless, r"RLE segment expands beyond the 192 bytes its header declares"),
])
def test_compressed_frame_larger_than_the_header_is_refused_before_decoding(tmp_path, monkeypatch, syntax, match):
    needs_encoder(syntax)
    ds = image_dataset(textured(48, 64), bits_stored=12)
    ds.compress(syntax, generate_instance_uid=False)
    ds.Rows, ds.Columns = 12, 16  # the decoder would allocate 64 x 48 (or RLE expand beyond 16 x 12)
    path = save(ds, tmp_path / "liar.dcm")
    monkeypatch.setattr(Dataset, "pixel_array", property(lambda self: pytest.fail("pixels were decoded")))
    with pytest.raises(DataError, match=match):
        decode_image(path, size=SIZE)
