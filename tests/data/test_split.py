"""Tests for medtransfer.data.split: patient-grouped stratified re-split, leakage check, split.csv."""

from __future__ import annotations

import random
import shutil
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import pytest

from medtransfer.data.discover import Record, discover
from medtransfer.data.near_duplicates import hash_images
from medtransfer.data.split import (
    DEFAULT_TEST_FRACTION,
    check_leakage,
    grouped_stratified_split,
    read_split_csv,
    resplit,
    split_summary,
    summary_lines,
    write_split_csv,
)
from medtransfer.errors import ConfigError, DataError


def make_records(
    patients_per_class: dict[str, int],
    *,
    seed: int = 0,
    max_images: int = 4,
    split: str | None = "train",
    prefix: str = "",
) -> list[Record]:
    """Records (no files) for patients with 1..max_images images each, one label per patient."""
    rng = random.Random(seed)
    records = []
    for label, n_patients in patients_per_class.items():
        for p in range(n_patients):
            patient = f"{prefix}{label}-p{p}"
            for i in range(rng.randint(1, max_images)):
                records.append(Record(Path(f"/data/{patient}_{i}.png"), label, patient, split))
    return records


def patients_by_split(records: list[Record]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for r in records:
        out[r.split].add(r.patient_id)
    return out


def assignment(records: list[Record]) -> dict[Path, str]:
    return {r.path: r.split for r in records}


# --------------------------------------------------------------------------- grouping and stratification


@pytest.mark.parametrize("seed", range(6))
def test_no_patient_in_two_splits_after_resplit(seed):
    rng = random.Random(seed)
    counts = {"NORMAL": rng.randint(5, 60), "PNEUMONIA": rng.randint(5, 60), "COVID": rng.randint(3, 20)}
    records = make_records(counts, seed=seed)
    records += make_records({"NORMAL": 4, "PNEUMONIA": 4, "COVID": 3}, seed=seed, split="val", prefix="v")
    records += make_records({"NORMAL": 3, "PNEUMONIA": 5}, seed=seed, split=None, prefix="u")

    result = resplit(records, val_fraction=rng.choice([0.1, 0.2, 0.3]), test_fraction=0, seed=seed)

    assert sorted(map(str, (r.path for r in result))) == sorted(map(str, (r.path for r in records)))
    by_split = patients_by_split(result)
    assert set(by_split) == {"train", "val"}
    assert not by_split["train"] & by_split["val"]
    # Every class keeps patients on both sides.
    for label in counts:
        assert {r.split for r in result if r.label == label} == {"train", "val"}


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.35])
def test_each_class_val_fraction_of_images_is_stratified(fraction):
    records = make_records({"NORMAL": 200, "PNEUMONIA": 200}, seed=3)
    result = resplit(records, val_fraction=fraction, test_fraction=0, seed=11)
    for label in ("NORMAL", "PNEUMONIA"):
        in_class = [r for r in result if r.label == label]
        frac = sum(r.split == "val" for r in in_class) / len(in_class)
        assert abs(frac - fraction) < 0.05, (label, frac)


def test_stratified_with_imbalanced_classes():
    # As in the chest X-ray set: about three pneumonia images per normal one.
    records = make_records({"NORMAL": 70, "PNEUMONIA": 210}, seed=5)
    result = resplit(records, val_fraction=0.2, seed=0)
    for label in ("NORMAL", "PNEUMONIA"):
        in_class = [r for r in result if r.label == label]
        assert abs(sum(r.split == "val" for r in in_class) / len(in_class) - 0.2) < 0.05


def test_same_seed_same_assignment_different_seed_differs():
    records = make_records({"NORMAL": 40, "PNEUMONIA": 40}, seed=1)
    first = assignment(resplit(records, seed=7))
    assert assignment(resplit(list(records), seed=7)) == first
    assert assignment(resplit(list(reversed(records)), seed=7)) == first  # input order does not matter
    assert assignment(resplit(records, seed=8)) != first


# --------------------------------------------------------------------------- the test split


