"""Patient-grouped, stratified k-fold assignment for cross-validation, and the ``fold`` column of split.csv.

Every image of the pool (train and val of the source; a test split, official or drawn, stays
outside the folds) goes to exactly one of K folds, whole patient groups at a time (a patient,
or patients merged because they share an identical or near-duplicate image, as
:func:`~medtransfer.data.split.duplicate_patient_groups` merges them), so no patient is in two
folds.

The folds are stratified by iterative stratification (Sechidis, Tsoumakas & Vlahavas 2011),
the K-way form of :func:`~medtransfer.data.stratify.iterative_group_split`: each group carries
its image count and, per label, its known positives (single-label: its images of each class;
multi-label: each finding's known positives). Repeatedly the label with the fewest positives
still unassigned is taken and the groups that carry it, largest first, go to the fold whose
remaining demand for that label is largest (ties: the larger remaining image demand, then the
seeded RNG). Groups without a positive go last, by image demand. A label with at least K
groups thus reaches every fold. The assignment is deterministic for a seed and independent of
the order of the records.

split.csv gains a ``fold`` column (1..K; empty for test rows);
:func:`~medtransfer.data.split.read_split_csv` ignores it, :func:`read_folds` reads it.
"""

from __future__ import annotations

import csv
import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from medtransfer.data.discover import Record
from medtransfer.data.near_duplicates import ImageHashes
from medtransfer.data.split import (
    DEFAULT_TEST_FRACTION,
    SPLIT_CSV_COLUMNS,
    SPLIT_CSV_EXTRA_COLUMNS,
    duplicate_patient_groups,
    grouped_stratified_split,
)
from medtransfer.data.stratify import GroupCounts, group_counts
from medtransfer.errors import ConfigError, DataError
from medtransfer.safeio import write_csv_atomic
from medtransfer.task import join_findings

__all__ = ["FOLD_COLUMN", "assign_folds", "draw_folds", "fold_records", "k_way_group_split", "read_folds",
           "write_fold_split_csv"]

FOLD_COLUMN = "fold"
_DIGITS = 9  # demands are fractions of counts; compared at this precision so that ties are ties


def k_way_group_split(groups: Mapping[str, GroupCounts], *, k: int, seed: int) -> dict[str, int]:
    """Each group's fold (0..k-1): about 1/k of the images and of each label's positives per fold."""
    if k < 2:
        raise ConfigError(f"--folds: got {k}; cross-validation needs at least 2 folds, e.g. 5")
    rng = random.Random(seed)
    order = sorted(groups)
    rng.shuffle(order)  # the seeded order among groups of equal size
    width = len(groups[order[0]].positives) if order else 0
    image_demand = [sum(g.images for g in groups.values()) / k] * k
    demand = [[sum(g.positives[j] for g in groups.values()) / k for j in range(width)] for _ in range(k)]
    fold_of: dict[str, int] = {}

    def place(name: str, fold: int) -> None:
        fold_of[name] = fold
        image_demand[fold] -= groups[name].images
        for j, count in enumerate(groups[name].positives):
            demand[fold][j] -= count

    def pick(first: Sequence[float] | None) -> int:
        keys = [(round(first[f], _DIGITS) if first is not None else 0.0, round(image_demand[f], _DIGITS)) for f in range(k)]
        best = max(keys)
        return rng.choice([f for f in range(k) if keys[f] == best])

    while True:
        left = [sum(groups[n].positives[j] for n in order if n not in fold_of) for j in range(width)]
        pending = [j for j in range(width) if left[j] > 0]
        if not pending:
            break
        j = min(pending, key=lambda i: (left[i], i))  # the rarest label still unassigned
        carriers = sorted((n for n in order if n not in fold_of and groups[n].positives[j] > 0),
                          key=lambda n: (-groups[n].positives[j], -groups[n].images))
        for name in carriers:
            place(name, pick([demand[f][j] for f in range(k)]))
    for name in sorted((n for n in order if n not in fold_of), key=lambda n: -groups[n].images):
        place(name, pick(None))
    return fold_of


def _single_label_counts(records: Sequence[Record], group_of: Mapping[str, str]) -> dict[str, GroupCounts]:
    """Each group's images and its images of each class (classes sorted): the labels stratified over."""
    classes = sorted({r.label for r in records})
    images: Counter[str] = Counter()
    per_class: dict[str, Counter[str]] = {}
    for r in records:
        group = group_of.get(r.patient_id, r.patient_id)
        images[group] += 1
        per_class.setdefault(group, Counter())[r.label] += 1
    return {g: GroupCounts(n, tuple(per_class[g][c] for c in classes)) for g, n in images.items()}


