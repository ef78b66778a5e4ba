"""Patient IDs and views (medtransfer.data.patients) and the DICOM header reader
(medtransfer.data.dicom.read_dicom_header): naming rules per dataset, the salted DICOM
PatientID, the per-machine salt, view values, --views, and the lines the user is told."""

from __future__ import annotations

import logging
import os
import re
import stat
import tracemalloc
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from medtransfer.data.dicom import DicomHeader, read_dicom_header
from medtransfer.data.patients import (
    PATIENT_RULES,
    RULE_LABELS,
    SALT_FILE,
    VIEW_CHOICES,
    check_views,
    dicom_patient_id,
    local_salt,
    normalise_view,
    patient_grouping_warning,
    patient_id_from_path,
    rules_summary,
    salted_patient_id,
    view_from_path,
)
from medtransfer.errors import ConfigError, DataError

CLEAR_ID = "MRN-00424242"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # kermany: the existing rules, unchanged
        ("train/PNEUMONIA/person123_bacteria_456.jpeg", ("person123_bacteria", "kermany")),
        ("person447_virus_921_1.jpeg", ("person447_virus", "kermany")),
        ("NORMAL2-IM-0427-0001.jpeg", ("NORMAL2-IM-0427", "kermany")),
        ("IM-0115-0001.jpeg", ("IM-0115", "kermany")),
        ("IM-0555-0001-0001.jpeg", ("IM-0555", "kermany")),
        ("IM-0115.jpeg", ("IM-0115", "none")),  # no image number
        ("person123_bacteria.jpeg", ("person123_bacteria", "none")),
        ("xperson3_bacteria_1.jpeg", ("xperson3_bacteria_1", "none")),  # anchored at the start
        # nih: 8 digits, underscore, 3 digits
        ("images_001/images/00000061_012.png", ("00000061", "nih")),
        ("00030805_000.png", ("00030805", "nih")),
        ("0000061_012.png", ("0000061_012", "none")),  # 7 digits
        ("00000061_0123.png", ("00000061_0123", "none")),  # 4 digits
        ("00000061_012_copy.png", ("00000061_012_copy", "none")),
        # chexpert: a patient<digits> folder, the innermost
        ("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", ("patient00001", "chexpert")),
        ("valid/patient64541/study1/view2_lateral.jpg", ("patient64541", "chexpert")),
        ("patients/patientX/study1/view1_frontal.jpg", ("view1_frontal", "none")),
        ("train/patient00001.jpg", ("patient00001", "none")),  # a file, not a folder
        # mimic: p<8 digits> inside p<2 digits> or above s<digits>
        ("files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg", ("p10000032", "mimic")),
        ("p10000032/s50414267/02aa804e.jpg", ("p10000032", "mimic")),  # root at the group folder
        ("p10/p10000032/02aa804e.jpg", ("p10000032", "mimic")),  # group folder, no study folder
        ("files/p10/02aa804e.jpg", ("02aa804e", "none")),  # p10 is a group, not a patient
        ("files/p10/s50414267/02aa804e.jpg", ("02aa804e", "none")),
        ("export/p10000032/02aa804e.jpg", ("02aa804e", "none")),  # neither group nor study folder
        ("p1/p1000003/s5/x.jpg", ("x", "none")),  # 7 digits
        # none: the stem
        ("scans/img_001.png", ("img_001", "none")),
        ("scan_0042.png", ("scan_0042", "none")),
    ],
)
def test_patient_rules(path, expected):
    assert patient_id_from_path(path) == expected


def test_rule_table_is_ordered_and_every_rule_has_a_label():
    assert [rule.name for rule in PATIENT_RULES] == ["kermany", "nih", "chexpert", "mimic"]
    assert {rule.name for rule in PATIENT_RULES} | {"regex", "dicom", "csv", "none"} <= set(RULE_LABELS)


