"""Tests for medtransfer.data.stratify: which patient groups a split draws (by class, or over findings)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from medtransfer.data.discover import Record
from medtransfer.data.stratify import (
    GroupCounts,
    class_quota_split,
    group_counts,
    iterative_group_split,
    known_positives,
)


def random_groups(seed: int, n: int = 200, width: int = 4) -> dict[str, GroupCounts]:
    rng = random.Random(seed)
    prevalence = [0.4, 0.15, 0.05, 0.02][:width]
    out = {}
    for g in range(n):
        images = rng.randint(1, 4)
        out[f"g{g}"] = GroupCounts(images, tuple(sum(rng.random() < p for _ in range(images)) for p in prevalence))
    return out


def drawn_share(groups: dict[str, GroupCounts], chosen: set[str], k: int | None = None) -> float:
    count = (lambda g: g.images) if k is None else (lambda g: g.positives[k])
    return sum(count(groups[n]) for n in chosen) / sum(count(g) for g in groups.values())


@pytest.mark.parametrize(
    "label, masked, findings, expected",
    [
        ("Mass|Nodule", (), ("Nodule", "Mass"), ["Nodule", "Mass"]),  # in the findings' order
        ("Mass|Nodule", ("Mass",), ("Mass", "Nodule"), ["Nodule"]),  # masked: unknown, not positive
        ("", ("Mass",), ("Mass",), []),
        ("No Finding", (), ("Mass",), []),
        ("Hernia|Mass", (), ("Mass",), ["Mass"]),  # a finding outside the task is ignored
    ],
)
def test_known_positives(label, masked, findings, expected):
    assert known_positives(Record(Path("/x.png"), label, "p", None, masked), findings) == expected


def test_group_counts_sum_images_and_known_positives_per_group():
    records = [
        Record(Path("/a1.png"), "Mass", "a", None),
        Record(Path("/a2.png"), "Mass|Nodule", "a", None, ("Nodule",)),
        Record(Path("/b1.png"), "Nodule", "b", None),
        Record(Path("/c1.png"), "", "c", None),
    ]
    assert group_counts(records, ("Mass", "Nodule"), {"b": "a"}) == {
        "a": GroupCounts(3, (2, 1)),
        "c": GroupCounts(1, (0, 0)),
    }


@pytest.mark.parametrize(
    "groups",
    [
        {"only": GroupCounts(5, (3,))},
        {"only": GroupCounts(5, ())},
    ],
    ids=["with-positives", "without-findings"],
)
@pytest.mark.parametrize("fraction", [0.2, 0.8])
def test_a_single_group_is_never_drawn(groups, fraction):
    assert iterative_group_split(groups, fraction=fraction, seed=0) == set()


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5, 0.8])
@pytest.mark.parametrize("seed", range(3))
def test_every_finding_keeps_a_positive_on_the_other_side(fraction, seed):
    groups = random_groups(seed, n=60)
    chosen = iterative_group_split(groups, fraction=fraction, seed=seed)
    for k in range(4):
        if any(g.positives[k] for g in groups.values()):
            assert any(g.positives[k] for n, g in groups.items() if n not in chosen), k


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.3])
def test_drawn_share_of_images_and_of_each_findings_positives_is_near_fraction(fraction):
    groups = random_groups(1, n=400)
    chosen = iterative_group_split(groups, fraction=fraction, seed=5)
    assert abs(drawn_share(groups, chosen) - fraction) < 0.01
    for k in range(3):  # the rarest (about 20 positives) is checked by count below
        assert abs(drawn_share(groups, chosen, k) - fraction) < 0.03, k
    rare = sum(g.positives[3] for g in groups.values())
    assert abs(sum(groups[n].positives[3] for n in chosen) - fraction * rare) <= 1


def test_groups_without_positives_fill_the_image_demand():
    groups = {f"g{i}": GroupCounts(1, ()) for i in range(10)}
    assert len(iterative_group_split(groups, fraction=0.3, seed=2)) == 3


def test_same_seed_same_groups_whatever_the_order_and_seeds_differ():
    groups = random_groups(3)
    first = iterative_group_split(groups, fraction=0.2, seed=1)
    assert iterative_group_split(dict(reversed(list(groups.items()))), fraction=0.2, seed=1) == first
    assert iterative_group_split(groups, fraction=0.2, seed=2) != first


def test_class_quota_split_takes_each_class_share_and_keeps_one_patient_back():
    records = [Record(Path(f"/{c}{p}_{i}.png"), c, f"{c}{p}", None) for c in "AB" for p in range(50) for i in range(2)]
    records += [Record(Path("/C0.png"), "C", "C0", None)]  # a class of one patient stays on the other side
    chosen = class_quota_split(records, fraction=0.2, seed=0, group_of={})
    assert sum(p.startswith("A") for p in chosen) == sum(p.startswith("B") for p in chosen) == 10
    assert "C0" not in chosen
