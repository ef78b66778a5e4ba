"""Multi-label CSV manifests (medtransfer.data.manifest, through discover_data): NIH's
``Finding Labels`` column, CheXpert's one column per finding with uncertain labels, MIMIC-CXR
paths, the options that choose findings and views, and the split-file round trip.

Discovery does not decode images (except DICOM headers), so the image files here are a few
placeholder bytes.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from medtransfer.data.discover import Record, discover_data
from medtransfer.data.split import read_split_csv, write_split_csv
from medtransfer.errors import ConfigError, DataError
from medtransfer.task import MULTI_LABEL, SINGLE_LABEL

NAN = math.nan


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG placeholder")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def by_name(records: list[Record]) -> dict[str, Record]:
    return {r.path.name: r for r in records}


def assert_targets(found, expected: dict[str, list[float]]) -> None:
    """Each image's target row (1 / 0 / NaN) in the task's finding order, NaN compared as NaN."""
    names = [r.path.name for r in found.records]
    targets = found.task.targets([r.label for r in found.records], [r.masked for r in found.records])
    assert sorted(names) == sorted(expected)
    for name, row in zip(names, targets):
        np.testing.assert_array_equal(row, np.asarray(expected[name], dtype=np.float32), err_msg=name)


# -- NIH ChestX-ray14: a Finding Labels column -----------------------------------------------------

NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position"]
NIH_ROWS = [
    ["00000001_000.png", "Cardiomegaly", "0", "1", "58", "M", "PA"],
    ["00000001_001.png", "Cardiomegaly|Emphysema", "1", "1", "58", "M", "PA"],
    ["00000002_000.png", "No Finding", "0", "2", "81", "M", "PA"],
    ["00000061_012.png", "Effusion|Mass", "12", "61", "77", "M", "AP"],
]


@pytest.fixture
def nih(tmp_path: Path) -> Path:
    """NIH's layout: the CSV beside images_001/images/ and images_002/images/, bare names in the CSV."""
    root = tmp_path / "nih"
    for i, row in enumerate(NIH_ROWS):
        touch(root / f"images_00{1 + i // 2}" / "images" / row[0])
    return write_csv(root / "Data_Entry_2017.csv", NIH_HEADER, NIH_ROWS)


def test_nih_findings_are_the_sorted_union_and_targets_are_exact(nih, tmp_path):
    found = discover_data(nih, salt_dir=tmp_path / "salt")
    assert found.task.kind == MULTI_LABEL
    assert found.task.classes == ("Cardiomegaly", "Effusion", "Emphysema", "Mass")
    records = by_name(found.records)
    assert records["00000002_000.png"].label == ""  # No Finding: none present
    assert records["00000001_001.png"].label == "Cardiomegaly|Emphysema"
    assert all(r.masked == () for r in found.records)  # a labels column leaves nothing unknown
    assert_targets(found, {
        "00000001_000.png": [1, 0, 0, 0],
        "00000001_001.png": [1, 0, 1, 0],
        "00000002_000.png": [0, 0, 0, 0],
        "00000061_012.png": [0, 1, 0, 1],
    })


def test_nih_bare_names_are_found_in_nested_image_folders(nih, tmp_path):
    found = discover_data(nih, salt_dir=tmp_path / "salt")
    for record in found.records:
        assert record.path.is_file(), record.path
        assert record.path.parent.name == "images" and record.path.parent.parent.name.startswith("images_00")


def test_nih_patient_comes_from_the_patient_id_column(nih, tmp_path):
    found = discover_data(nih, salt_dir=tmp_path / "salt")
    assert {n: r.patient_id for n, r in by_name(found.records).items()} == {
        "00000001_000.png": "1", "00000001_001.png": "1", "00000002_000.png": "2", "00000061_012.png": "61",
    }
    assert dict(found.patient_rules) == {"csv": 4}


def test_nih_without_patient_column_uses_the_file_name_rule(tmp_path):
    root = tmp_path / "nih"
    rows = [[r[0], r[1]] for r in NIH_ROWS]
    for row in rows:
        touch(root / "images_001" / "images" / row[0])
    found = discover_data(write_csv(root / "labels.csv", ["Image Index", "Finding Labels"], rows), salt_dir=tmp_path / "salt")
    patients = {n: r.patient_id for n, r in by_name(found.records).items()}
    assert patients["00000061_012.png"] == "00000061"
    assert patients["00000001_000.png"] == patients["00000001_001.png"] == "00000001"
    assert dict(found.patient_rules) == {"nih": len(rows)}


def test_nih_view_position_column_gives_the_view(nih, tmp_path):
    found = discover_data(nih, salt_dir=tmp_path / "salt")
    assert {r.view for r in found.records} == {"frontal"}  # PA and AP are both frontal
    with pytest.raises(DataError, match=r"--views lateral.*views found: frontal"):
        discover_data(nih, views=["lateral"], salt_dir=tmp_path / "salt")