@pytest.mark.parametrize(
    ("path", "root", "expected"),
    [
        ("/data/patient5/IMG_1.png", "/data/patient5", ("IMG_1", "none")),  # the data folder is no patient
        ("/data/patient5/IMG_1.png", None, ("patient5", "chexpert")),  # why root matters
        ("/data/patient5/train/patient00001/study1/view1_frontal.jpg", "/data/patient5", ("patient00001", "chexpert")),
        ("/mimic/p10/p10000032/s1/a.jpg", "/mimic/p10", ("p10000032", "mimic")),  # s1 follows
        ("/mimic/p10/p10000032/a.jpg", "/mimic/p10", ("a", "none")),  # its group folder is the root
        ("train/patient00001/study1/v.jpg", "/elsewhere", ("patient00001", "chexpert")),  # not under root: as given
    ],
)
def test_rules_see_the_path_relative_to_the_root(path, root, expected):
    assert patient_id_from_path(path, root=root) == expected


def test_relative_root_and_absolute_path_are_compared_as_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image = tmp_path / "patient7" / "scan.png"
    assert patient_id_from_path(image, root="patient7") == ("scan", "none")


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("pat017_view2.png", r"^(pat\d+)_", "pat017"),  # first group
        ("pat017_view2.png", r"pat\d+", "pat017"),  # whole match
        ("person123_bacteria_456.jpeg", r"_(\d+)$", "456"),  # overrides the table
        ("files/p10/p10000032/s1/abc_9.jpg", r"^(abc)_", "abc"),  # stem only, folders ignored
        ("pat017_view2.png", re.compile(r"(pat)(\d+)"), "pat"),
    ],
)
def test_patient_regex_replaces_the_rules(name, pattern, expected):
    assert patient_id_from_path(name, pattern=pattern) == (expected, "regex")


@pytest.mark.parametrize(
    ("pattern", "error", "words"),
    [
        (r"^(pat\d+)_", DataError, [r"--patient-regex '^(pat\d+)_'", "does not match", "'IM-0115-0001.jpeg'"]),
        (r"^(\d*)", DataError, ["--patient-regex", "empty patient ID", "'IM-0115-0001.jpeg'"]),
        ("(unclosed", ConfigError, ["--patient-regex '(unclosed'", "not a valid regular expression"]),
    ],
)
def test_patient_regex_errors_name_option_value_and_file(pattern, error, words):
    with pytest.raises(error) as info:
        patient_id_from_path("x/IM-0115-0001.jpeg", pattern=pattern)
    assert all(word in str(info.value) for word in words), str(info.value)


# -- salted DICOM PatientID ------------------------------------------------------------------


def test_salted_id_is_stable_per_salt_and_hides_the_clear_id():
    a, b = b"a" * 32, b"b" * 32
    first = salted_patient_id(CLEAR_ID, a)
    assert first == salted_patient_id(CLEAR_ID, a)
    assert first != salted_patient_id(CLEAR_ID, b)
    assert first != salted_patient_id(CLEAR_ID + "0", a)
    assert re.fullmatch(r"pid-[0-9a-f]{16}", first)
    assert CLEAR_ID not in first and "00424242" not in first


def test_salted_id_refuses_a_short_salt():
    with pytest.raises(ValueError, match="local_salt"):
        salted_patient_id(CLEAR_ID, b"")


def test_local_salt_is_created_once_private_and_reused(tmp_path):
    cache = tmp_path / "cache"
    salt = local_salt(cache)
    path = cache / SALT_FILE
    assert len(salt) == 32 and path.read_bytes() == salt
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0  # owner only
    before = path.stat().st_mtime_ns
    assert local_salt(cache) == salt and path.stat().st_mtime_ns == before
    assert local_salt(tmp_path / "other") != salt  # another machine (cache), another secret
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_a_damaged_salt_file_is_refused_with_the_fix(tmp_path):
    (tmp_path / SALT_FILE).write_bytes(b"short")
    with pytest.raises(DataError) as info:
        local_salt(tmp_path)
    message = str(info.value)
    assert str(tmp_path / SALT_FILE) in message and "5 bytes, expected 32" in message and "delete it" in message


# -- DICOM header ----------------------------------------------------------------------------


