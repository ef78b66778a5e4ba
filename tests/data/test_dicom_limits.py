"""DICOM bomb guards beyond the pixel limit (medtransfer.data.dicom, medtransfer.data.limits):
the transfer syntax read from the parsed file meta (a padded meta cannot hide a deflated
dataset), the byte cap on inflated and on all-frames pixel data, and compressed frames
whose codestream size cannot be read. Files are small; bombs are streamed zeros."""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from medtransfer.data.decode import decode_image
from medtransfer.data.dicom import read_dicom_header
from medtransfer.data.limits import ImageTooLargeError, check_expanded_bytes, format_bytes, max_expanded_bytes
from medtransfer.errors import DataError
from tests.data.test_dicom import SIZE, colour, image_dataset, needs_encoder, save, textured

PAD = 9000  # file-meta padding: the transfer syntax UID lands past the first 8 KiB


def padded_deflated(rows: int, columns: int, pixel_bytes: int, *, pad: int = PAD, fill: int = 0,
                    between: bytes = b"") -> bytes:
    """A deflated 16-bit DICOM (PatientID "P7", ViewPosition "PA") whose header says rows x columns,
    whose pixel data holds ``pixel_bytes`` bytes of ``fill`` (deflated as a stream, never held whole),
    and whose file meta is padded by ``pad`` bytes before the transfer syntax; ``between`` goes
    between the file meta and the deflated dataset."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = SecondaryCaptureImageStorage, generate_uid(), "CR"
    ds.PatientID, ds.ViewPosition = "P7", "PA"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [packer.compress(body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes))]
    block = bytes([fill]) * (1 << 20)
    for start in range(0, pixel_bytes, len(block)):
        parts.append(packer.compress(block[: min(len(block), pixel_bytes - start)]))
    parts.append(packer.flush())
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01" + bytes(pad)  # OB: any length; sorted first in group 0002
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    return head.getvalue() + between + b"".join(parts)


def measured(call):
    """(result or raised exception, seconds, peak traced bytes) of ``call()``."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        outcome = call()
    except Exception as exc:  # noqa: BLE001 - returned for the test to inspect
        outcome = exc
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return outcome, elapsed, peak


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    monkeypatch.setattr(Dataset, "pixel_array", property(lambda self: pytest.fail("pixels were decoded")))


# ----------------------------------------------------------------- the transfer syntax from the parsed meta


def test_the_padded_helper_hides_the_syntax_past_8_kib_and_still_decodes(tmp_path):
    data = padded_deflated(20, 30, 20 * 30 * 2, fill=7)
    assert data.find(DeflatedExplicitVRLittleEndian.encode()) > 8192
    path = tmp_path / "padded.dcm"
    path.write_bytes(data)
    assert decode_image(path, size=SIZE).shape == (SIZE, SIZE)


def test_a_deflate_bomb_behind_a_padded_meta_is_refused_fast_in_little_memory(tmp_path):
    path = tmp_path / "bomb.dcm"
    path.write_bytes(padded_deflated(64, 64, 64 << 20))  # 64 MiB of zeros behind a 64 x 64 header
    assert path.stat().st_size < 200_000
    error, elapsed, peak = measured(lambda: decode_image(path, size=SIZE))
    assert isinstance(error, DataError)
    assert str(error).startswith(f"{path}: deflated DICOM expands beyond what its header declares (64 x 64 pixels")
    assert "\n" not in str(error)
    assert elapsed < 1.0 and peak < 20 * 2**20


def test_the_header_of_a_padded_deflated_file_is_read_without_inflating_it_all(tmp_path):
    path = tmp_path / "header.dcm"
    path.write_bytes(padded_deflated(64, 64, 32 << 20))
    header, elapsed, peak = measured(lambda: read_dicom_header(path))
    assert header.patient_id == "P7" and header.view_position == "PA"
    assert elapsed < 1.0 and peak < 8 * 2**20  # one inflated step, not 32 MiB


# ----------------------------------------------------------------- the byte cap


def test_the_byte_cap_follows_the_pixel_limit():
    assert max_expanded_bytes(50_000_000) == 300_000_000 and format_bytes(300_000_000) == "286 MiB"
    check_expanded_bytes(600, limit=100, what="x")
    with pytest.raises(ImageTooLargeError, match=r"^x = 601 bytes, past the 600 bytes cap .*MEDTRANSFER_MAX_PIXELS=101$"):
        check_expanded_bytes(601, limit=100, what="x")


