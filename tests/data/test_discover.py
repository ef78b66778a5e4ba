"""Tests for medtransfer.data.discover: patient IDs, the Kaggle layout, CSV manifests, label schemes."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from medtransfer.data.discover import (
    Record,
    apply_class_map,
    discover,
    kermany_3class_label,
    patient_id_from_name,
)
from medtransfer.errors import ConfigError, DataError

# --------------------------------------------------------------------------- patient IDs


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # Kermany numbers pneumonia patients per infection type: the type is part of the ID.
        ("person123_bacteria_456.jpeg", "person123_bacteria"),
        ("person123_virus_789.jpeg", "person123_virus"),
        ("person1_virus_7.jpeg", "person1_virus"),
        ("person1946_bacteria_4874.jpeg", "person1946_bacteria"),
        ("person447_virus_921_1.jpeg", "person447_virus"),  # a real file name with a copy suffix
        ("person123_bacteria_456.JPEG", "person123_bacteria"),  # upper-case suffix
        ("person123_bacteria.jpeg", "person123_bacteria"),  # no image number: the stem
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0115-0002.jpeg", "IM-0115"),
        ("NORMAL2-IM-0427-0001.jpeg", "NORMAL2-IM-0427"),
        ("NORMAL-IM-0001-0001.png", "NORMAL-IM-0001"),
        ("NORMAL2-IM-0587-0001-0002.jpeg", "NORMAL2-IM-0587"),  # Kaggle's extra copy number
        ("IM-0555-0001-0001.jpeg", "IM-0555"),
        ("some/dir/person7_virus_12.jpeg", "person7_virus"),
        ("scan_0042.png", "scan_0042"),  # unknown naming: the image is its own patient
        ("IM-0115.jpeg", "IM-0115"),  # no image number: not the Kermany rule, so the stem
        ("xperson3_bacteria_1.jpeg", "xperson3_bacteria_1"),  # rules are anchored at the start
    ],
)
def test_patient_id_kermany_rules(name, expected):
    assert patient_id_from_name(name) == expected


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("pat017_view2.png", r"^(pat\d+)_", "pat017"),  # first group
        ("pat017_view2.png", r"pat\d+", "pat017"),  # no group: the whole match
        ("scan-A12-left.png", r"-(\w+?)-", "A12"),  # search, not match: may sit anywhere
        ("person123_bacteria_456.jpeg", r"_(\d+)$", "456"),  # overrides the Kermany rule
        ("pat017_view2.png", re.compile(r"(pat)(\d+)"), "pat"),  # compiled pattern, first group only
    ],
)
def test_patient_regex_override(name, pattern, expected):
    assert patient_id_from_name(name, pattern) == expected


def test_patient_regex_that_does_not_match_names_regex_and_file():
    with pytest.raises(DataError) as info:
        patient_id_from_name("IM-0115-0001.jpeg", r"^(pat\d+)_")
    message = str(info.value)
    assert "--patient-regex" in message and r"^(pat\d+)_" in message and "IM-0115-0001.jpeg" in message


def test_patient_regex_with_empty_capture_is_refused():
    with pytest.raises(DataError, match="empty patient ID"):
        patient_id_from_name("abc.png", r"^(\d*)")


def test_invalid_patient_regex_is_a_config_error():
    with pytest.raises(ConfigError, match=r"--patient-regex '\(unclosed'"):
        patient_id_from_name("abc.png", "(unclosed")


def test_patient_regex_applies_to_discovered_folder(make_kaggle_tree):
    root = make_kaggle_tree(
        {"train": {"A": ["p1_x.png", "p1_y.png", "p2_x.png"], "B": ["p3_x.png", "p3_y.png"]}}
    )
    records = discover(root, patient_regex=r"^(p\d+)_")
    assert Counter(r.patient_id for r in records) == {"p1": 2, "p2": 1, "p3": 2}


def test_patient_regex_not_matching_a_discovered_file(make_kaggle_tree):
    root = make_kaggle_tree({"train": {"A": ["p1_x.png", "odd.png"], "B": ["p3_x.png"]}})
    with pytest.raises(DataError, match="odd.png"):
        discover(root, patient_regex=r"^(p\d+)_")


# --------------------------------------------------------------------------- Kaggle layout


def test_kaggle_layout_records(make_kaggle_tree):
    root = make_kaggle_tree(
        {
            "train": {
                "NORMAL": ["IM-0115-0001.jpeg", ("IM-0115-0002.jpeg", "RGB"), "NORMAL2-IM-0427-0001.png"],
                "PNEUMONIA": ["person1_virus_7.jpeg", ("person1_bacteria_8.png", "RGB"), "person2_bacteria_9.jpeg"],
            },
            "val": {"NORMAL": 1, "PNEUMONIA": 1},
            "test": {"NORMAL": 2, "PNEUMONIA": 2},
        }
    )
    records = discover(root)

    assert all(isinstance(r, Record) for r in records)
    assert Counter((r.split, r.label) for r in records) == {
        ("train", "NORMAL"): 3,
        ("train", "PNEUMONIA"): 3,
        ("val", "NORMAL"): 1,
        ("val", "PNEUMONIA"): 1,
        ("test", "NORMAL"): 2,
        ("test", "PNEUMONIA"): 2,
    }
    by_name = {(r.split, r.path.name): r for r in records}
    first = by_name[("train", "IM-0115-0002.jpeg")]
    assert first.path == root / "train" / "NORMAL" / "IM-0115-0002.jpeg"
    assert first.label == "NORMAL" and first.patient_id == "IM-0115"
    assert by_name[("train", "NORMAL2-IM-0427-0001.png")].patient_id == "NORMAL2-IM-0427"
    assert by_name[("train", "person1_bacteria_8.png")].patient_id == "person1_bacteria"
    assert by_name[("train", "person1_virus_7.jpeg")].patient_id == "person1_virus"  # another child
    # Grayscale and RGB, JPEG and PNG all listed, as they are on disk.
    modes = {Image.open(r.path).mode for r in records}
    formats = {Image.open(r.path).format for r in records}
    assert modes == {"L", "RGB"} and formats == {"JPEG", "PNG"}


def test_classes_are_folder_names_any_number(make_kaggle_tree):
    root = make_kaggle_tree({"train": {"cat": 2, "dog": 2, "emu": 1}, "test": {"cat": 1, "dog": 1, "emu": 1}})
    records = discover(root)
    assert {r.label for r in records} == {"cat", "dog", "emu"}


def test_absent_splits_are_not_listed(make_kaggle_tree):
    root = make_kaggle_tree({"train": {"NORMAL": 2, "PNEUMONIA": 2}})
    assert {r.split for r in discover(root)} == {"train"}


def test_only_test_split_is_allowed_for_external_evaluation(make_kaggle_tree):
    root = make_kaggle_tree({"test": {"NORMAL": 1, "PNEUMONIA": 1}})
    assert {r.split for r in discover(root)} == {"test"}


def test_hidden_files_and_macosx_folders_are_ignored(make_kaggle_tree, make_image):
    root = make_kaggle_tree({"train": {"NORMAL": ["IM-0001-0001.jpeg"], "PNEUMONIA": ["person1_virus_1.jpeg"]}})
    normal = root / "train" / "NORMAL"
    (normal / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    make_image(normal / "._IM-0001-0001.jpeg")  # AppleDouble twin: looks like an image
    make_image(normal / ".hidden" / "IM-0009-0001.jpeg")
    make_image(normal / "__MACOSX" / "IM-0002-0001.jpeg")
    make_image(normal / "__MACOSX" / "deeper" / "still" / "IM-0003-0001.jpeg")
    make_image(root / "__MACOSX" / "train" / "NORMAL" / "._IM-0001-0001.jpeg")
    make_image(root / "train" / "__MACOSX" / "NORMAL" / "IM-0004-0001.jpeg")
    make_image(root / "train" / ".cache" / "IM-0005-0001.jpeg")
    (normal / "notes.txt").write_text("not an image")
    make_image(normal / "more" / "IM-0006-0001.png")  # a visible sub-folder does count

    records = discover(root)

    assert sorted(r.path.name for r in records) == ["IM-0001-0001.jpeg", "IM-0006-0001.png", "person1_virus_1.jpeg"]
    assert {r.label for r in records} == {"NORMAL", "PNEUMONIA"}


def test_uppercase_suffixes_count_as_images(make_kaggle_tree):
    root = make_kaggle_tree({"train": {"A": ["x1.JPG", "x2.PNG"], "B": ["y.Jpeg"]}})
    assert sorted(r.path.name for r in discover(root)) == ["x1.JPG", "x2.PNG", "y.Jpeg"]


# --------------------------------------------------------------------------- plain class folders (ImageFolder)


def test_plain_class_folders_give_records_without_a_split(make_image, tmp_path):
    root = tmp_path / "flat"
    for name in ("IM-0001-0001.jpeg", "IM-0001-0002.jpeg", "IM-0002-0001.png"):
        make_image(root / "NORMAL" / name)
    for name in ("person1_virus_1.jpeg", "person1_bacteria_2.jpeg"):
        make_image(root / "PNEUMONIA" / name)
    make_image(root / "PNEUMONIA" / "deeper" / "person2_virus_3.jpeg")  # nested folders count
    make_image(root / ".hidden" / "x.png")  # hidden and __MACOSX folders are not classes
    make_image(root / "__MACOSX" / "NORMAL" / "._IM-0001-0001.jpeg")
    (root / "labels.txt").write_text("a stray file beside the class folders is ignored")

    records = discover(root)

    assert {r.split for r in records} == {None}
    assert Counter(r.label for r in records) == {"NORMAL": 3, "PNEUMONIA": 3}
    assert Counter(r.patient_id for r in records) == {
        "IM-0001": 2, "IM-0002": 1, "person1_virus": 1, "person1_bacteria": 1, "person2_virus": 1
    }


def test_plain_class_folders_need_two_classes(make_image, tmp_path):
    make_image(tmp_path / "flat" / "NORMAL" / "a.png")
    with pytest.raises(DataError, match=r"found only class \['NORMAL'\]"):
        discover(tmp_path / "flat")


# --------------------------------------------------------------------------- file names


@pytest.mark.parametrize("layout", ["kaggle", "class folders"])
def test_names_with_spaces_and_upper_case_suffixes_are_discovered(make_image, tmp_path, layout):
    root = tmp_path / "my data"
    base = root / "train" if layout == "kaggle" else root
    images = {
        "Normal cases": ["IM-0001-0001.JPG", "scan 2 (copy).PNG", "x ray.JPEG", "IM-0003-0001 .jpeg"],
        "Pneumonia": ["person1_virus_1.Jpeg"],
    }
    for label, files in images.items():
        for name in files:
            make_image(base / label / name)
    # Discovery goes by the suffix; decoding these is the cache's job.
    others = {"another scan.TIFF": b"II*\x00", "Bild 3.BMP": b"BM", "chest 1.DCM": b"\x00" * 128 + b"DICM"}
    for name, content in others.items():
        (base / "Pneumonia" / name).write_bytes(content)

    records = discover(root)

    found = {(r.label, r.path.name) for r in records}
    assert found == {(label, name) for label, files in images.items() for name in files} | {
        ("Pneumonia", name) for name in others
    }
    assert all(r.path.is_file() for r in records)
    patients = {r.path.name: r.patient_id for r in records}
    assert patients["IM-0001-0001.JPG"] == "IM-0001" and patients["person1_virus_1.Jpeg"] == "person1_virus"
    assert patients["scan 2 (copy).PNG"] == "scan 2 (copy)"


# --------------------------------------------------------------------------- class map


def test_apply_class_map_renames_and_merges():
    records = [Record(Path(f"/d/{i}.png"), label, f"p{i}", "train") for i, label in enumerate(["BAC", "VIR", "N", "N"])]
    mapped = apply_class_map(records, {"BAC": "PNEUMONIA", "VIR": "PNEUMONIA", "N": "NORMAL"})
    assert [r.label for r in mapped] == ["PNEUMONIA", "PNEUMONIA", "NORMAL", "NORMAL"]
    assert [(r.path, r.patient_id, r.split) for r in mapped] == [(r.path, r.patient_id, r.split) for r in records]
    # Applied in one step, not chained: A->B and B->A swap the two classes.
    assert [r.label for r in apply_class_map(mapped, {"PNEUMONIA": "NORMAL", "NORMAL": "PNEUMONIA"})] == [
        "NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA"
    ]


def test_apply_class_map_with_unknown_class_lists_the_classes_found():
    records = [Record(Path("/d/a.png"), "NORMAL", "a", "train"), Record(Path("/d/b.png"), "PNEUMONIA", "b", "train")]
    with pytest.raises(ConfigError) as info:
        apply_class_map(records, {"PNEUMONA": "P", "NORMAL": "N"})
    assert str(info.value) == "--class-map: class 'PNEUMONA' does not exist; classes found: NORMAL, PNEUMONIA"


def test_discover_applies_the_class_map_before_checking_class_sets(make_kaggle_tree):
    root = make_kaggle_tree(
        {
            "train": {"NORMAL": 2, "BACTERIA": 2, "VIRUS": 1},
            "test": {"NORMAL": 1, "PNEUMONIA": 2},  # test already merged: the map makes the splits agree
        }
    )
    with pytest.raises(DataError, match="every split needs the same class folders"):
        discover(root)
    records = discover(root, class_map={"BACTERIA": "PNEUMONIA", "VIRUS": "PNEUMONIA"})
    assert Counter((r.split, r.label) for r in records) == {
        ("train", "NORMAL"): 2, ("train", "PNEUMONIA"): 3, ("test", "NORMAL"): 1, ("test", "PNEUMONIA"): 2
    }
    with pytest.raises(DataError, match="found only class"):
        discover(root, class_map={"BACTERIA": "NORMAL", "VIRUS": "NORMAL", "PNEUMONIA": "NORMAL"})


def test_class_map_after_kermany_3class_labels(make_kaggle_tree):
    root = make_kaggle_tree({"train": {"NORMAL": 2, "PNEUMONIA": ["person1_virus_1.jpeg", "person2_bacteria_2.jpeg"]}})
    records = discover(root, labels="kermany-3class", class_map={"VIRUS": "VIRAL"})
    assert sorted({r.label for r in records}) == ["BACTERIA", "NORMAL", "VIRAL"]


# --------------------------------------------------------------------------- CSV manifest


def _write_csv(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


@pytest.fixture
def csv_images(tmp_path, make_image):
    """Four images in tmp_path/img: two patients per class."""
    for name in ("a1.png", "a2.png", "b1.png", "b2.png"):
        make_image(tmp_path / "img" / name)
    return tmp_path


def test_csv_manifest_relative_paths_resolve_against_csv_folder(csv_images, tmp_path, monkeypatch):
    manifest = _write_csv(
        csv_images / "list.csv",
        "path,label,patient_id,split\n"
        "img/a1.png,A,p1,train\n"
        "img/a2.png,A,p2,test\n"
        "img/b1.png,B,p3,train\n"
        f"{csv_images / 'img' / 'b2.png'},B,p4,test\n",
    )
    monkeypatch.chdir(tmp_path.parent)  # the working directory must not matter
    records = discover(manifest)
    assert records == [
        Record(csv_images / "img" / "a1.png", "A", "p1", "train"),
        Record(csv_images / "img" / "a2.png", "A", "p2", "test"),
        Record(csv_images / "img" / "b1.png", "B", "p3", "train"),
        Record(csv_images / "img" / "b2.png", "B", "p4", "test"),
    ]
    assert all(r.path.is_file() for r in records)


def test_csv_manifest_optional_columns(csv_images):
    manifest = _write_csv(
        csv_images / "list.csv",
        "path,label\nimg/person5_virus_1.png,B\nimg/IM-0001-0001.png,A\nimg/b1.png,B\nimg/a1.png,A\n",
    )
    records = discover(manifest)
    assert [r.patient_id for r in records] == ["person5_virus", "IM-0001", "b1", "a1"]  # from the names
    assert {r.split for r in records} == {None}


def test_csv_manifest_with_bom_spaces_and_case(csv_images):
    manifest = _write_csv(
        csv_images / "excel.csv", " Path ,Label,Split\nimg/a1.png,A, Train \nimg/b1.png,B,train\n", "utf-8-sig"
    )
    records = discover(manifest)
    assert [(r.path.name, r.label, r.split) for r in records] == [("a1.png", "A", "train"), ("b1.png", "B", "train")]


@pytest.mark.parametrize(
    ("header", "missing"),
    [("file,label", "path"), ("path,class", "label"), ("image,diagnosis,split", "label, path")],
)
def test_csv_manifest_missing_columns_are_listed(csv_images, header, missing):
    manifest = _write_csv(csv_images / "bad.csv", f"{header}\nimg/a1.png,A,train\n")
    with pytest.raises(DataError) as info:
        discover(manifest)
    message = str(info.value)
    assert f"lacks column(s) {missing}" in message and str(manifest) in message


def test_csv_manifest_bad_split_value(csv_images):
    manifest = _write_csv(csv_images / "list.csv", "path,label,split\nimg/a1.png,A,train\nimg/b1.png,B,validation\n")
    with pytest.raises(DataError, match=r"line 3: split 'validation' is not one of train, val, test"):
        discover(manifest)


def test_csv_manifest_empty_label(csv_images):
    manifest = _write_csv(csv_images / "list.csv", "path,label\nimg/a1.png,A\nimg/b1.png,\n")
    with pytest.raises(DataError, match="line 3: empty path or label"):
        discover(manifest)


def test_csv_manifest_without_rows(csv_images):
    manifest = _write_csv(csv_images / "list.csv", "path,label\n")
    with pytest.raises(DataError, match="lists no images"):
        discover(manifest)


def test_a_file_that_is_not_csv_is_refused(csv_images):
    with pytest.raises(DataError, match="must be a CSV manifest"):
        discover(csv_images / "img" / "a1.png")


# --------------------------------------------------------------------------- bad input


def test_missing_data_path(tmp_path):
    with pytest.raises(DataError, match=f"--data {re.escape(str(tmp_path / 'nope'))}: no such file or folder"):
        discover(tmp_path / "nope")


def test_folder_with_images_but_no_class_folders(make_image, tmp_path):
    root = tmp_path / "flat"  # images straight in the folder: neither layout
    make_image(root / "IM-0001-0001.jpeg")
    make_image(root / "person1_virus_1.jpeg")
    with pytest.raises(DataError) as info:
        discover(root)
    message = str(info.value)
    assert "expected one folder per class (DIR/CLASS/image.png) or split folders train/" in message
    assert "IM-0001-0001.jpeg" in message


def test_kaggle_folder_one_level_deeper_is_pointed_to(make_kaggle_tree, tmp_path):
    make_kaggle_tree({"train": {"NORMAL": 1, "PNEUMONIA": 1}}, root=tmp_path / "download" / "chest_xray")
    with pytest.raises(DataError, match=f"use --data {re.escape(str(tmp_path / 'download' / 'chest_xray'))}"):
        discover(tmp_path / "download")


def test_split_folder_without_class_folders(make_kaggle_tree, make_image):
    root = make_kaggle_tree({"train": {"NORMAL": 1, "PNEUMONIA": 1}})
    make_image(root / "test" / "IM-0001-0001.jpeg")  # images straight in test/, no class folder
    with pytest.raises(DataError, match="split folder .*test has no class folders"):
        discover(root)


def test_class_folder_without_images(make_kaggle_tree):
    root = make_kaggle_tree({"train": {"NORMAL": 1, "PNEUMONIA": 1}})
    empty = root / "train" / "COVID"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"x")  # hidden files do not count
    with pytest.raises(DataError, match=f"{re.escape(str(empty))} holds no images"):
        discover(root)


def test_class_sets_differing_between_train_and_test(make_kaggle_tree):
    root = make_kaggle_tree(
        {"train": {"NORMAL": 1, "PNEUMONIA": 1}, "test": {"NORMAL": 1, "PNEUMONIA": 1, "COVID": 1}}
    )
    with pytest.raises(DataError) as info:
        discover(root)
    message = str(info.value)
    assert "'test' has classes ['COVID', 'NORMAL', 'PNEUMONIA']" in message
    assert "'train' has ['NORMAL', 'PNEUMONIA']" in message


def test_val_may_lack_a_class_because_it_is_pooled(make_kaggle_tree):
    root = make_kaggle_tree({"train": {"NORMAL": 2, "PNEUMONIA": 2}, "val": {"PNEUMONIA": 1}})
    assert Counter(r.split for r in discover(root)) == {"train": 4, "val": 1}


@pytest.mark.parametrize(
    "spec",
    [{"train": {"NORMAL": 3}}, {"train": {"NORMAL": 2}, "test": {"NORMAL": 2}}],
    ids=["train-only", "train-and-test"],
)
def test_a_single_class_is_refused(make_kaggle_tree, spec):
    with pytest.raises(DataError, match=r"only class \['NORMAL'\]; a classifier needs at least two classes"):
        discover(make_kaggle_tree(spec))


def test_unknown_label_scheme(make_kaggle_tree):
    root = make_kaggle_tree({"train": {"NORMAL": 1, "PNEUMONIA": 1}})
    with pytest.raises(ConfigError, match="--labels: got 'kermany3'; choose one of folder, kermany-3class"):
        discover(root, labels="kermany3")


# --------------------------------------------------------------------------- kermany-3class


@pytest.mark.parametrize(
    ("name", "folder", "expected"),
    [
        ("IM-0115-0001.jpeg", "NORMAL", "NORMAL"),
        ("NORMAL2-IM-0427-0001.jpeg", "normal", "NORMAL"),
        ("person123_bacteria_456.jpeg", "PNEUMONIA", "BACTERIA"),
        ("person1_virus_7.jpeg", "PNEUMONIA", "VIRUS"),
        ("PERSON1_VIRUS_7.JPEG", "PNEUMONIA", "VIRUS"),
    ],
)
def test_kermany_3class_label(name, folder, expected):
    assert kermany_3class_label(name, folder) == expected


def test_kermany_3class_without_bacteria_or_virus_in_name():
    with pytest.raises(DataError) as info:
        kermany_3class_label("person1_fungus_2.jpeg", "PNEUMONIA")
    message = str(info.value)
    assert "--labels kermany-3class" in message and "person1_fungus_2.jpeg" in message and "_bacteria_" in message


def test_kermany_3class_discovery(make_kaggle_tree):
    root = make_kaggle_tree(
        {
            "train": {
                "NORMAL": ["IM-0115-0001.jpeg", "IM-0117-0001.jpeg"],
                "PNEUMONIA": ["person1_bacteria_1.jpeg", "person2_virus_3.jpeg", "person3_bacteria_4.jpeg"],
            },
            "test": {"NORMAL": ["IM-0001-0001.jpeg"], "PNEUMONIA": ["person9_virus_1.jpeg", "person8_bacteria_2.jpeg"]},
        }
    )
    records = discover(root, labels="kermany-3class")
    assert Counter((r.split, r.label) for r in records) == {
        ("train", "NORMAL"): 2,
        ("train", "BACTERIA"): 2,
        ("train", "VIRUS"): 1,
        ("test", "NORMAL"): 1,
        ("test", "BACTERIA"): 1,
        ("test", "VIRUS"): 1,
    }
    assert {r.path.parent.name for r in records if r.label == "VIRUS"} == {"PNEUMONIA"}


def test_kermany_3class_discovery_refuses_ambiguous_pneumonia(make_kaggle_tree):
    root = make_kaggle_tree({"train": {"NORMAL": 1, "PNEUMONIA": ["person1_bacteria_1.jpeg", "scan7.jpeg"]}})
    with pytest.raises(DataError, match="scan7.jpeg"):
        discover(root, labels="kermany-3class")


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("img/a1.png,A\nimg/b1.png,B\n./img/a1.png,A\n", r"line 4: ./img/a1.png is listed again \(first on line 2\); keep one row per image"),
        ("img/a1.png,A\nimg/a1.png,B\n", r"line 3: img/a1.png is listed again with label B where it had A \(first on line 2\)"),
    ],
)
def test_csv_manifest_listing_an_image_twice_is_refused(csv_images, rows, message):
    manifest = _write_csv(csv_images / "list.csv", "path,label\n" + rows)
    with pytest.raises(DataError, match=message):
        discover(manifest)