@pytest.mark.parametrize(
    ("findings", "classes", "row_61"),
    [
        (["Mass", "Cardiomegaly"], ("Mass", "Cardiomegaly"), "Mass"),  # chosen and ordered; Effusion dropped
        (["Effusion"], ("Effusion",), "Effusion"),
    ],
)
def test_nih_findings_option_chooses_and_orders(nih, tmp_path, findings, classes, row_61):
    found = discover_data(nih, findings=findings, salt_dir=tmp_path / "salt")
    assert found.task.classes == classes
    assert by_name(found.records)["00000061_012.png"].label == row_61


def test_nih_findings_option_refuses_a_finding_that_never_appears(nih, tmp_path):
    with pytest.raises(ConfigError, match=r"--findings: Pneumonia never appear.*Cardiomegaly, Effusion, Emphysema, Mass"):
        discover_data(nih, findings=["Pneumonia"], salt_dir=tmp_path / "salt")


def test_labels_column_names_another_column(tmp_path):
    touch(tmp_path / "a.png"), touch(tmp_path / "b.png")
    manifest = write_csv(tmp_path / "m.csv", ["path", "dx", "patient_id"], [["a.png", "Mass|Nodule", "p1"], ["b.png", "", "p2"]])
    found = discover_data(manifest, labels_column="DX", salt_dir=tmp_path / "salt")  # matched without case
    assert found.task == found.task.__class__(MULTI_LABEL, ("Mass", "Nodule"))
    assert [r.label for r in found.records] == ["Mass|Nodule", ""]
    with pytest.raises(ConfigError, match=r"--labels-column 'diagnosis': no such column.*path, dx, patient_id"):
        discover_data(manifest, labels_column="diagnosis", salt_dir=tmp_path / "salt")


# -- CheXpert: one column per finding, 1 / 0 / -1 / blank -------------------------------------------

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Cardiomegaly", "Edema", "Pleural Effusion"]
# patient, study, file, view value, labels (No Finding, Cardiomegaly, Edema, Pleural Effusion)
CHEXPERT_ROWS = [
    ("patient00001", "study1", "view1_frontal.jpg", "Frontal", "AP", ["1.0", "", "", "0.0"]),
    ("patient00001", "study1", "view2_lateral.jpg", "Lateral", "", ["1.0", "", "", "0.0"]),
    ("patient00002", "study1", "view1_frontal.jpg", "Frontal", "PA", ["", "-1.0", "1.0", ""]),
    ("patient00002", "study2", "view1_frontal.jpg", "Frontal", "AP", ["", "1.0", "-1.0", "1.0"]),
    ("patient00003", "study1", "view2_lateral.jpg", "Lateral", "", ["0.0", "0.0", "1.0", "-1.0"]),
]
DATASET = "CheXpert-v1.0-small"


def chexpert_csv(tmp_path: Path, rows=CHEXPERT_ROWS, *, view_column: bool = True) -> Path:
    """The tree CheXpert ships, its CSV inside the dataset folder with paths starting with that folder's name."""
    folder = tmp_path / DATASET
    lines = []
    for patient, study, name, view, ap_pa, labels in rows:
        relative = f"train/{patient}/{study}/{name}"
        touch(folder / relative)
        meta = [view, ap_pa] if view_column else []
        lines.append([f"{DATASET}/{relative}", "Female", "68", *meta, *labels])
    header = CHEXPERT_HEADER if view_column else [h for h in CHEXPERT_HEADER if h not in ("Frontal/Lateral", "AP/PA")]
    return write_csv(folder / "train.csv", header, lines)


def key(record: Record) -> str:
    """patientNNNNN/studyK/viewN_x.jpg"""
    return "/".join(record.path.parts[-3:])