def assign_folds(
    pool: Sequence[Record], *, folds: int, seed: int, hashes: ImageHashes | None = None,
    findings: Sequence[str] | None = None,
) -> list[int]:
    """The fold (1..folds) of each record of ``pool``, in its order; DataError when a class (single-label)
    has fewer patient groups than folds, so that some fold's validation would lack it."""
    group_of = duplicate_patient_groups(list(pool), hashes)
    groups = (group_counts(pool, findings, group_of) if findings is not None
              else _single_label_counts(pool, group_of))
    if len(groups) < folds:
        raise DataError(f"--folds {folds}: the pool has {len(groups)} patient group(s); each fold needs at least one: "
                        f"use --folds {max(2, len(groups))} or fewer, or add patients")
    if findings is None:
        classes = sorted({r.label for r in pool})
        carriers = {c: sum(1 for g in groups.values() if g.positives[i] > 0) for i, c in enumerate(classes)}
        short = {c: n for c, n in carriers.items() if n < folds}
        if short:
            listed = ", ".join(f"{c} ({n})" for c, n in sorted(short.items()))
            raise DataError(f"--folds {folds}: class(es) {listed} have fewer patients than folds, so some fold's "
                            f"validation would lack them; use --folds {max(2, min(short.values()))} or fewer, or add patients")
    fold_of = k_way_group_split(groups, k=folds, seed=seed)
    return [fold_of[group_of.get(r.patient_id, r.patient_id)] + 1 for r in pool]


def draw_folds(
    records: Sequence[Record], *, folds: int, seed: int, test_fraction: float | None = None,
    hashes: ImageHashes | None = None, findings: Sequence[str] | None = None,
) -> tuple[list[Record], list[int | None]]:
    """Records (pool as ``train``, test as ``test``) and each one's fold (None for test).

    The test split is the data's own, else drawn by patient exactly as a single-split run draws it
    (:func:`~medtransfer.data.split.resplit`: ``test_fraction`` of the images, 0.2 when None, seed + 1),
    so a cross-validated run and a single-split run of one seed share their test images. The pool
    (train + val of the source) is then divided into folds."""
    test = [r for r in records if r.split == "test"]
    pool = [r for r in records if r.split != "test"]
    if test_fraction is None:
        test_fraction = 0.0 if test else DEFAULT_TEST_FRACTION
    elif test_fraction > 0 and test:
        raise ConfigError(f"--test-fraction {test_fraction}: the data already has a test split ({len(test)} images); "
                          "leave --test-fraction at 0 so the official test split stays untouched")
    if test_fraction > 0:
        group_of = duplicate_patient_groups(pool, hashes)
        drawn = grouped_stratified_split(pool, fraction=test_fraction, seed=seed + 1, name="test", rest="train",
                                         group_of=group_of, findings=findings)
        test = [r for r in drawn if r.split == "test"]
        pool = [r for r in drawn if r.split != "test"]
    pool = [replace(r, split="train") for r in pool]
    numbers = assign_folds(pool, folds=folds, seed=seed, hashes=hashes, findings=findings)
    return pool + test, [*numbers, *([None] * len(test))]


def fold_records(records: Sequence[Record], numbers: Sequence[int | None], fold: int) -> list[Record]:
    """The split of one fold's run: fold ``fold`` as ``val``, the other folds as ``train``; test rows left out."""
    return [replace(r, split="val" if n == fold else "train") for r, n in zip(records, numbers) if n is not None]


def write_fold_split_csv(records: Sequence[Record], numbers: Sequence[int | None], path: Path) -> None:
    """split.csv (as :func:`~medtransfer.data.split.write_split_csv` writes it) with a ``fold`` column last."""
    if len(records) != len(numbers):
        raise DataError(f"{path}: {len(records)} records but {len(numbers)} fold numbers")
    extra = any(r.masked or r.view for r in records)
    rows = (
        [os.path.abspath(r.path), r.label, r.patient_id, r.split]
        + ([join_findings(r.masked), r.view or ""] if extra else []) + ["" if n is None else str(n)]
        for r, n in zip(records, numbers)
    )
    write_csv_atomic(path, SPLIT_CSV_COLUMNS + (SPLIT_CSV_EXTRA_COLUMNS if extra else ()) + (FOLD_COLUMN,), rows)


def read_folds(path: Path) -> list[int | None] | None:
    """The ``fold`` column of a split.csv, row by row (None for an empty cell); None when the file has none."""
    try:
        with Path(path).open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
            reader = csv.DictReader(handle)
            if FOLD_COLUMN not in (reader.fieldnames or []):
                return None
            cells = [(row.get(FOLD_COLUMN) or "").strip() for row in reader]
    except OSError as exc:
        raise DataError(f"{path}: cannot read the split file ({exc.strerror or exc})") from None
    numbers: list[int | None] = []
    for line, cell in enumerate(cells, start=2):
        if not cell:
            numbers.append(None)
        elif cell.isdigit() and int(cell) >= 1:
            numbers.append(int(cell))
        else:
            raise DataError(f"{path}, line {line}: fold must be a whole number from 1; got {cell!r}")
    return numbers