def write_dicom(path: Path, *, syntax=ExplicitVRLittleEndian, preamble: bool = True, **tags) -> Path:
    """A small 8-bit DICOM image written with pydicom, with the given header tags; without
    ``preamble``, the dataset alone (no preamble, no file meta), as some PACS exports are."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian  # set_pixel_data refuses big endian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.set_pixel_data(np.arange(64, dtype=np.uint8).reshape(8, 8), "MONOCHROME2", 8, generate_instance_uid=False)
    meta.TransferSyntaxUID = syntax  # 8-bit pixels: the same bytes in every byte order
    if not preamble:
        ds.preamble, ds.file_meta = None, FileMetaDataset()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pydicom deprecates writing big endian
        dcmwrite(path, ds, enforce_file_format=preamble, implicit_vr=syntax.is_implicit_VR,
                 little_endian=syntax.is_little_endian)
    return path


@pytest.mark.parametrize(
    ("syntax", "preamble"),
    [
        (ExplicitVRLittleEndian, True),
        (ImplicitVRLittleEndian, True),
        (ExplicitVRBigEndian, True),
        (DeflatedExplicitVRLittleEndian, True),
        (ImplicitVRLittleEndian, False),
        (ExplicitVRBigEndian, False),
    ],
)
def test_header_is_read_without_pixels_in_every_encoding(tmp_path, syntax, preamble):
    tags = {"PatientID": f"  {CLEAR_ID} ", "ViewPosition": "AP"}
    path = write_dicom(tmp_path / "a.dcm", syntax=syntax, preamble=preamble, **tags)
    header = read_dicom_header(path)
    assert header == DicomHeader(patient_id=CLEAR_ID, view_position="AP")
    assert CLEAR_ID not in repr(header)


@pytest.mark.parametrize("tags", [{}, {"PatientID": ""}, {"PatientID": "   "}])
def test_absent_or_blank_patient_id_is_none(tmp_path, tags):
    path = write_dicom(tmp_path / "a.dcm", **tags)
    assert read_dicom_header(path) == DicomHeader(patient_id=None, view_position=None)
    assert dicom_patient_id(path, b"s" * 32) is None


def test_dicom_patient_id_is_the_salted_hash_never_the_clear_id(tmp_path, caplog):
    path = write_dicom(tmp_path / "a.dcm", PatientID=CLEAR_ID)
    other = write_dicom(tmp_path / "b.dcm", PatientID=CLEAR_ID)
    salt = local_salt(tmp_path / "cache")
    with caplog.at_level(logging.DEBUG):
        patient = dicom_patient_id(path, salt)
    assert patient == salted_patient_id(CLEAR_ID, salt) == dicom_patient_id(other, salt)
    assert CLEAR_ID not in patient and CLEAR_ID not in caplog.text


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (lambda good: good[: good.find(CLEAR_ID.encode()) + 3], ["ends before the pixel data"]),  # cut inside the ID
        (lambda good: good[:200], ["ends before the pixel data"]),
        (lambda good: b"\0" * 128 + b"DICM" + b"\xff" * 300, ["ends before the pixel data"]),
        (lambda good: b"\xff\xd8\xff\xe0" + b"\0" * 300, ["not DICOM content"]),  # a JPEG
    ],
)
def test_unreadable_header_is_a_data_error_naming_the_file_not_the_id(tmp_path, content, words):
    good = write_dicom(tmp_path / "good.dcm", PatientID=CLEAR_ID).read_bytes()
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(content(good))
    with pytest.raises(DataError) as info:
        read_dicom_header(bad)
    message = str(info.value)
    assert str(bad) in message and all(word in message for word in words) and CLEAR_ID[:7] not in message


def test_truncated_deflated_header_is_refused(tmp_path):
    good = write_dicom(tmp_path / "good.dcm", syntax=DeflatedExplicitVRLittleEndian, PatientID=CLEAR_ID).read_bytes()
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(good[:300])
    with pytest.raises(DataError, match="ends before the pixel data"):
        read_dicom_header(bad)


def test_deflated_header_is_read_without_inflating_the_pixels(tmp_path):
    pixels = np.zeros((4096, 4096), np.uint8)  # 16 MB that deflate to a few KB
    path = write_dicom(tmp_path / "big.dcm", syntax=DeflatedExplicitVRLittleEndian, PatientID=CLEAR_ID)
    ds = dcmread(path)
    ds.set_pixel_data(pixels, "MONOCHROME2", 8, generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dcmwrite(path, ds, enforce_file_format=True)
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        header = read_dicom_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert header.patient_id == CLEAR_ID and peak < 8 << 20


def test_missing_file_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"missing\.dcm: cannot be read"):
        read_dicom_header(tmp_path / "missing.dcm")


# -- views -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        *[(v, "frontal") for v in ("PA", "AP", "AP AXIAL", "AP LLD", "PA LLD", "AP RLD", "Frontal", "ap", " pa ")],
        *[(v, "lateral") for v in ("LATERAL", "LL", "RL", "Lateral", "XTABLE LATERAL")],
        *[(v, None) for v in ("LAO", "RAO", "LPO", "SWIMMERS", "", "  ", None, "UNKNOWN")],  # oblique or unknown
    ],
)
def test_normalise_view(value, expected):
    assert normalise_view(value) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("train/patient00001/study1/view1_frontal.jpg", "frontal"),
        ("train/patient00001/study2/view2_lateral.jpg", "lateral"),
        ("train/patient00001/study2/VIEW3_Frontal.png", "frontal"),
        ("images/00000061_012.png", None),
        ("frontal.jpg", None),
    ],
)
def test_view_from_path(path, expected):
    assert view_from_path(path) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("frontal", ("frontal",)),
        ("frontal,lateral", ("frontal", "lateral")),
        (" Lateral , frontal ", ("lateral", "frontal")),
        ("frontal,frontal", ("frontal",)),
        (["lateral"], ("lateral",)),
    ],
)
def test_check_views(value, expected):
    assert check_views(value) == expected


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("front", ["--views 'front'", "unknown view 'front'"]),
        ("frontal,oblique", ["--views 'frontal,oblique'", "unknown view 'oblique'"]),
        ("", ["--views ''", "no view given"]),
        (" , ", ["no view given"]),
    ],
)
def test_check_views_errors_list_the_choices(value, words):
    with pytest.raises(ConfigError) as info:
        check_views(value)
    message = str(info.value)
    assert all(word in message for word in words) and ", ".join(VIEW_CHOICES) in message, message


# -- what the user is told -------------------------------------------------------------------


def test_warning_fires_when_most_images_match_no_rule_and_patients_are_single():
    ids = [f"img_{i}" for i in range(970)] + ["nih1"] * 10 + ["nih2"] * 10 + [f"img_{i}" for i in range(10)]
    rules = Counter(none=980, nih=20)
    warning = patient_grouping_warning(ids, rules)
    assert warning is not None and "\n" not in warning
    assert warning.startswith("Patient IDs: no naming rule matched 980 of 1,000 images and 98% of patients")  # 960/972
    assert "--patient-regex" in warning and "patient_id column" in warning


@pytest.mark.parametrize(
    ("ids", "rules"),
    [
        (["a", "a", "b", "b", "c"], Counter(none=5)),  # most patients have several images: rule-less but grouped
        ([f"{i:08d}" for i in range(10)], Counter(nih=10)),  # singletons, but a rule fired
        (["a", "b", "c", "d"], Counter(none=1, chexpert=3)),  # none is not the common rule
        (["a", "b", "c", "c", "d", "d"], Counter(none=6)),  # exactly half single: not more than half
        ([], Counter()),
    ],
)
def test_warning_stays_quiet(ids, rules):
    assert patient_grouping_warning(ids, rules) is None


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        (Counter(nih=1000), "Patient IDs: NIH file names (1,000 images)"),
        (Counter(dicom=1), "Patient IDs: DICOM PatientID (salted hash) (1 image)"),
        (Counter(none=20, chexpert=300), "Patient IDs: CheXpert patient folders (300), file name (20)"),
        (Counter(mimic=5, kermany=0), "Patient IDs: MIMIC-CXR patient folders (5 images)"),
        (Counter(), "Patient IDs: no images"),
    ],
)
def test_rules_summary(rules, expected):
    assert rules_summary(rules) == expected
