"""Which patient groups a split draws: stratified by class, or over findings (multi-label).

Both choose whole groups (a patient, or patients merged because they share an image, see
data.split.duplicate_patient_groups) and keep at least one group on the other side.

Single-label (`class_quota_split`): each group's stratum is its most frequent label; groups
are shuffled (seeded) within their stratum and taken until the stratum's image quota is met.

Multi-label (`iterative_group_split`): iterative stratification, Sechidis, Tsoumakas &
Vlahavas 2011, "On the stratification of multi-label data" (ECML PKDD), adapted to groups:
each group is one unit carrying its image count and, per finding, the sum of its images'
known positives. Repeatedly the finding with the fewest positives still unassigned is taken,
and the groups that carry it, largest first, go to the side (the drawn split or the rest)
whose remaining demand for that finding is largest; ties go to the side with the larger
remaining image demand, then to the seeded RNG's choice. Groups with no positive finding are
then placed, largest first, by remaining image demand alone.

The maintained `iterative-stratification` package (MultilabelStratifiedShuffleSplit,
MultilabelStratifiedKFold) stratifies single images and takes no groups; splitting one
patient's images across train and val leaks, hence this implementation.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from medtransfer.data.discover import Record
from medtransfer.task import split_findings

DRAWN, REST = 0, 1
_DIGITS = 9  # demands are fractions of counts; compared at this precision so that ties are ties


@dataclass(frozen=True)
class GroupCounts:
    """One unit of the split: its images and, per finding (in the findings' order), its known positives."""

    images: int
    positives: tuple[int, ...]


def _patient_strata(records: Sequence[Record], group_of: Mapping[str, str]) -> dict[str, str]:
    """Each group's stratum: the most frequent label among its images (ties: alphabetical)."""
    labels: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        labels[group_of.get(r.patient_id, r.patient_id)][r.label] += 1
    return {p: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for p, c in labels.items()}


def class_quota_split(records: Sequence[Record], *, fraction: float, seed: int, group_of: Mapping[str, str]) -> set[str]:
    """The groups drawn: about `fraction` of each class's images (single-label)."""
    strata = _patient_strata(records, group_of)
    images_per_patient = Counter(group_of.get(r.patient_id, r.patient_id) for r in records)
    rng = random.Random(seed)
    chosen: set[str] = set()
    for stratum in sorted(set(strata.values())):
        patients = sorted(p for p, s in strata.items() if s == stratum)
        rng.shuffle(patients)
        quota = fraction * sum(images_per_patient[p] for p in patients)
        taken = 0
        # Keep at least one patient of every stratum on the other side.
        for patient in patients[: len(patients) - 1]:
            if taken >= quota:
                break
            chosen.add(patient)
            taken += images_per_patient[patient]
    return chosen


def known_positives(record: Record, findings: Sequence[str]) -> list[str]:
    """The findings (among `findings`) a record is positive for; a masked finding is unknown, not positive."""
    present = set(split_findings(record.label)) - set(record.masked)
    return [f for f in findings if f in present]


def group_counts(records: Sequence[Record], findings: Sequence[str], group_of: Mapping[str, str]) -> dict[str, GroupCounts]:
    """Each group's image count and per-finding positive counts (groups: `group_of` merging patients)."""
    images: Counter[str] = Counter()
    positives: dict[str, Counter[str]] = defaultdict(Counter)
    for r in records:
        group = group_of.get(r.patient_id, r.patient_id)
        images[group] += 1
        positives[group].update(known_positives(r, findings))
    return {g: GroupCounts(n, tuple(positives[g][f] for f in findings)) for g, n in images.items()}


def iterative_group_split(groups: Mapping[str, GroupCounts], *, fraction: float, seed: int) -> set[str]:
    """The groups drawn (about `fraction` of the images and of each finding's positives).

    Deterministic for a seed and independent of the mapping's order. Every finding with a
    positive keeps at least one positive group on the other side, and so does the split as a
    whole (at least one group): a single group is never drawn.
    """
    rng = random.Random(seed)
    order = sorted(groups)
    rng.shuffle(order)  # the seeded order among groups of equal size
    width = len(groups[order[0]].positives) if order else 0
    shares = (fraction, 1.0 - fraction)
    total_images = sum(g.images for g in groups.values())
    image_demand = [share * total_images for share in shares]
    demand = [[share * sum(g.positives[k] for g in groups.values()) for k in range(width)] for share in shares]
    held = [[0] * width, [0] * width]  # positives placed on each side
    side_of: dict[str, int] = {}

    def place(name: str, side: int) -> None:
        side_of[name] = side
        image_demand[side] -= groups[name].images
        for k, count in enumerate(groups[name].positives):
            demand[side][k] -= count
            held[side][k] += count

    def pick(first: Sequence[float]) -> int:
        keys = [(round(first[s], _DIGITS), round(image_demand[s], _DIGITS)) for s in (DRAWN, REST)]
        if keys[DRAWN] == keys[REST]:
            return rng.choice((DRAWN, REST))
        return DRAWN if keys[DRAWN] > keys[REST] else REST

    while True:
        left = [sum(groups[n].positives[k] for n in order if n not in side_of) for k in range(width)]
        pending = [k for k in range(width) if left[k] > 0]
        if not pending:
            break
        k = min(pending, key=lambda i: (left[i], i))  # the rarest finding still unassigned
        carriers = sorted(
            (n for n in order if n not in side_of and groups[n].positives[k] > 0),
            key=lambda n: (-groups[n].positives[k], -groups[n].images),
        )
        for i, name in enumerate(carriers):
            last = i == len(carriers) - 1
            # As in the single-label split: keep a positive of every finding on the other side.
            place(name, REST if last and held[REST][k] == 0 else pick((demand[DRAWN][k], demand[REST][k])))
    for name in sorted((n for n in order if n not in side_of), key=lambda n: -groups[n].images):
        place(name, pick(image_demand))
    if order and REST not in side_of.values():  # no finding's positive kept one back (or a single group)
        side_of[min(side_of, key=lambda n: groups[n].images)] = REST
    return {name for name, side in side_of.items() if side == DRAWN}
