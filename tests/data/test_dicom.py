"""DICOM radiographs: modality LUT, window, MONOCHROME1 inversion, and discovery next to JPEG/PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medtransfer.data.cache import CacheSettings, ImageCache, decode_image
from medtransfer.data.discover import discover


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
    from medtransfer.errors import DataError

    path = tmp_path / "broken.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x08\x00\x10\x00garbage")
    with pytest.raises(DataError, match="broken.dcm: not a readable image"):
        decode_image(path, size=16)