def test_official_test_split_is_untouched():
    pool = make_records({"NORMAL": 30, "PNEUMONIA": 30}, seed=2)
    test = make_records({"NORMAL": 10, "PNEUMONIA": 10}, seed=2, split="test", prefix="t")
    result = resplit(pool + test, val_fraction=0.3, seed=4)
    assert [r for r in result if r.split == "test"] == test
    assert {r.split for r in result if r not in test} == {"train", "val"}


def test_test_fraction_draws_a_patient_level_test_split_when_none_exists():
    records = make_records({"NORMAL": 100, "PNEUMONIA": 100}, seed=9)
    records += make_records({"NORMAL": 5, "PNEUMONIA": 5}, seed=9, split="val", prefix="v")
    result = resplit(records, val_fraction=0.2, test_fraction=0.25, seed=0)

    by_split = patients_by_split(result)
    assert set(by_split) == {"train", "val", "test"}
    assert not (by_split["train"] & by_split["test"]) and not (by_split["val"] & by_split["test"])
    assert not by_split["train"] & by_split["val"]
    for label in ("NORMAL", "PNEUMONIA"):
        in_class = [r for r in result if r.label == label]
        assert abs(sum(r.split == "test" for r in in_class) / len(in_class) - 0.25) < 0.05
    assert assignment(resplit(records, val_fraction=0.2, test_fraction=0.25, seed=0)) == assignment(result)


def test_plain_class_folders_get_a_three_way_split_grouped_by_patient(make_image, tmp_path):
    """ImageFolder data (no split folders): train/val/test drawn by patient, 20% test by default."""
    root = tmp_path / "flat"
    for p in range(60):
        for label in ("NORMAL", "PNEUMONIA"):
            for i in range(1 + p % 3):  # 1-3 images per patient
                make_image(root / label / f"{label[0]}{p:03d}_{i}.png")
    records = discover(root, patient_regex=r"^(\w\d+)_")
    assert {r.split for r in records} == {None}

    result = resplit(records, seed=3)

    by_split = patients_by_split(result)
    assert set(by_split) == {"train", "val", "test"}
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not by_split[a] & by_split[b], (a, b)
    for label in ("NORMAL", "PNEUMONIA"):
        in_class = [r for r in result if r.label == label]
        assert abs(sum(r.split == "test" for r in in_class) / len(in_class) - DEFAULT_TEST_FRACTION) < 0.05
        # val is drawn from what is left, with the usual val fraction
        left = [r for r in in_class if r.split != "test"]
        assert abs(sum(r.split == "val" for r in left) / len(left) - 0.2) < 0.05
    assert assignment(resplit(records, seed=3)) == assignment(result)  # seeded
    assert assignment(resplit(records, seed=4)) != assignment(result)
    assert {r.split for r in resplit(records, seed=3, test_fraction=0)} == {"train", "val"}  # 0: no test split


def test_drawn_split_round_trips_through_split_csv(tmp_path):
    records = resplit(make_records({"NORMAL": 20, "PNEUMONIA": 20}, split=None, seed=2), seed=1)
    write_split_csv(records, tmp_path / "split.csv")
    assert read_split_csv(tmp_path / "split.csv") == records
    assert {r.split for r in records} == {"train", "val", "test"}


def test_test_fraction_with_an_existing_test_split_is_a_config_error():
    records = make_records({"NORMAL": 10, "PNEUMONIA": 10}) + make_records(
        {"NORMAL": 2, "PNEUMONIA": 2}, split="test", prefix="t"
    )
    with pytest.raises(ConfigError, match=r"--test-fraction 0.2: the data already has a test split"):
        resplit(records, test_fraction=0.2)


def test_keep_official_val_keeps_the_datas_val():
    train = make_records({"NORMAL": 20, "PNEUMONIA": 20}, seed=1)
    val = make_records({"NORMAL": 2, "PNEUMONIA": 2}, seed=1, split="val", prefix="v")
    test = make_records({"NORMAL": 3, "PNEUMONIA": 3}, seed=1, split="test", prefix="t")
    unassigned = make_records({"NORMAL": 1}, split=None, prefix="u")

    result = resplit(train + val + test + unassigned, keep_official_val=True, seed=5)

    assert assignment(result) == {
        **{r.path: "train" for r in train + unassigned},
        **{r.path: "val" for r in val},
        **{r.path: "test" for r in test},
    }


