"""Image decoding (medtransfer.data.decode): formats, modes, draft decode, DICOM windowing, errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medtransfer.data.cache import CacheSettings, ImageCache
from medtransfer.data.decode import GRAY_TOLERANCE, decode_bytes, decode_image, is_dicom
from medtransfer.data.discover import discover
from medtransfer.errors import ConfigError, DataError

SIZE = 32


def _gradient(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth uint8 pattern (compresses well, survives JPEG)."""
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 3 + y * 2 + seed * 40) % 256).astype(np.uint8)


def _save(path: Path, arr: np.ndarray, mode: str | None = None, **kw) -> Path:
    Image.fromarray(arr, mode=mode).save(path, **kw)
    return path


def make_gray_jpeg(d: Path) -> Path:
    return _save(d / "gray.jpg", _gradient(120, 90), quality=90)


def make_rgb_equal_jpeg(d: Path) -> Path:
    g = _gradient(100, 140)
    return _save(d / "rgb_equal.jpeg", np.stack([g, g, g], axis=-1), quality=90)


def make_color_png(d: Path) -> Path:
    g = _gradient(64, 48)
    return _save(d / "color.png", np.stack([g, 255 - g, np.full_like(g, 30)], axis=-1))


def make_16bit_png(d: Path) -> Path:
    y, x = np.mgrid[0:50, 0:70]
    arr = (100 + x * 50 + y).astype(np.uint16)  # 12-bit-like data, not full 16-bit range
    path = d / "deep.png"
    Image.fromarray(arr).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    return path


def make_rgba_png(d: Path) -> Path:
    g = _gradient(40, 40)
    return _save(d / "rgba.png", np.stack([g, g, g, np.full_like(g, 200)], axis=-1), mode="RGBA")


def make_palette_png(d: Path) -> Path:
    path = d / "palette.png"
    Image.fromarray(_gradient(40, 30)).convert("P").save(path)
    return path


def make_bmp(d: Path) -> Path:
    return _save(d / "plain.bmp", _gradient(30, 20))