def test_chexpert_paths_resolve_and_patients_come_from_the_patient_folders(tmp_path):
    found = discover_data(chexpert_csv(tmp_path), salt_dir=tmp_path / "salt")
    assert found.task.classes == ("Cardiomegaly", "Edema", "Pleural Effusion")  # column order
    for record in found.records:
        assert record.path.is_file(), record.path
        assert record.path.parts[-4] == "train" and record.path.parts[-5] == DATASET
        assert record.patient_id == record.path.parts[-3]
    assert [r.patient_id for r in found.records].count("patient00001") == 2
    assert dict(found.patient_rules) == {"chexpert": len(CHEXPERT_ROWS)}


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        # uncertain (-1) -> 1, 0 or unknown; blank is unknown under every policy
        ("ones", {"patient00002/study1/view1_frontal.jpg": [1, 1, NAN],
                  "patient00002/study2/view1_frontal.jpg": [1, 1, 1],
                  "patient00003/study1/view2_lateral.jpg": [0, 1, 1]}),
        ("zeros", {"patient00002/study1/view1_frontal.jpg": [0, 1, NAN],
                   "patient00002/study2/view1_frontal.jpg": [1, 0, 1],
                   "patient00003/study1/view2_lateral.jpg": [0, 1, 0]}),
        ("ignore", {"patient00002/study1/view1_frontal.jpg": [NAN, 1, NAN],
                    "patient00002/study2/view1_frontal.jpg": [1, NAN, 1],
                    "patient00003/study1/view2_lateral.jpg": [0, 1, NAN]}),
    ],
)
def test_chexpert_uncertain_policies(tmp_path, policy, expected):
    found = discover_data(chexpert_csv(tmp_path), uncertain=policy, salt_dir=tmp_path / "salt")
    targets = found.task.targets([r.label for r in found.records], [r.masked for r in found.records])
    rows = {key(r): row for r, row in zip(found.records, targets)}
    for name, row in expected.items():
        np.testing.assert_array_equal(rows[name], np.asarray(row, dtype=np.float32), err_msg=f"{policy}: {name}")
    # the same blanks are unknown whatever the policy
    np.testing.assert_array_equal(rows["patient00001/study1/view1_frontal.jpg"], np.asarray([NAN, NAN, 0], np.float32))


def test_chexpert_record_lists_present_and_masked_findings(tmp_path):
    found = discover_data(chexpert_csv(tmp_path), uncertain="ignore", salt_dir=tmp_path / "salt")
    record = {key(r): r for r in found.records}["patient00002/study2/view1_frontal.jpg"]
    assert record.label == "Cardiomegaly|Pleural Effusion"
    assert record.masked == ("Edema",)
    nothing = {key(r): r for r in found.records}["patient00001/study1/view1_frontal.jpg"]
    assert (nothing.label, nothing.masked) == ("", ("Cardiomegaly", "Edema"))


def test_chexpert_no_finding_column_is_not_a_finding(tmp_path):
    """A 'No Finding' label means none (task.split_findings): as an output it would always read 0."""
    manifest = chexpert_csv(tmp_path)
    assert "No Finding" not in discover_data(manifest, salt_dir=tmp_path / "salt").task.classes
    with pytest.raises(ConfigError, match=r"--findings: 'No Finding' means none of the findings.*Cardiomegaly, Edema"):
        discover_data(manifest, findings=["Edema", "no finding"], salt_dir=tmp_path / "salt")


def test_unknown_uncertain_policy_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"--uncertain: got 'maybe'; choose one of ones, zeros, ignore"):
        discover_data(chexpert_csv(tmp_path), uncertain="maybe", salt_dir=tmp_path / "salt")


def test_chexpert_findings_option_orders_and_matches_without_case(tmp_path):
    found = discover_data(chexpert_csv(tmp_path), findings=["pleural effusion", "Edema"], salt_dir=tmp_path / "salt")
    assert found.task.classes == ("Pleural Effusion", "Edema")  # the column's own spelling, the user's order
    assert {key(r): r.label for r in found.records}["patient00002/study1/view1_frontal.jpg"] == "Edema"


def test_chexpert_unknown_finding_lists_the_finding_columns(tmp_path):
    with pytest.raises(ConfigError) as raised:
        discover_data(chexpert_csv(tmp_path), findings=["Edema", "Pneumothorax"], salt_dir=tmp_path / "salt")
    message = str(raised.value)
    assert "--findings" in message and "'Pneumothorax'" in message
    assert "finding columns: Cardiomegaly, Edema, Pleural Effusion" in message
    assert "Age" not in message.split("finding columns:")[1]  # metadata is not offered as a finding


def test_a_value_outside_the_codes_names_line_and_column(tmp_path):
    rows = list(CHEXPERT_ROWS)
    rows[2] = (*rows[2][:5], ["", "2", "1.0", ""])  # the fourth line of the file
    with pytest.raises(DataError, match=r"train\.csv, line 4: column 'Cardiomegaly' holds '2'; expected 1, 0, -1"):
        discover_data(chexpert_csv(tmp_path, rows), findings=["Cardiomegaly", "Edema"], salt_dir=tmp_path / "salt")


def test_views_frontal_keeps_only_frontal_images(tmp_path):
    manifest = chexpert_csv(tmp_path)
    everything = discover_data(manifest, salt_dir=tmp_path / "salt")
    assert {r.view for r in everything.records} == {"frontal", "lateral"}
    found = discover_data(manifest, views=["frontal"], salt_dir=tmp_path / "salt")
    assert sorted(key(r) for r in found.records) == [
        "patient00001/study1/view1_frontal.jpg",
        "patient00002/study1/view1_frontal.jpg",
        "patient00002/study2/view1_frontal.jpg",
    ]
    assert {r.view for r in found.records} == {"frontal"}