def test_keep_official_val_with_test_fraction_draws_test_from_train_only():
    train = make_records({"NORMAL": 40, "PNEUMONIA": 40}, seed=1)
    val = make_records({"NORMAL": 2, "PNEUMONIA": 2}, seed=1, split="val", prefix="v")
    result = resplit(train + val, keep_official_val=True, test_fraction=0.2, seed=0)

    assert [r for r in result if r.split == "val"] == val
    by_split = patients_by_split(result)
    assert by_split["test"] and not by_split["test"] & by_split["train"]
    assert by_split["test"] <= {r.patient_id for r in train}


def test_keep_official_val_without_val_split():
    with pytest.raises(DataError, match="--keep-official-val: the data has no val split"):
        resplit(make_records({"NORMAL": 5, "PNEUMONIA": 5}), keep_official_val=True)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.1])
def test_fraction_out_of_range(fraction):
    with pytest.raises(ConfigError, match=rf"--val-fraction: got {fraction}"):
        grouped_stratified_split(make_records({"A": 5, "B": 5}), fraction=fraction, seed=0, name="val", rest="train")


def test_too_few_patients_for_a_split():
    records = make_records({"A": 1, "B": 1})  # each class keeps its only patient in train
    with pytest.raises(DataError, match=r"--val-fraction 0.2: too few patients \(2\)"):
        resplit(records, val_fraction=0.2, test_fraction=0)


# --------------------------------------------------------------------------- leakage check


@pytest.fixture
def clean_tree(make_kaggle_tree):
    return make_kaggle_tree(
        {
            "train": {"NORMAL": 3, "PNEUMONIA": 3},
            "test": {"NORMAL": ["IM-0900-0001.jpeg"], "PNEUMONIA": ["person900_virus_1.jpeg"]},
        }
    )


def test_clean_data_is_clean(clean_tree):
    report = check_leakage(discover(clean_tree))
    assert report.clean and report.lines() == [] and report.near_duplicates == []
    summary = (
        "Leakage check on 8 images (test 2, train 6): no patient ID in two splits; no identical file in two splits; "
        "by content (256-bit perceptual hash within 24 bits, pixel correlation >= 0.995): no near-duplicate in two splits."
    )
    assert report.summary() == summary
    assert report.to_dict() == {
        "clean": True,
        "shared_patients": 0,
        "duplicate_images": 0,
        "near_duplicates": 0,
        "shared_patients_with_near_duplicates": 0,
        "summary": summary,
        "examples": [],
        "checked": {
            "patient_ids": True,
            "bytes": True,
            "content": "256-bit perceptual hash at most 24 bits apart, thumbnails correlated >= 0.995",
            "content_unreadable": 0,
        },
        "near_duplicate_pairs": [],
    }


def test_patient_shared_between_train_and_test_is_reported(clean_tree, make_image):
    make_image(clean_tree / "test" / "NORMAL" / "IM-0002-0003.jpeg")  # IM-0002 also has a train image

    report = check_leakage(discover(clean_tree))

    assert not report.clean
    assert report.shared_patients == [("IM-0002", ["test", "train"])]
    assert report.duplicate_images == []
    (line,) = report.lines()
    # The ID overlap comes with what the content check found for that patient: two different images.
    assert line.startswith(
        "1 patient(s) appear in more than one split, e.g. IM-0002 in test+train; "
        "by content, none of them has a near-duplicate image in another split (closest hashes "
    )
    assert report.shared_patient_distance["IM-0002"] > 24 and report.shared_patients_alike == 0
    assert report.to_dict()["shared_patients"] == 1
    assert "1 patient ID(s) in two splits" in report.summary()


