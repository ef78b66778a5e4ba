"""Patient-grouped, stratified K-fold assignment (data/folds.py) and split.csv's fold column."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from medtransfer.data.discover import Record
from medtransfer.data.folds import (
    assign_folds,
    draw_folds,
    fold_records,
    k_way_group_split,
    read_folds,
    write_fold_split_csv,
)
from medtransfer.data.split import read_split_csv
from medtransfer.data.stratify import GroupCounts
from medtransfer.errors import ConfigError, DataError


def records(spec: dict[str, int], *, images=(1, 3), seed=0, split="train") -> list[Record]:
    """`spec[class]` patients per class, each with 1-3 images."""
    rng = random.Random(seed)
    out = []
    for label, patients in spec.items():
        for p in range(patients):
            for i in range(rng.randint(*images)):
                out.append(Record(Path(f"/data/{label}/{label}-{p:03d}-{i}.png"), label, f"{label}-{p:03d}", split))
    return out


def by_fold(pool, numbers):
    folds = defaultdict(list)
    for r, n in zip(pool, numbers):
        folds[n].append(r)
    return folds


@pytest.mark.parametrize("k", [2, 3, 5])
def test_every_image_in_one_fold_no_patient_in_two_and_classes_stratified(k):
    pool = records({"NORMAL": 30, "BACTERIA": 20, "VIRUS": 11})
    numbers = assign_folds(pool, folds=k, seed=1)
    assert len(numbers) == len(pool) and set(numbers) == set(range(1, k + 1))
    folds_of_patient = defaultdict(set)
    for r, n in zip(pool, numbers):
        folds_of_patient[r.patient_id].add(n)
    assert all(len(f) == 1 for f in folds_of_patient.values())
    for label, total in Counter(r.label for r in pool).items():
        per_fold = [sum(r.label == label for r in fold) for fold in by_fold(pool, numbers).values()]
        assert min(per_fold) >= 1
        assert max(per_fold) - min(per_fold) <= 3  # within one patient (up to 3 images) of each other, give or take one
        assert sum(per_fold) == total


def test_folds_are_deterministic_for_a_seed_and_do_not_depend_on_record_order():
    pool = records({"NORMAL": 12, "PNEUMONIA": 15})
    first = dict(zip((r.path for r in pool), assign_folds(pool, folds=4, seed=3)))
    shuffled = pool[::-1]
    again = dict(zip((r.path for r in shuffled), assign_folds(shuffled, folds=4, seed=3)))
    assert first == again
    other = dict(zip((r.path for r in pool), assign_folds(pool, folds=4, seed=4)))
    assert other != first


def test_patients_sharing_an_identical_image_land_in_one_fold(tmp_path):
    pool = []
    for p in range(8):
        for label in ("A", "B"):
            path = tmp_path / f"{label}{p}.png"
            path.write_bytes(f"{label}{p}".encode())
            pool.append(Record(path, label, f"{label}{p}", "train"))
    (tmp_path / "B3.png").write_bytes(b"A2")  # B3's file is a copy of A2's
    numbers = dict(zip((r.patient_id for r in pool), assign_folds(pool, folds=4, seed=0)))
    assert numbers["A2"] == numbers["B3"]


def test_the_test_split_stays_outside_the_folds():
    official = records({"NORMAL": 20, "PNEUMONIA": 20}) + records({"NORMAL": 4, "PNEUMONIA": 4}, seed=9, split="test")
    official = [r if r.split == "test" else Record(r.path, r.label, r.patient_id, "val" if i % 7 == 0 else "train")
                for i, r in enumerate(official)]
    kept, numbers = draw_folds(official, folds=5, seed=0)
    test_before = sorted(r.path for r in official if r.split == "test")
    assert sorted(r.path for r, n in zip(kept, numbers) if n is None) == test_before
    assert all(r.split == "test" for r, n in zip(kept, numbers) if n is None)
    assert all(r.split == "train" for r, n in zip(kept, numbers) if n is not None)  # official val joins the pool


def test_a_drawn_test_split_is_the_one_a_single_split_run_draws():
    from medtransfer.data.split import resplit

    plain = records({"NORMAL": 20, "PNEUMONIA": 20}, split=None)
    kept, numbers = draw_folds(plain, folds=3, seed=5)
    single = resplit(plain, seed=5)
    assert sorted(r.path for r, n in zip(kept, numbers) if n is None) == sorted(r.path for r in single if r.split == "test")


def test_a_class_with_fewer_patients_than_folds_is_refused():
    pool = records({"NORMAL": 10, "VIRUS": 3})
    with pytest.raises(DataError, match=r"--folds 5: class\(es\) VIRUS \(3\) have fewer patients than folds.*--folds 3"):
        assign_folds(pool, folds=5, seed=0)


def test_one_fold_is_not_cross_validation():
    with pytest.raises(ConfigError, match="at least 2 folds"):
        k_way_group_split({"a": GroupCounts(1, (1,))}, k=1, seed=0)


def test_multi_label_folds_are_stratified_over_findings():
    rng = random.Random(0)
    pool = []
    for p in range(60):
        findings = [f for f, rate in (("Effusion", 0.3), ("Mass", 0.1), ("Nodule", 0.5)) if rng.random() < rate]
        for i in range(rng.randint(1, 2)):
            pool.append(Record(Path(f"/x/{p}-{i}.png"), "|".join(findings), f"p{p}", "train"))
    numbers = assign_folds(pool, folds=3, seed=0, findings=("Effusion", "Mass", "Nodule"))
    for finding in ("Effusion", "Mass", "Nodule"):
        per_fold = [sum(finding in r.label for r in fold) for fold in by_fold(pool, numbers).values()]
        total = sum(per_fold)
        assert min(per_fold) >= 1 and max(per_fold) - min(per_fold) <= max(3, total // 5), (finding, per_fold)


def test_the_fold_column_round_trips_and_read_split_csv_ignores_it(tmp_path):
    pool = records({"NORMAL": 6, "PNEUMONIA": 6}) + records({"NORMAL": 2, "PNEUMONIA": 2}, seed=2, split="test")
    kept, numbers = draw_folds(pool, folds=3, seed=0)
    path = tmp_path / "split.csv"
    write_fold_split_csv(kept, numbers, path)
    assert path.read_text().splitlines()[0] == "path,label,patient_id,split,fold"
    assert read_folds(path) == numbers
    assert [(r.path, r.label, r.patient_id, r.split) for r in read_split_csv(path)] == [
        (r.path, r.label, r.patient_id, r.split) for r in kept]
    plain = tmp_path / "plain.csv"
    plain.write_text("path,label,patient_id,split\n/a.png,A,a,train\n")
    assert read_folds(plain) is None


def test_a_fold_run_validates_on_its_fold_and_trains_on_the_others():
    pool = records({"NORMAL": 6, "PNEUMONIA": 6}) + records({"NORMAL": 2}, seed=2, split="test")
    kept, numbers = draw_folds(pool, folds=3, seed=0)
    second = fold_records(kept, numbers, 2)
    assert len(second) == sum(n is not None for n in numbers)  # test rows left out
    assert {r.path for r in second if r.split == "val"} == {r.path for r, n in zip(kept, numbers) if n == 2}


def test_a_bad_fold_cell_is_named(tmp_path):
    path = tmp_path / "split.csv"
    path.write_text("path,label,patient_id,split,fold\n/a.png,A,a,train,x\n")
    with pytest.raises(DataError, match=r"line 2: fold must be a whole number from 1; got 'x'"):
        read_folds(path)