def test_views_come_from_file_names_without_a_view_column(tmp_path):
    found = discover_data(chexpert_csv(tmp_path, view_column=False), views=["lateral"], salt_dir=tmp_path / "salt")
    assert sorted(r.path.name for r in found.records) == ["view2_lateral.jpg", "view2_lateral.jpg"]


def test_views_on_data_that_says_nothing_about_views_is_refused(nih, tmp_path):
    rows = [[r[0], r[1]] for r in NIH_ROWS]  # no View Position column, NIH file names
    manifest = write_csv(nih.parent / "noview.csv", ["Image Index", "Finding Labels"], rows)
    with pytest.raises(DataError, match=r"--views lateral: .* says nothing about views.*leave --views out"):
        discover_data(manifest, views=["lateral"], salt_dir=tmp_path / "salt")


# -- MIMIC-CXR paths ------------------------------------------------------------------------------


def test_mimic_paths_give_the_patient_folder(tmp_path):
    paths = [
        "files/p10/p10000032/s50414267/02aa804e-bde0afdd.jpg",
        "files/p10/p10000032/s53189527/2a2277a9-b0ded155.jpg",
        "files/p11/p11000011/s51029426/174413ec-4ec4c1f7.jpg",
    ]
    for path in paths:
        touch(tmp_path / "mimic" / path)
    manifest = write_csv(
        tmp_path / "mimic" / "mimic.csv", ["path", "Atelectasis", "Edema"], [[paths[0], "1.0", ""], [paths[1], "-1.0", "0.0"], [paths[2], "", "1.0"]]
    )
    found = discover_data(manifest, salt_dir=tmp_path / "salt")
    assert [r.patient_id for r in found.records] == ["p10000032", "p10000032", "p11000011"]
    assert dict(found.patient_rules) == {"mimic": 3}
    assert found.task.classes == ("Atelectasis", "Edema")


# -- single-label CSVs stay single-label -------------------------------------------------------------


def test_a_path_label_csv_is_single_label(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        touch(tmp_path / name)
    # numeric class names must not make 'label' look like a finding column
    manifest = write_csv(tmp_path / "m.csv", ["path", "label", "flag"], [["a.png", "1", "0"], ["b.png", "0", "1"], ["c.png", "1", ""]])
    found = discover_data(manifest, salt_dir=tmp_path / "salt")
    assert found.task.kind == SINGLE_LABEL and found.task.classes == ("0", "1")
    assert [r.label for r in found.records] == ["1", "0", "1"] and all(r.masked == () for r in found.records)


def test_a_csv_without_any_labels_says_how_to_label_it(tmp_path):
    touch(tmp_path / "a.png")
    manifest = write_csv(tmp_path / "m.csv", ["path", "Age"], [["a.png", "44"]])
    with pytest.raises(DataError, match="label"):
        discover_data(manifest, salt_dir=tmp_path / "salt")


# -- the split file keeps multi-label records ---------------------------------------------------------


def test_split_csv_round_trip_keeps_empty_labels_masked_findings_and_views(tmp_path):
    found = discover_data(chexpert_csv(tmp_path), uncertain="ignore", salt_dir=tmp_path / "salt")
    records = [Record(r.path, r.label, r.patient_id, "train" if i % 2 else "test", r.masked, r.view) for i, r in enumerate(found.records)]
    assert any(r.label == "" for r in records) and any(len(r.masked) > 1 for r in records)
    write_split_csv(records, tmp_path / "split.csv")
    back = read_split_csv(tmp_path / "split.csv")
    assert [(r.label, r.masked, r.view, r.patient_id, r.split) for r in back] == [
        (r.label, r.masked, r.view, r.patient_id, r.split) for r in records
    ]
    before = found.task.targets([r.label for r in records], [r.masked for r in records])
    after = found.task.targets([r.label for r in back], [r.masked for r in back])
    np.testing.assert_array_equal(before, after)


def test_error_lines_count_blank_lines_in_the_file(tmp_path):
    touch(tmp_path / "a.png"), touch(tmp_path / "b.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,Mass,Edema\na.png,1,0\n\n,,\nb.png,2,0\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"m\.csv, line 5: column 'Mass' holds '2'"):
        discover_data(manifest, findings=["Mass", "Edema"], salt_dir=tmp_path / "salt")
    manifest.write_text("path,Mass,Edema\na.png,1,0\n\na.png,0,0\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"m\.csv, line 4: a\.png is listed again \(first on line 2\)"):
        discover_data(manifest, salt_dir=tmp_path / "salt")