def test_byte_identical_image_under_another_name_is_reported(clean_tree):
    source = clean_tree / "train" / "PNEUMONIA" / "person1_virus_3.jpeg"
    copy = clean_tree / "test" / "PNEUMONIA" / "person77_bacteria_1.jpeg"
    shutil.copyfile(source, copy)

    report = check_leakage(discover(clean_tree))

    assert report.shared_patients == []  # different patient IDs: only the bytes give it away
    ((paths, splits),) = report.duplicate_images
    assert sorted(paths) == sorted([str(source), str(copy)]) and splits == ["test", "train"]
    (line,) = report.lines()  # reported once, as identical files, not again as a near-duplicate
    assert line.startswith("1 byte-identical image(s) appear in more than one split") and "person77_bacteria_1" in line
    assert report.near_duplicates == [] and "no other near-duplicate" in report.summary()


def test_duplicates_within_one_split_and_equal_sizes_are_not_leakage(tmp_path):
    for name, content in [("a.png", b"A" * 64), ("b.png", b"A" * 64), ("c.png", b"C" * 64)]:
        (tmp_path / name).write_bytes(content)
    records = [
        Record(tmp_path / "a.png", "X", "p1", "train"),
        Record(tmp_path / "b.png", "X", "p2", "train"),  # same bytes, same split
        Record(tmp_path / "c.png", "Y", "p3", "test"),  # same size, other bytes
    ]
    assert check_leakage(records).clean


def test_check_bytes_off_skips_reading_files(tmp_path):
    records = [Record(tmp_path / "gone.png", "X", "p1", "train"), Record(tmp_path / "gone.png", "Y", "p1", "test")]
    report = check_leakage(records, check_bytes=False, check_content=False)
    assert report.shared_patients == [("p1", ["test", "train"])] and report.duplicate_images == []
    assert report.summary() == "Leakage check on 2 images (test 1, train 1): 1 patient ID(s) in two splits."


def test_leakage_check_on_missing_file_names_it(tmp_path):
    records = [Record(tmp_path / "gone.png", "X", "p1", "train")]
    with pytest.raises(DataError, match="gone.png"):
        check_leakage(records)


def test_leakage_lines_show_at_most_the_requested_examples():
    records = [Record(Path(f"/x/{i}_{s}.png"), "A", f"p{i}", s) for i in range(8) for s in ("train", "test")]
    report = check_leakage(records, check_bytes=False, check_content=False)
    (line,) = report.lines(examples=2)
    assert line == "8 patient(s) appear in more than one split, e.g. p0 in test+train; p1 in test+train"


# --------------------------------------------------------------------------- split.csv and summary


def test_split_csv_round_trip(tmp_path):
    records = resplit(make_records({"NORMAL": 6, "PNEUMONIA": 6}, seed=4), seed=0)
    records.append(Record(tmp_path / "d i r" / "naïve, \"quoted\".png", "NORMAL", "p,x", "test"))
    path = tmp_path / "split.csv"
    write_split_csv(records, path)
    assert path.read_text(encoding="utf-8").splitlines()[0] == "path,label,patient_id,split"
    assert read_split_csv(path) == records


def test_split_csv_round_trip_keeps_unassigned_split(tmp_path):
    records = [Record(Path("/x/a.png"), "A", "p1", None), Record(Path("/x/b.png"), "B", "p2", "val")]
    write_split_csv(records, tmp_path / "split.csv")
    assert read_split_csv(tmp_path / "split.csv") == records


def test_read_split_csv_missing_columns(tmp_path):
    path = tmp_path / "split.csv"
    path.write_text("path,label,split\n/x/a.png,A,train\n")
    with pytest.raises(DataError, match="lacks column\\(s\\) patient_id"):
        read_split_csv(path)


def test_split_summary_counts_images_and_patients():
    records = [
        Record(Path("/x/1.png"), "NORMAL", "p1", "train"),
        Record(Path("/x/2.png"), "NORMAL", "p1", "train"),
        Record(Path("/x/3.png"), "NORMAL", "p2", "train"),
        Record(Path("/x/4.png"), "PNEUMONIA", "p3", "train"),
        Record(Path("/x/5.png"), "PNEUMONIA", "p4", "val"),
        Record(Path("/x/6.png"), "PNEUMONIA", "p4", "val"),
        Record(Path("/x/7.png"), "NORMAL", "p5", None),
    ]
    assert split_summary(records) == {
        "train": {"NORMAL": {"images": 3, "patients": 2}, "PNEUMONIA": {"images": 1, "patients": 1}},
        "val": {"PNEUMONIA": {"images": 2, "patients": 1}},
        "unassigned": {"NORMAL": {"images": 1, "patients": 1}},
    }