def test_deflated_data_that_inflates_past_the_byte_cap_is_refused_while_inflating(tmp_path):
    path = tmp_path / "cap.dcm"
    path.write_bytes(padded_deflated(64, 64, 16 << 20))  # the header (8 KiB) is within the cap; the data is not
    error, elapsed, peak = measured(lambda: decode_image(path, size=SIZE, max_pixels=64 * 64))
    assert isinstance(error, ImageTooLargeError)
    assert str(error).startswith(f"{path}: deflated DICOM inflates past 24 KiB, the cap (0.004096 megapixels x 6 bytes)")
    assert elapsed < 1.0 and peak < 8 * 2**20


@pytest.mark.parametrize("syntax", [None, RLELossless], ids=["native", "rle"])  # deflated: all frames count as pixels
def test_all_frames_count_against_the_byte_cap_before_decoding(tmp_path, monkeypatch, syntax):
    ds = image_dataset(np.stack([colour()] * 3), photometric="RGB")  # 3 frames of 64 x 48 RGB: 27648 bytes
    if syntax is not None:
        ds.compress(syntax, generate_instance_uid=False)
    path = save(ds, tmp_path / "frames.dcm")
    assert decode_image(path, size=SIZE, max_pixels=27648 // 6).shape == (SIZE, SIZE, 3)
    monkeypatch.setattr(Dataset, "pixel_array", property(lambda self: pytest.fail("pixels were decoded")))
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(path, size=SIZE, max_pixels=27648 // 6 - 1)
    assert str(info.value).startswith(
        f"{path}: DICOM pixel data of 3 frame(s) of 64 x 48 pixels, 3 sample(s) of 8 bits = 27 KiB, past the 27 KiB cap"
    )


# ----------------------------------------------------------------- codestreams


@pytest.mark.parametrize(("syntax", "marker", "broken"), [
    (JPEGLSLossless, b"\xff\xf7", b"\xff\xfe"),  # SOF55 turned into a comment segment
    (JPEG2000Lossless, b"\xff\x4f\xff\x51", b"\xff\x4f\xff\x00"),  # SOC + SIZ, SIZ gone
], ids=["jpeg-ls", "jpeg2000"])
def test_a_codestream_whose_size_cannot_be_read_is_refused_not_passed(tmp_path, no_pixel_decoding, syntax, marker, broken):
    needs_encoder(syntax)
    ds = image_dataset(textured(48, 64), bits_stored=12)
    ds.compress(syntax, generate_instance_uid=False)
    assert ds.PixelData.count(marker) >= 1
    ds.PixelData = ds.PixelData.replace(marker, broken, 1)
    path = save(ds, tmp_path / "unsized.dcm")
    with pytest.raises(DataError, match=r"compressed frame whose size cannot be established \(no JPEG frame header") as info:
        decode_image(path, size=SIZE)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(path))


def test_a_codestream_with_more_components_than_the_header_is_refused(tmp_path, no_pixel_decoding):
    needs_encoder(JPEG2000Lossless)
    ds = image_dataset(colour(), photometric="RGB")
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    del ds.PlanarConfiguration
    path = save(ds, tmp_path / "components.dcm")
    with pytest.raises(DataError, match=r"compressed frame with more components than its header \(3, the header says 1"):
        decode_image(path, size=SIZE)


def test_a_deflate_bomb_behind_a_decoy_command_element_is_refused(tmp_path):
    """Bytes that are both a group-0000 element (which pydicom skips before it inflates) and a
    tiny complete deflate stream: the check must inflate from where pydicom does, not before."""
    # tag (0000,FF01), implicit VR length 510 = a stored deflate block of 256 bytes, then a final empty one
    decoy = bytearray(8 + 510)
    decoy[0:8] = b"\x00\x00\x01\xff\xfe\x01\x00\x00"
    decoy[261:266] = b"\x01\x00\x00\xff\xff"
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    assert len(inflater.decompress(bytes(decoy))) == 256 and inflater.eof  # a complete, harmless stream
    path = tmp_path / "decoy.dcm"
    path.write_bytes(padded_deflated(64, 64, 64 << 20, between=bytes(decoy)))
    error, elapsed, peak = measured(lambda: decode_image(path, size=SIZE))
    assert isinstance(error, DataError), "the bomb was inflated and decoded"
    assert "deflated DICOM expands beyond what its header declares (64 x 64 pixels" in str(error)
    assert elapsed < 1.0 and peak < 20 * 2**20