def make_tiff(d: Path) -> Path:
    g = _gradient(30, 20)
    return _save(d / "colour.tif", np.stack([g, 255 - g, g // 2], axis=-1))


MAKERS = {
    "gray_jpeg": (make_gray_jpeg, (SIZE, SIZE)),
    "rgb_equal_jpeg": (make_rgb_equal_jpeg, (SIZE, SIZE)),
    "color_png": (make_color_png, (SIZE, SIZE, 3)),
    "16bit_png": (make_16bit_png, (SIZE, SIZE)),
    "rgba_gray_png": (make_rgba_png, (SIZE, SIZE)),
    "palette_gray_png": (make_palette_png, (SIZE, SIZE)),
    "gray_bmp": (make_bmp, (SIZE, SIZE)),
    "color_tiff": (make_tiff, (SIZE, SIZE, 3)),
}


# ----------------------------------------------------------------- formats and modes


@pytest.mark.parametrize("kind", MAKERS)
def test_decode_image_shape_and_channels(tmp_path: Path, kind: str) -> None:
    maker, shape = MAKERS[kind]
    arr = decode_image(maker(tmp_path), size=SIZE)
    assert arr.dtype == np.uint8
    assert arr.shape == shape


def test_decode_image_stretches_without_keeping_aspect(tmp_path: Path) -> None:
    wide = _save(tmp_path / "wide.png", _gradient(300, 60))
    assert decode_image(wide, size=48).shape == (48, 48)


def test_decode_image_keep_color_false_is_grayscale(tmp_path: Path) -> None:
    assert decode_image(make_color_png(tmp_path), size=SIZE, keep_color=False).shape == (SIZE, SIZE)


def test_decode_image_16bit_is_stretched_by_its_own_range(tmp_path: Path) -> None:
    arr = np.full((64, 64), 1000, np.uint16)
    arr[:, 32:] = 4095  # 12-bit data in a 16-bit PNG: dividing by 257 would be near black
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    out = decode_image(path, size=SIZE)
    assert out[:, :8].max() == 0 and out[:, -8:].min() == 255


@pytest.mark.parametrize(("spread", "channels"), [(0, 1), (GRAY_TOLERANCE, 1), (GRAY_TOLERANCE + 1, 3)])
def test_rgb_counts_as_gray_only_within_the_tolerance(tmp_path: Path, spread: int, channels: int) -> None:
    g = np.full((SIZE, SIZE), 100, np.uint8)
    path = _save(tmp_path / "rgb.png", np.stack([g, g + spread, g], axis=-1))
    out = decode_image(path, size=SIZE)
    assert (out.shape[2] if out.ndim == 3 else 1) == channels


def test_decode_image_applies_exif_orientation(tmp_path: Path) -> None:
    arr = np.zeros((40, 60), np.uint8)
    arr[:, 30:] = 255  # left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    rotated = _save(tmp_path / "rot.png", arr, exif=exif)
    upright = tmp_path / "upright.png"
    Image.fromarray(arr).transpose(Image.Transpose.ROTATE_270).save(upright)
    out = decode_image(rotated, size=SIZE)
    np.testing.assert_array_equal(out, decode_image(upright, size=SIZE))
    assert out[: SIZE // 4].mean() < 10 and out[-SIZE // 4 :].mean() > 245


def test_large_jpeg_draft_decode_matches_a_full_decode_and_resize(tmp_path: Path) -> None:
    """The reduced-size DCT decode gives, up to rounding, what a full decode + resize gives."""
    path = _save(tmp_path / "big.jpg", _gradient(1600, 1200), quality=95)
    with Image.open(path) as full:
        reference = np.asarray(full.convert("L").resize((64, 64), Image.Resampling.LANCZOS), dtype=float)
    out = decode_image(path, size=64)
    assert np.abs(out.astype(float) - reference).mean() < 6


def test_decode_image_accepts_bytes_and_file_objects(tmp_path: Path) -> None:
    path = make_gray_jpeg(tmp_path)
    expected = decode_image(path, size=SIZE)
    np.testing.assert_array_equal(decode_image(path.read_bytes(), size=SIZE), expected)
    with path.open("rb") as handle:
        np.testing.assert_array_equal(decode_image(handle, size=SIZE), expected)
    np.testing.assert_array_equal(decode_image(io.BytesIO(path.read_bytes()), size=SIZE), expected)


# ----------------------------------------------------------------- errors


def test_decode_image_bad_file_raises_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.jpg.*--skip-bad-images"):
        decode_image(bad, size=SIZE)


def test_decode_image_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.png: cannot read file"):
        decode_image(tmp_path / "missing.png", size=SIZE)


def test_decode_bytes_reason_has_no_file_name_and_hides_buffer_addresses() -> None:
    with pytest.raises(DataError) as info:
        decode_bytes(b"plain text, no image", size=SIZE)
    message = str(info.value)
    assert message.startswith("not a readable image (UnidentifiedImageError")
    assert "BytesIO" not in message and "0x" not in message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"size": 0}, "positive integer, got 0"), ({"size": True}, "positive integer"),
     ({"size": SIZE, "resample": "nearest"}, "lanczos, bicubic, bilinear, box")],
)
def test_invalid_settings_are_config_errors_listing_the_choices(tmp_path: Path, kwargs: dict, match: str) -> None:
    path = make_gray_jpeg(tmp_path)
    with pytest.raises(ConfigError, match=match):
        decode_image(path, **kwargs)
    with pytest.raises(ConfigError, match=match):
        decode_bytes(path.read_bytes(), **kwargs)


# ----------------------------------------------------------------- DICOM


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", slope: float = 1.0,
                intercept: float = 0.0, window: tuple[float, float] | None = None) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = "P1", "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def ramp(rows: int = 40, cols: int = 50) -> np.ndarray:
    return np.tile(np.linspace(0, 4095, cols), (rows, 1)).astype(np.uint16)


def test_dicom_is_recognised_by_content_not_suffix(tmp_path):
    path = write_dicom(tmp_path / "no_suffix", ramp())
    assert is_dicom(path.read_bytes()) and not is_dicom(make_gray_jpeg(tmp_path).read_bytes())
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
    for split in ("train",):
        for label, n in (("NORMAL", 2), ("PNEUMONIA", 2)):
            for i in range(n):
                write_dicom(tmp_path / "data" / split / label / f"IM-{i:04d}-0001.dcm", ramp() // (i + 1))
    records = discover(tmp_path / "data")
    assert len(records) == 4 and {r.label for r in records} == {"NORMAL", "PNEUMONIA"}
    cached = ImageCache(tmp_path / "cache", CacheSettings(size=24)).build([r.path for r in records])
    assert len(cached) == 4 and cached[0].shape == (24, 24)


def test_a_broken_dicom_is_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x08\x00\x10\x00garbage")
    with pytest.raises(DataError, match="broken.dcm: not a readable image"):
        decode_image(path, size=16)