def test_split_summary_totals_match_records():
    records = resplit(make_records({"NORMAL": 30, "PNEUMONIA": 50}, seed=6), seed=2)
    summary = split_summary(records)
    assert sum(c["images"] for s in summary.values() for c in s.values()) == len(records)
    assert Counter(r.split for r in records) == {s: sum(c["images"] for c in v.values()) for s, v in summary.items()}


def test_resplit_keeps_byte_identical_images_of_different_patients_together(tmp_path):
    """A copy filed under another patient must not end up on the other side of the split."""
    import shutil

    from medtransfer.data.discover import Record as _Record
    from medtransfer.data.split import check_leakage as _check_leakage, resplit as _resplit

    records = []
    for i in range(60):
        label = "NORMAL" if i % 2 else "PNEUMONIA"
        path = tmp_path / f"p{i}.png"
        path.write_bytes(bytes([i]) * (100 + i))
        records.append(_Record(path, label, f"patient{i}", "train"))
    for i in range(0, 60, 6):  # ten copies under new patient IDs
        copy = tmp_path / f"copy{i}.png"
        shutil.copy(records[i].path, copy)
        records.append(_Record(copy, records[i].label, f"other{i}", "train"))
    for seed in range(5):
        split = _resplit(records, val_fraction=0.3, seed=seed)
        assert _check_leakage(split).duplicate_images == []


# --------------------------------------------------------------------------- leakage by content


@pytest.fixture
def copy_tree(make_kaggle_tree, make_textured):
    """A Kaggle tree of textured images; test holds a resized, re-encoded copy of a train image under another name."""
    root = make_kaggle_tree({})
    for i in range(4):
        make_textured(root / "train" / "NORMAL" / f"IM-{i:04d}-0001.jpeg", i)
        make_textured(root / "train" / "PNEUMONIA" / f"person{i}_virus_{i}.jpeg", 10 + i)
    make_textured(root / "test" / "NORMAL" / "IM-0900-0001.jpeg", 20)
    make_textured(root / "test" / "PNEUMONIA" / "person77_bacteria_1.JPG", 11, resize=180, quality=60)
    return root


def test_resized_copy_across_splits_is_reported_by_content(copy_tree):
    report = check_leakage(discover(copy_tree))

    assert not report.clean  # the pipeline fails on this under --strict
    assert report.shared_patients == [] and report.duplicate_images == []  # names and bytes miss it
    (pair,) = report.near_duplicates
    assert (pair.path_a.name, pair.split_a, pair.path_b.name, pair.split_b) == (
        "person77_bacteria_1.JPG", "test", "person1_virus_1.jpeg", "train"
    )
    assert pair.distance <= 24
    (line,) = report.lines()
    assert line.startswith("1 near-duplicate image pair(s) by content in different splits, e.g. ")
    assert "person77_bacteria_1.JPG (test) ~ " in line
    assert "pixel correlation >= 0.995): 1 near-duplicate pair(s) in two splits." in report.summary()
    assert pair.correlation >= 0.995
    saved = report.to_dict()
    assert saved["clean"] is False and saved["near_duplicates"] == 1
    assert saved["near_duplicate_pairs"] == [
        {"path_a": str(pair.path_a), "split_a": "test", "path_b": str(pair.path_b), "split_b": "train",
             "distance": pair.distance, "correlation": pair.correlation}
    ]


def test_shared_patient_is_reported_with_what_the_content_check_found(copy_tree, make_textured):
    # person1_virus now also has a test image: a copy of its train image, so the overlap is real.
    make_textured(copy_tree / "test" / "PNEUMONIA" / "person1_virus_9.png", 11, resize=150)
    report = check_leakage(discover(copy_tree))
    assert report.shared_patients == [("person1_virus", ["test", "train"])]
    assert report.shared_patients_alike == 1
    assert report.lines()[0] == (
        "1 patient(s) appear in more than one split, e.g. person1_virus in test+train; "
        "by content, 1 of them have a near-duplicate image in another split"
    )


