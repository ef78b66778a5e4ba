"""Image decoding (medtransfer.data.decode): formats, modes, draft decode, transparency, the pixel
limit before decoding, refused formats, errors. DICOM specifics: tests/data/test_dicom.py."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from medtransfer.data.decode import ACCEPTED_FORMATS, GRAY_TOLERANCE, decode_bytes, decode_image
from medtransfer.data.limits import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, ImageTooLargeError
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
    assert message == "not a readable image (unrecognised format; medtransfer reads JPEG, PNG, BMP, TIFF or DICOM)"
    truncated = io.BytesIO()
    Image.fromarray(_gradient(64, 64)).save(truncated, "PNG")
    with pytest.raises(DataError) as info:
        decode_bytes(truncated.getvalue()[:-40], size=SIZE)  # PIL's own error names its buffer
    message = str(info.value)
    assert message.startswith("not a readable image (") and "BytesIO" not in message and "0x" not in message


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


# ----------------------------------------------------------------- accepted formats only


def _foreign(fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "EPS":  # Pillow writes EPS without Ghostscript; reading it would run Ghostscript
        Image.fromarray(_gradient(16, 16)).save(buf, "EPS")
    else:
        Image.fromarray(np.stack([_gradient(16, 16)] * 3, axis=-1)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "named"),
    [("GIF", "GIF files are not accepted"), ("EPS", "EPS files are not accepted"),
     ("WEBP", "WebP or another RIFF files are not accepted"), ("ICO", "ICO files are not accepted"),
     ("PPM", "unrecognised format"), ("TGA", "unrecognised format")],
)
def test_other_formats_are_refused_with_the_accepted_list(fmt: str, named: str, monkeypatch) -> None:
    from PIL import EpsImagePlugin

    data = _foreign(fmt)
    with Image.open(io.BytesIO(data)) as probe:  # Pillow itself would open every one of them
        assert probe.size == (16, 16)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript was run"))
    with pytest.raises(DataError) as info:
        decode_bytes(data, size=SIZE)
    assert str(info.value) == f"not a readable image ({named}; medtransfer reads JPEG, PNG, BMP, TIFF or DICOM)"
    assert ", ".join(ACCEPTED_FORMATS[:-1]) in str(info.value)


def test_a_refused_format_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "scan.gif"
    path.write_bytes(_foreign("GIF"))
    with pytest.raises(DataError, match=r"scan\.gif: not a readable image \(GIF files are not accepted.*--skip-bad-images"):
        decode_image(path, size=SIZE)


# ----------------------------------------------------------------- transparency


def _png(arr: np.ndarray, mode: str | None = None, **info) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, "PNG", **info)
    return buf.getvalue()


def test_rgba_is_composited_onto_black_not_dropped() -> None:
    rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    alpha = np.full((SIZE, SIZE), 255, np.uint8)
    alpha[:, : SIZE // 2] = 0  # left half fully transparent
    alpha[:, SIZE // 2 : 3 * SIZE // 4] = 128  # then half transparent
    out = decode_bytes(_png(np.dstack([rgb, alpha]), mode="RGBA"), size=SIZE, resample="box")
    assert out.shape == (SIZE, SIZE, 3)
    assert out[:, : SIZE // 2].max() == 0
    assert np.abs(out[:, SIZE // 2 : 3 * SIZE // 4].astype(int) - [100, 50, 25]).max() <= 1  # half of each
    assert (out[:, 3 * SIZE // 4 :] == [200, 100, 50]).all()


def test_gray_alpha_and_palette_transparency_are_composited_too() -> None:
    gray = np.full((SIZE, SIZE), 180, np.uint8)
    alpha = np.full((SIZE, SIZE), 255, np.uint8)
    alpha[: SIZE // 2] = 0
    la = decode_bytes(_png(np.dstack([gray, alpha]), mode="LA"), size=SIZE, resample="box")
    assert la.shape == (SIZE, SIZE) and la[: SIZE // 2].max() == 0 and la[SIZE // 2 :].min() == 180

    indices = np.zeros((SIZE, SIZE), np.uint8)
    indices[:, SIZE // 2 :] = 1
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette([255, 255, 255, 90, 90, 90] + [0] * 762)  # index 0 white, but transparent
    buf = io.BytesIO()
    palette.save(buf, "PNG", transparency=0)
    out = decode_bytes(buf.getvalue(), size=SIZE, resample="box")
    assert out[:, : SIZE // 2].max() == 0 and (out[:, SIZE // 2 :] == 90).all()


def test_opaque_alpha_changes_nothing() -> None:
    g = _gradient(SIZE, SIZE)
    opaque = _png(np.dstack([g, g, g, np.full_like(g, 255)]), mode="RGBA")
    np.testing.assert_array_equal(decode_bytes(opaque, size=SIZE), decode_bytes(_png(g), size=SIZE))


# ----------------------------------------------------------------- decompression bombs


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int, height: int, *, rows: int | None = None) -> bytes:
    """A valid 16-bit grayscale PNG of zeros, compressed row by row (never held whole);
    ``rows`` < height writes only that many rows (a header-only stand-in)."""
    packer = zlib.compressobj(9)
    row = bytes(1 + 2 * width)  # filter byte + 16-bit zeros
    idat = b"".join(packer.compress(row) for _ in range(height if rows is None else rows)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(huge_png(13000, 13000))
    return path


def test_bomb_png_is_a_real_13000_square_16_bit_png_of_a_few_hundred_kb(bomb_png: Path) -> None:
    assert bomb_png.stat().st_size < 1_000_000
    with pytest.warns(Image.DecompressionBombWarning), Image.open(bomb_png) as im:
        assert im.size == (13000, 13000) and im.mode == "I;16"


def test_bomb_png_is_refused_fast_without_decoding(bomb_png: Path, monkeypatch) -> None:
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or real_load(self))
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(bomb_png, size=224)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 1.0
    assert loads == []  # no pixel decoded
    assert peak < 20 * 2**20  # the file's bytes and the header, not 338 MB of pixels
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{bomb_png}: image too large (13000 x 13000 = 169.0 megapixels")
    assert f"over the limit of {DEFAULT_MAX_PIXELS / 1e6:g} megapixels" in message
    assert f"{MAX_PIXELS_ENV}=169000000" in message


def test_the_limit_comes_from_the_keyword_then_the_environment(monkeypatch) -> None:
    png = _png(_gradient(50, 40))
    assert decode_bytes(png, size=SIZE, max_pixels=2000).shape == (SIZE, SIZE)
    with pytest.raises(ImageTooLargeError, match=r"50 x 40 = 0\.0 megapixels, over the limit of 0\.001999"):
        decode_bytes(png, size=SIZE, max_pixels=1999)
    monkeypatch.setenv(MAX_PIXELS_ENV, "1999")
    with pytest.raises(ImageTooLargeError):
        decode_bytes(png, size=SIZE)
    assert decode_bytes(png, size=SIZE, max_pixels=2000).shape == (SIZE, SIZE)  # the keyword wins
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ConfigError, match=f"{MAX_PIXELS_ENV}='lots'"):
        decode_image(png, size=SIZE)


def test_jpeg_and_tiff_headers_are_checked_before_decoding(tmp_path: Path) -> None:
    for suffix in ("jpg", "tif", "bmp"):
        path = _save(tmp_path / f"wide.{suffix}", _gradient(300, 200))
        with pytest.raises(ImageTooLargeError, match="300 x 200"):
            decode_image(path, size=SIZE, max_pixels=300 * 200 - 1)
        assert decode_image(path, size=SIZE, max_pixels=300 * 200).shape == (SIZE, SIZE)


def test_our_limit_replaces_pillows_own_bomb_guard(monkeypatch) -> None:
    """Pillow refuses above 2 x Image.MAX_IMAGE_PIXELS in open(); the project's limit decides."""
    header_only = huge_png(20000, 20000, rows=1)  # 400 MP declared, above Pillow's hard limit
    assert 20000 * 20000 > 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(header_only))
    with pytest.raises(ImageTooLargeError, match="20000 x 20000 = 400.0 megapixels"):
        decode_bytes(header_only, size=SIZE)
    def refuse_to_decode(self):
        raise RuntimeError("decoding starts")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse_to_decode)
    with pytest.raises(DataError) as info:  # allowed by our limit: Pillow's guard no longer stops it
        decode_bytes(header_only, size=SIZE, max_pixels=400_000_000)
    assert str(info.value) == "not a readable image (RuntimeError: decoding starts)"


def test_no_warning_escapes_for_large_images(recwarn) -> None:
    header_only = huge_png(12000, 12000, rows=1)  # above Pillow's warning level (89 MP)
    with pytest.raises(ImageTooLargeError):
        decode_bytes(header_only, size=SIZE)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
