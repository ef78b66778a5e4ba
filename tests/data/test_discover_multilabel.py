"""discover_data beyond the CSV layouts: where patient IDs come from (naming rules, DICOM
PatientID as a salted hash, the warning when no rule fired), views from DICOM tags, and the
options that belong to one task kind only."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmwrite
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from rich.console import Console

from medtransfer.config import TrainConfig
from medtransfer.data.discover import discover_data
from medtransfer.errors import ConfigError, DataError
from medtransfer.task import MULTI_LABEL, SINGLE_LABEL
from medtransfer.train.labelled import discover_task


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG placeholder")
    return path


def write_dicom(path: Path, **tags) -> Path:
    """A tiny 8-bit DICOM image with the given header tags."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.set_pixel_data(np.arange(64, dtype=np.uint8).reshape(8, 8), "MONOCHROME2", 8, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcmwrite(path, ds, enforce_file_format=True)
    return path


def run_discover_task(config: TrainConfig) -> tuple[object, str]:
    out = io.StringIO()
    found = discover_task(config, Console(file=out, width=400, color_system=None))
    return found, out.getvalue()


# -- the warning when no naming rule fires ------------------------------------------------------------


@pytest.fixture
def unnamed(tmp_path: Path) -> Path:
    """Class folders whose file names follow no known dataset's naming."""
    root = tmp_path / "scans"
    for cls in ("NORMAL", "PNEUMONIA"):
        for i in range(4):
            touch(root / cls / f"img_{cls[0]}{i:03d}.png")
    return root


def test_no_naming_rule_warns_and_names_the_fix(unnamed, tmp_path):
    found, printed = run_discover_task(TrainConfig(data=str(unnamed), cache_dir=str(tmp_path / "cache")))
    assert dict(found.patient_rules) == {"none": 8}
    assert "Patient IDs: file name (8 images)" in printed
    assert "Warning:" in printed and "no naming rule matched 8 of 8 images" in printed
    assert "--patient-regex" in printed and "patient_id column" in printed
    assert all(r.patient_id == r.path.stem for r in found.records)  # each image its own patient


def test_no_naming_rule_fails_under_strict(unnamed, tmp_path):
    with pytest.raises(DataError, match=r"--strict: Patient IDs: no naming rule matched.*--patient-regex"):
        run_discover_task(TrainConfig(data=str(unnamed), cache_dir=str(tmp_path / "cache"), strict=True))


def test_patient_regex_silences_the_warning(unnamed, tmp_path):
    config = TrainConfig(data=str(unnamed), cache_dir=str(tmp_path / "cache"), patient_regex=r"^img_(\w)", strict=True)
    found, printed = run_discover_task(config)
    assert dict(found.patient_rules) == {"regex": 8} and "Warning" not in printed
    assert {r.patient_id for r in found.records} == {"N", "P"}


def test_kermany_names_do_not_warn(tmp_path):
    root = tmp_path / "chest_xray"
    for name in ("IM-0115-0001.jpeg", "IM-0117-0001.jpeg", "NORMAL2-IM-0427-0001.jpeg"):
        touch(root / "NORMAL" / name)
    for name in ("person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg", "person3_virus_7.jpeg"):
        touch(root / "PNEUMONIA" / name)
    found, printed = run_discover_task(TrainConfig(data=str(root), cache_dir=str(tmp_path / "cache"), strict=True))
    assert dict(found.patient_rules) == {"kermany": 6}
    assert "Patient IDs: Kermany file names (6 images)" in printed and "Warning" not in printed
    assert {r.path.name: r.patient_id for r in found.records}["person1_bacteria_2.jpeg"] == "person1_bacteria"


# -- DICOM PatientID and ViewPosition ---------------------------------------------------------------------