def test_content_check_can_be_left_out_and_reuses_given_hashes(copy_tree):
    records = discover(copy_tree)
    assert check_leakage(records, check_content=False).clean
    hashes = hash_images([r.path for r in records])
    assert check_leakage(records, hashes=hashes).near_duplicates == check_leakage(records).near_duplicates


def test_resplit_with_hashes_keeps_near_duplicates_of_different_patients_together(tmp_path, make_textured):
    records = []
    for i in range(40):
        label = "NORMAL" if i % 2 else "PNEUMONIA"
        records.append(Record(make_textured(tmp_path / f"p{i}.png", i, size=96), label, f"patient{i}", None))
    for i in range(0, 40, 4):  # ten resized copies under new patient IDs
        path = make_textured(tmp_path / f"copy{i}.jpeg", i, size=96, resize=80, quality=70)
        records.append(Record(path, records[i].label, f"other{i}", None))
    hashes = hash_images([r.path for r in records])
    leaked = 0
    for seed in range(4):
        assert check_leakage(resplit(records, seed=seed, hashes=hashes), hashes=hashes).clean
        leaked += len(check_leakage(resplit(records, seed=seed), hashes=hashes).near_duplicates)
    assert leaked > 0  # without the hashes the copies do land on both sides


# --------------------------------------------------------------------------- multi-label: split.csv, split, summary

FINDINGS = ("Effusion", "Infiltration", "Mass", "Nodule", "Hernia")
PREVALENCE = (0.4, 0.2, 0.1, 0.05, 0.02)  # per image; the last is as rare as NIH's Hernia


def make_multilabel_records(seed: int, *, patients: int = 300, masked_share: float = 0.1) -> list[Record]:
    """Patients with 1-4 images; a patient's findings mostly recur on each of its images; some labels unknown."""
    rng = random.Random(seed)
    records = []
    for p in range(patients):
        carried = [f for f, prevalence in zip(FINDINGS, PREVALENCE) if rng.random() < prevalence / 0.8]
        for i in range(rng.randint(1, 4)):
            present = [f for f in carried if rng.random() < 0.8]
            masked = tuple(f for f in FINDINGS if f not in present and rng.random() < masked_share / len(FINDINGS))
            records.append(Record(Path(f"/nih/p{p:03d}_{i}.png"), "|".join(present), f"p{p:03d}", "train", masked))
    return records


def positives(records: list[Record], finding: str) -> int:
    return sum(finding in r.label.split("|") and finding not in r.masked for r in records)


def prevalence_error(records: list[Record], finding: str, split: str = "val") -> float:
    """|prevalence in `split` - overall prevalence| (known positives per image)."""
    drawn = [r for r in records if r.split == split]
    return abs(positives(drawn, finding) / len(drawn) - positives(records, finding) / len(records))


def naive_patient_split(records: list[Record], *, fraction: float, seed: int) -> list[Record]:
    """Whole patients in a seeded random order until `fraction` of the images: no stratification."""
    patients = sorted({r.patient_id for r in records})
    random.Random(seed).shuffle(patients)
    images = Counter(r.patient_id for r in records)
    chosen, taken = set(), 0
    for patient in patients:
        if taken >= fraction * len(records):
            break
        chosen.add(patient)
        taken += images[patient]
    return [replace(r, split="val" if r.patient_id in chosen else "train") for r in records]