@pytest.fixture
def dicom_tree(tmp_path: Path) -> Path:
    root = tmp_path / "dicom"
    write_dicom(root / "NORMAL" / "a1.dcm", PatientID="ALICE", ViewPosition="PA")
    write_dicom(root / "NORMAL" / "a2.dcm", PatientID="ALICE", ViewPosition="LATERAL")
    write_dicom(root / "PNEUMONIA" / "b1.dcm", PatientID="BOB", ViewPosition="AP")
    write_dicom(root / "PNEUMONIA" / "b2.dcm", PatientID="BOB", ViewPosition="LL")
    return root


def patients(found) -> dict[str, str]:
    return {r.path.name: r.patient_id for r in found.records}


def test_dicom_patient_ids_are_salted_hashes_grouping_one_patient(dicom_tree, tmp_path):
    found = discover_data(dicom_tree, salt_dir=tmp_path / "salt")
    ids = patients(found)
    for patient in ids.values():
        assert patient.startswith("pid-") and len(patient) == 20
        assert "ALICE" not in patient.upper() and "BOB" not in patient.upper()
    assert ids["a1.dcm"] == ids["a2.dcm"] != ids["b1.dcm"] == ids["b2.dcm"]
    assert dict(found.patient_rules) == {"dicom": 4}
    assert found.task.kind == SINGLE_LABEL and found.task.classes == ("NORMAL", "PNEUMONIA")


def test_dicom_hashes_are_stable_per_salt_folder_and_differ_across(dicom_tree, tmp_path):
    first = patients(discover_data(dicom_tree, salt_dir=tmp_path / "salt"))
    again = patients(discover_data(dicom_tree, salt_dir=tmp_path / "salt"))
    other = patients(discover_data(dicom_tree, salt_dir=tmp_path / "other-salt"))
    assert first == again
    assert set(first.values()).isdisjoint(other.values())
    assert other["a1.dcm"] == other["a2.dcm"]


def test_dicom_views_come_from_the_view_position_tag(dicom_tree, tmp_path):
    found = discover_data(dicom_tree, salt_dir=tmp_path / "salt")
    assert {r.path.name: r.view for r in found.records} == {
        "a1.dcm": "frontal", "a2.dcm": "lateral", "b1.dcm": "frontal", "b2.dcm": "lateral",
    }
    frontal = discover_data(dicom_tree, views=["frontal"], salt_dir=tmp_path / "salt")
    assert sorted(r.path.name for r in frontal.records) == ["a1.dcm", "b1.dcm"]


def test_dicom_views_in_a_multilabel_csv_come_from_the_tag(tmp_path):
    root = tmp_path / "mixed"
    write_dicom(root / "x" / "1.dcm", PatientID="ALICE", ViewPosition="PA")
    write_dicom(root / "x" / "2.dcm", PatientID="ALICE", ViewPosition="LATERAL")
    write_dicom(root / "x" / "3.dcm", PatientID="BOB", ViewPosition="AP")
    with (root / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["path", "Edema", "Mass"], ["x/1.dcm", "1", "0"], ["x/2.dcm", "1", "0"], ["x/3.dcm", "0", "-1"]])
    found = discover_data(root / "labels.csv", views=["frontal"], salt_dir=tmp_path / "salt")
    assert found.task.kind == MULTI_LABEL
    assert sorted(r.path.name for r in found.records) == ["1.dcm", "3.dcm"]
    assert all(r.patient_id.startswith("pid-") for r in found.records)
    assert dict(found.patient_rules) == {"dicom": 3}


def test_dicom_without_patient_id_falls_back_to_the_naming_rules(tmp_path):
    root = tmp_path / "dicom"
    write_dicom(root / "A" / "00000061_001.dcm", ViewPosition="PA")
    write_dicom(root / "B" / "00000062_000.dcm", PatientID="  ", ViewPosition="PA")
    found = discover_data(root, salt_dir=tmp_path / "salt")
    assert patients(found) == {"00000061_001.dcm": "00000061", "00000062_000.dcm": "00000062"}
    assert dict(found.patient_rules) == {"nih": 2}


# -- options that belong to one task kind -------------------------------------------------------------