@pytest.mark.parametrize(
    "records",
    [
        [Record(Path("/x/a.png"), "Mass|Nodule", "p1", "train", ("Effusion",), "frontal")],
        [Record(Path("/x/a.png"), "", "p1", "val", ("Effusion", "Mass")), Record(Path("/x/b.png"), "Mass", "p2", None)],
        [Record(Path("/x/a.png"), "", "p1", "test", (), "lateral"), Record(Path("/x/b.png"), "", "p1", "test")],
        [Record(Path("/x/a.png"), "NORMAL", "p1", "train", view="frontal")],  # single-label with a view
    ],
    ids=["masked-and-view", "masked-only-no-finding", "view-only-no-finding", "single-label-view"],
)
def test_split_csv_round_trips_masked_findings_and_view(tmp_path, records):
    path = tmp_path / "split.csv"
    write_split_csv(records, path)
    assert path.read_text(encoding="utf-8").splitlines()[0] == "path,label,patient_id,split,masked,view"
    assert read_split_csv(path) == records


def test_split_csv_without_masked_findings_or_views_is_unchanged(tmp_path):
    records = [Record(Path("/x/a.png"), "NORMAL", "p1", "train"), Record(Path("/x/b.png"), "", "p2", None)]
    path = tmp_path / "split.csv"
    write_split_csv(records, path)
    assert path.read_bytes() == b"path,label,patient_id,split\r\n/x/a.png,NORMAL,p1,train\r\n/x/b.png,,p2,\r\n"
    assert read_split_csv(path) == records  # '' (no finding) reads back as ''


def test_split_csv_masked_column_is_written_where_any_record_needs_it(tmp_path):
    records = [Record(Path("/x/a.png"), "Mass", "p1", "train"), Record(Path("/x/b.png"), "", "p2", "val", ("Mass", "Hernia"))]
    path = tmp_path / "split.csv"
    write_split_csv(records, path)
    assert path.read_text(encoding="utf-8").splitlines()[1:] == ["/x/a.png,Mass,p1,train,,", "/x/b.png,,p2,val,Mass|Hernia,"]


@pytest.mark.parametrize("seed", range(4))
def test_multilabel_resplit_keeps_patients_whole_and_every_finding_near_its_prevalence(seed):
    records = make_multilabel_records(seed)
    result = resplit(records, val_fraction=0.2, test_fraction=0.2, seed=seed, findings=FINDINGS)

    assert sorted(r.path for r in result) == sorted(r.path for r in records)
    by_split = patients_by_split(result)
    assert set(by_split) == {"train", "val", "test"}
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"] or by_split["val"] & by_split["test"])
    pool = [r for r in result if r.split != "test"]
    assert abs(sum(r.split == "val" for r in pool) / len(pool) - 0.2) < 0.02
    for finding in FINDINGS:
        assert prevalence_error(result, finding, "test") < 0.02, finding
        assert prevalence_error(pool, finding, "val") < 0.02, finding
        assert positives([r for r in result if r.split == "train"], finding) > 0, finding  # every finding left to learn


def test_multilabel_resplit_beats_a_random_patient_split_on_the_rare_finding():
    stratified, naive = [], []
    for seed in range(5):
        records = make_multilabel_records(seed)
        stratified.append(prevalence_error(resplit(records, test_fraction=0, seed=seed, findings=FINDINGS), "Hernia"))
        naive.append(prevalence_error(naive_patient_split(records, fraction=0.2, seed=seed), "Hernia"))
    assert max(stratified) < 0.005
    assert sum(stratified) < sum(naive) / 2, (stratified, naive)


def test_multilabel_resplit_is_deterministic_for_a_seed_and_differs_across_seeds():
    records = make_multilabel_records(7)
    first = assignment(resplit(records, seed=3, findings=FINDINGS))
    assert assignment(resplit(list(records), seed=3, findings=FINDINGS)) == first
    assert assignment(resplit(list(reversed(records)), seed=3, findings=FINDINGS)) == first
    assert assignment(resplit(records, seed=4, findings=FINDINGS)) != first


def test_multilabel_split_counts_masked_positives_as_unknown():
    # One patient is positive for Mass only where Mass is masked: that is no positive, so the
    # one real Mass patient must stay on the train side.
    records = [Record(Path(f"/x/n{i}.png"), "", f"n{i}", "train") for i in range(20)]
    records.append(Record(Path("/x/m.png"), "Mass", "m", "train"))
    records.append(Record(Path("/x/u.png"), "Mass", "u", "train", ("Mass",)))
    for seed in range(6):
        result = grouped_stratified_split(records, fraction=0.3, seed=seed, name="val", rest="train", findings=("Mass",))
        assert next(r.split for r in result if r.patient_id == "m") == "train"