@pytest.fixture
def kermany(tmp_path: Path) -> Path:
    root = tmp_path / "chest_xray"
    touch(root / "NORMAL" / "IM-0115-0001.jpeg")
    touch(root / "PNEUMONIA" / "person1_bacteria_1.jpeg")
    touch(root / "PNEUMONIA" / "person2_virus_3.jpeg")
    return root


@pytest.fixture
def multilabel_csv(tmp_path: Path) -> Path:
    touch(tmp_path / "ml" / "a.png"), touch(tmp_path / "ml" / "b.png")
    path = tmp_path / "ml" / "labels.csv"
    path.write_text("path,labels\na.png,Mass|Edema\nb.png,No Finding\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"labels_column": "Finding Labels"}, "--labels-column and --findings describe a multi-label CSV"),
        ({"findings": ["Mass"]}, "--labels-column and --findings describe a multi-label CSV"),
    ],
)
def test_multilabel_options_on_class_folders_are_refused(kermany, tmp_path, options, words):
    with pytest.raises(ConfigError, match=words):
        discover_data(kermany, salt_dir=tmp_path / "salt", **options)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"labels": "kermany-3class"}, "--labels kermany-3class and --class-map apply to single-label classes"),
        ({"class_map": {"Mass": "Nodule"}}, "--labels kermany-3class and --class-map apply to single-label classes"),
    ],
)
def test_single_label_options_on_multilabel_data_are_refused(multilabel_csv, tmp_path, options, words):
    with pytest.raises(ConfigError, match=words):
        discover_data(multilabel_csv, salt_dir=tmp_path / "salt", **options)


def test_kermany_3class_still_applies_to_class_folders(kermany, tmp_path):
    found = discover_data(kermany, labels="kermany-3class", salt_dir=tmp_path / "salt")
    assert found.task.classes == ("BACTERIA", "NORMAL", "VIRUS")


def test_task_option_must_match_the_data(multilabel_csv, tmp_path):
    found, _ = run_discover_task(TrainConfig(data=str(multilabel_csv), cache_dir=str(tmp_path / "cache"), task="multi-label"))
    assert found.task.classes == ("Edema", "Mass")
    with pytest.raises(ConfigError, match=r"--task single-label: .* holds multi-label data"):
        run_discover_task(TrainConfig(data=str(multilabel_csv), cache_dir=str(tmp_path / "cache"), task="single-label"))


def test_views_option_reaches_discovery_through_the_config(dicom_tree, tmp_path):
    config = TrainConfig(data=str(dicom_tree), cache_dir=str(tmp_path / "cache"), views=["lateral"])
    found, printed = run_discover_task(config)
    assert sorted(r.path.name for r in found.records) == ["a2.dcm", "b2.dcm"]
    assert "DICOM PatientID (salted hash)" in printed


@pytest.mark.parametrize(
    ("rows", "kind"),
    [
        ([["path", "patient_id", "Edema"], ["1.dcm", "p1", "1"], ["2.dcm", "p1", "0"], ["3.dcm", "p2", "1"]], MULTI_LABEL),
        ([["path", "label", "patient_id"], ["1.dcm", "A", "p1"], ["2.dcm", "B", "p1"], ["3.dcm", "B", "p2"]], SINGLE_LABEL),
    ],
)
def test_dicom_views_are_read_when_a_csv_column_gives_the_patient(tmp_path, rows, kind):
    root = tmp_path / "csv"
    for name, view in (("1.dcm", "PA"), ("2.dcm", "LATERAL"), ("3.dcm", "AP")):
        write_dicom(root / name, PatientID="ALICE", ViewPosition=view)
    with (root / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    found = discover_data(root / "labels.csv", views=["frontal"], salt_dir=tmp_path / "salt")
    assert found.task.kind == kind
    assert [(r.path.name, r.patient_id, r.view) for r in found.records] == [("1.dcm", "p1", "frontal"), ("3.dcm", "p2", "frontal")]
    assert dict(found.patient_rules) == {"csv": 3}