@pytest.mark.parametrize("findings", [None, ("Mass",)])
def test_too_few_patients_for_a_split_is_the_same_error_for_both_task_kinds(findings):
    records = [Record(Path("/x/a.png"), "Mass", "p1", "train"), Record(Path("/x/b.png"), "Mass", "p1", "train")]
    with pytest.raises(DataError, match=r"--val-fraction 0.2: too few patients \(1\) to draw a val split; add images"):
        grouped_stratified_split(records, fraction=0.2, seed=0, name="val", rest="train", findings=findings)


def test_multilabel_split_merges_patients_that_share_an_image():
    records = make_multilabel_records(2, patients=60)
    group_of = {f"p{p:03d}": "p000" for p in range(0, 60, 10)}  # six patients filed as copies of p000
    result = grouped_stratified_split(
        records, fraction=0.3, seed=1, name="val", rest="train", group_of=group_of, findings=FINDINGS
    )
    assert len({r.split for r in result if r.patient_id in group_of}) == 1


def test_split_summary_per_finding_for_multilabel():
    records = [
        Record(Path("/x/1.png"), "Mass|Nodule", "p1", "train"),
        Record(Path("/x/2.png"), "Mass", "p1", "train", ("Nodule",)),
        Record(Path("/x/3.png"), "", "p2", "train", ("Mass",)),
        Record(Path("/x/4.png"), "Hernia", "p3", "train"),  # a finding outside the task
        Record(Path("/x/5.png"), "Nodule", "p4", "val", ("Nodule",)),  # masked wins: unknown, not positive
        Record(Path("/x/6.png"), "", "p5", "val"),
    ]
    assert split_summary(records, findings=("Mass", "Nodule")) == {
        "train": {
            "Mass": {"images": 2, "patients": 1, "known": 3},
            "Nodule": {"images": 1, "patients": 1, "known": 3},
            "No Finding": {"images": 2, "patients": 2, "known": 4},
        },
        "val": {
            "Mass": {"images": 0, "patients": 0, "known": 2},
            "Nodule": {"images": 0, "patients": 0, "known": 1},
            "No Finding": {"images": 2, "patients": 2, "known": 2},
        },
    }


@pytest.mark.parametrize(
    "summary, line",
    [
        (
            {"train": {"NORMAL": {"images": 3, "patients": 2}, "PNEUMONIA": {"images": 1, "patients": 1}}},
            "  train: NORMAL 3 images / 2 patients, PNEUMONIA 1 images / 1 patients",
        ),
        (
            {"val": {"Mass": {"images": 2, "patients": 1, "known": 4}, "No Finding": {"images": 2, "patients": 2, "known": 4}}},
            "  val  : Mass 2 images / 1 patients, No Finding 2 images / 2 patients",
        ),
        (
            {"val": {"Mass": {"images": 0, "patients": 0, "known": 3}, "No Finding": {"images": 2, "patients": 2, "known": 4}}},
            "  val  : Mass 0 images / 0 patients (3 known), No Finding 2 images / 2 patients",
        ),
    ],
    ids=["single-label", "multi-label-all-known", "multi-label-some-unknown"],
)
def test_summary_lines_one_line_per_split(summary, line):
    assert summary_lines(summary) == [line]


def test_multilabel_summary_lines_print_one_line_per_split():
    records = resplit(make_multilabel_records(1), seed=0, findings=FINDINGS)
    summary = split_summary(records, findings=FINDINGS)
    lines = summary_lines(summary)
    assert [line.split(":")[0].strip() for line in lines] == ["test", "train", "val"]
    for split, per_finding in summary.items():
        assert list(per_finding) == [*FINDINGS, "No Finding"]
        assert per_finding["No Finding"]["known"] == sum(r.split == split for r in records)
        assert per_finding["Hernia"]["images"] == positives([r for r in records if r.split == split], "Hernia")
