"""Patient-grouped, stratified re-split and the leakage check (patient IDs, bytes, content).

The official chest X-ray val split has 16 images, far too few to stop training or pick a
threshold on. By default train and val are pooled and a validation split is drawn by
patient, stratified by class, so that no patient's images sit on both sides. Data without
a test split (plain class folders) gets one drawn the same way first. Multi-label data
(several findings per image) is stratified over its findings (data.stratify).
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from medtransfer.data.discover import Record
from medtransfer.data.near_duplicates import (
    HASH_METHOD,
    MAX_DISTANCE,
    MIN_CORRELATION,
    ImageHashes,
    NearDuplicate,
    closest_distance,
    hash_images,
    near_duplicate_pairs,
)
from medtransfer.data.stratify import (
    class_quota_split,
    group_counts,
    iterative_group_split,
    known_positives,
)
from medtransfer.errors import ConfigError, DataError
from medtransfer.safeio import write_csv_atomic
from medtransfer.task import LABEL_SEPARATOR, NO_FINDING, join_findings

SPLIT_CSV_COLUMNS = ("path", "label", "patient_id", "split")
SPLIT_CSV_EXTRA_COLUMNS = ("masked", "view")  # written only when some record has masked findings or a view
DEFAULT_TEST_FRACTION = 0.2  # drawn by patient when the data has no test split


@dataclass
class LeakageReport:
    """What the leakage check compared across splits, and what it found.

    `clean` is False on any finding; the pipeline fails on it under --strict.
    """

    shared_patients: list[tuple[str, list[str]]] = field(default_factory=list)  # (patient, splits)
    duplicate_images: list[tuple[list[str], list[str]]] = field(default_factory=list)  # (paths, splits)
    near_duplicates: list[NearDuplicate] = field(default_factory=list)  # by content, across splits
    # Each shared patient's closest pair of images in different splits (bits; None: not compared).
    shared_patient_distance: dict[str, int | None] = field(default_factory=dict)
    shared_patients_with_copies: list[str] = field(default_factory=list)  # a near-duplicate across splits
    images_per_split: dict[str, int] = field(default_factory=dict)
    bytes_checked: bool = True
    content_checked: bool = True
    content_unreadable: int = 0  # images the content check could not decode (the cache lists them)
    max_distance: int = MAX_DISTANCE

    @property
    def clean(self) -> bool:
        return not self.shared_patients and not self.duplicate_images and not self.near_duplicates

    @property
    def shared_patients_alike(self) -> int:
        """Shared patients with a near-duplicate image of their own in another split."""
        return len(self.shared_patients_with_copies)

    def summary(self) -> str:
        """One line: what was checked and what was found."""
        splits = ", ".join(f"{s} {n:,}" for s, n in self.images_per_split.items())
        found = [
            f"{len(self.shared_patients):,} patient ID(s) in two splits" if self.shared_patients
            else "no patient ID in two splits"
        ]
        if self.bytes_checked:
            found.append(
                f"{len(self.duplicate_images):,} byte-identical image(s) in two splits" if self.duplicate_images
                else "no identical file in two splits"
            )
        if self.content_checked:
            by = f"by content ({HASH_METHOD} within {self.max_distance} bits, pixel correlation >= {MIN_CORRELATION}"
            by += f"; {self.content_unreadable:,} unreadable image(s) not compared):" if self.content_unreadable else "):"
            other = " other" if self.duplicate_images else ""  # identical files are near-duplicates too
            found.append(
                f"{by} {len(self.near_duplicates):,}{other} near-duplicate pair(s) in two splits" if self.near_duplicates
                else f"{by} no{other} near-duplicate in two splits"
            )
        total = sum(self.images_per_split.values())
        return f"Leakage check on {total:,} images ({splits}): " + "; ".join(found) + "."

    def lines(self, *, examples: int = 5) -> list[str]:
        """One line per finding, with examples."""
        out = []
        if self.shared_patients:
            shown = "; ".join(f"{p} in {'+'.join(s)}" for p, s in self.shared_patients[:examples])
            out.append(
                f"{len(self.shared_patients)} patient(s) appear in more than one split, e.g. {shown}"
                + self._shared_patient_content()
            )
        if self.duplicate_images:
            shown = "; ".join(f"{' = '.join(p)} ({'+'.join(s)})" for p, s in self.duplicate_images[:examples])
            out.append(f"{len(self.duplicate_images)} byte-identical image(s) appear in more than one split, e.g. {shown}")
        if self.near_duplicates:
            shown = "; ".join(
                f"{p.path_a} ({p.split_a}) ~ {p.path_b} ({p.split_b}), {p.distance} bits"
                for p in self.near_duplicates[:examples]
            )
            out.append(f"{len(self.near_duplicates)} near-duplicate image pair(s) by content in different splits, e.g. {shown}")
        return out

    def _shared_patient_content(self) -> str:
        if not self.content_checked:
            return ""
        distances = [d for d in self.shared_patient_distance.values() if d is not None]
        if not distances:
            return "; their images could not be compared by content"
        if self.shared_patients_alike:
            return f"; by content, {self.shared_patients_alike} of them have a near-duplicate image in another split"
        return (
            f"; by content, none of them has a near-duplicate image in another split "
            f"(closest hashes {min(distances)} bits apart)"
        )

    def to_dict(self, *, pairs: int = 50) -> dict:
        """For metrics.json: counts, the summary line, examples and the first `pairs` near-duplicate pairs."""
        return {
            "clean": self.clean,
            "shared_patients": len(self.shared_patients),
            "duplicate_images": len(self.duplicate_images),
            "near_duplicates": len(self.near_duplicates),
            "shared_patients_with_near_duplicates": self.shared_patients_alike,
            "summary": self.summary(),
            "examples": self.lines(),
            "checked": {
                "patient_ids": True,
                "bytes": self.bytes_checked,
                "content": (
                    f"{HASH_METHOD} at most {self.max_distance} bits apart, thumbnails correlated >= {MIN_CORRELATION}"
                    if self.content_checked else None
                ),
                "content_unreadable": self.content_unreadable,
            },
            "near_duplicate_pairs": [
                {"path_a": str(p.path_a), "split_a": p.split_a, "path_b": str(p.path_b), "split_b": p.split_b,
                 "distance": p.distance, "correlation": p.correlation}
                for p in self.near_duplicates[:pairs]
            ],
        }


def grouped_stratified_split(
    records: list[Record],
    *,
    fraction: float,
    seed: int,
    name: str,
    rest: str,
    group_of: dict[str, str] | None = None,
    findings: Sequence[str] | None = None,
) -> list[Record]:
    """Assign about `fraction` of each class's images, whole patients at a time, to split `name`.

    Patients are shuffled (seeded) within their stratum and taken until the stratum's image
    quota is met, so the split is deterministic for a seed and stratified by images. Given
    `findings` (multi-label), patient groups are stratified over the findings' positives
    instead, by iterative stratification. Both keep a patient on the other side (data.stratify).
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"--{name}-fraction: got {fraction}; use a number between 0 and 1, e.g. 0.2")
    group_of = group_of or {}
    if findings is None:
        chosen = class_quota_split(records, fraction=fraction, seed=seed, group_of=group_of)
    else:
        chosen = iterative_group_split(group_counts(records, findings, group_of), fraction=fraction, seed=seed)
    assigned = [replace(r, split=name if group_of.get(r.patient_id, r.patient_id) in chosen else rest) for r in records]
    if not any(r.split == name for r in assigned):
        patients = len({group_of.get(r.patient_id, r.patient_id) for r in records})
        raise DataError(
            f"--{name}-fraction {fraction}: too few patients ({patients}) to draw a {name} split; add images"
        )
    return assigned


def resplit(
    records: list[Record],
    *,
    val_fraction: float = 0.2,
    test_fraction: float | None = None,
    seed: int = 0,
    keep_official_val: bool = False,
    hashes: ImageHashes | None = None,
    findings: Sequence[str] | None = None,
) -> list[Record]:
    """Pool train+val (and unassigned records) and draw a patient-level validation split.

    The test split is never touched. When the source has none, a patient-level test split
    is drawn first from the pool: `test_fraction` of the images, DEFAULT_TEST_FRACTION when
    it is None; 0 draws none. With `keep_official_val` the data's val split is kept as is
    (and a test split, if drawn, comes from the rest). Images that are byte-identical, or
    near-duplicates by `hashes`, travel together even when filed under different patients.
    Multi-label data passes its `findings` (the task's classes) to be stratified over them.
    """
    test = [r for r in records if r.split == "test"]
    pool = [r for r in records if r.split != "test"]
    # Copies filed under different patients travel together, so the split itself never
    # creates the leakage that check_leakage would then report.
    group_of = duplicate_patient_groups(pool, hashes)
    official_val: list[Record] = []
    if keep_official_val:
        official_val = [r for r in pool if r.split == "val"]
        if not official_val:
            raise DataError("--keep-official-val: the data has no val split; leave the option out to draw one")
        pool = [replace(r, split="train") for r in pool if r.split != "val"]
    if test_fraction is None:
        test_fraction = 0.0 if test else DEFAULT_TEST_FRACTION
    elif test_fraction > 0 and test:
        raise ConfigError(
            f"--test-fraction {test_fraction}: the data already has a test split ({len(test)} images); "
            "leave --test-fraction at 0 so the official test split stays untouched"
        )
    if test_fraction > 0:
        drawn = grouped_stratified_split(
            pool, fraction=test_fraction, seed=seed + 1, name="test", rest="train", group_of=group_of, findings=findings
        )
        test = [r for r in drawn if r.split == "test"]
        pool = [r for r in drawn if r.split != "test"]
    if keep_official_val:
        return pool + official_val + test
    pool = grouped_stratified_split(
        pool, fraction=val_fraction, seed=seed, name="val", rest="train", group_of=group_of, findings=findings
    )
    return pool + test


def file_digest(path: Path) -> str:
    try:
        return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    except OSError as exc:
        raise DataError(
            f"--data: cannot read image {path} ({exc.strerror or exc}); restore the file or remove it from the data"
        ) from None


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise DataError(
            f"--data: cannot read image {path} ({exc.strerror or exc}); restore the file or remove it from the data"
        ) from None


def identical_images(
    records: list[Record], *, across_splits_only: bool = False, skip_unreadable: bool = False
) -> list[list[Record]]:
    """Groups of records whose files are byte-identical (two or more per group).

    Only files of equal size can be identical, so just those (usually few) are hashed.
    With `skip_unreadable`, missing files are left out here (image loading reports them).
    """
    by_size: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        if skip_unreadable and not r.path.is_file():
            continue
        by_size[_file_size(r.path)].append(r)
    by_digest: dict[str, list[Record]] = defaultdict(list)
    for same_size in by_size.values():
        if len(same_size) < 2 or (across_splits_only and len({r.split or "unassigned" for r in same_size}) < 2):
            continue
        for r in same_size:
            by_digest[file_digest(r.path)].append(r)
    return [group for group in by_digest.values() if len(group) > 1]


def duplicate_patient_groups(records: list[Record], hashes: ImageHashes | None = None) -> dict[str, str]:
    """patient -> representative patient, merging patients that share a byte-identical image
    (and, given `hashes`, a near-duplicate one)."""
    parent: dict[str, str] = {}

    def find(patient: str) -> str:
        while parent.get(patient, patient) != patient:
            patient = parent[patient]
        return patient

    patient_of = {r.path: r.patient_id for r in records}
    groups = [[r.patient_id for r in group] for group in identical_images(records, skip_unreadable=True)]
    if hashes is not None:
        groups += [
            [patient_of[p.path_a], patient_of[p.path_b]]
            for p in near_duplicate_pairs(records, hashes, across_splits=False)
        ]
    for group in groups:
        roots = sorted({find(patient) for patient in group})
        for other in roots[1:]:
            parent[other] = roots[0]
    return {patient: find(patient) for patient in parent}


def check_leakage(
    records: list[Record],
    *,
    check_bytes: bool = True,
    check_content: bool = True,
    hashes: ImageHashes | None = None,
    max_distance: int = MAX_DISTANCE,
) -> LeakageReport:
    """Patients, byte-identical images and near-duplicate images (by content) in more than one split.

    Pass the `hashes` that `resplit` used so that images are hashed once; without them the
    content check hashes the images itself.
    """
    report = LeakageReport(bytes_checked=check_bytes, content_checked=check_content, max_distance=max_distance)
    report.images_per_split = dict(sorted(Counter(r.split or "unassigned" for r in records).items()))
    patient_splits: dict[str, set[str]] = defaultdict(set)
    for r in records:
        patient_splits[r.patient_id].add(r.split or "unassigned")
    report.shared_patients = sorted((p, sorted(s)) for p, s in patient_splits.items() if len(s) > 1)
    if check_bytes:
        for group in identical_images(records, across_splits_only=True):
            splits = sorted({r.split or "unassigned" for r in group})
            if len(splits) > 1:
                report.duplicate_images.append(([str(r.path) for r in group], splits))
        report.duplicate_images.sort()
    if check_content:
        hashes = hashes if hashes is not None else hash_images([r.path for r in records])
        report.content_unreadable = len({r.path for r in records} & set(hashes.unreadable))
        identical = {frozenset(paths) for paths, _ in report.duplicate_images}
        report.near_duplicates = [  # a byte-identical copy is reported once, as such
            p for p in near_duplicate_pairs(records, hashes, max_distance=max_distance)
            if not any({str(p.path_a), str(p.path_b)} <= group for group in identical)
        ]
        report.shared_patient_distance = _shared_patient_distances(records, report.shared_patients, hashes)
        patient_of = {r.path: r.patient_id for r in records}
        report.shared_patients_with_copies = sorted(
            {patient_of[p.path_a] for p in report.near_duplicates if patient_of[p.path_a] == patient_of[p.path_b]}
        )
    return report


def _shared_patient_distances(
    records: list[Record], shared: list[tuple[str, list[str]]], hashes: ImageHashes
) -> dict[str, int | None]:
    """Each shared patient's closest pair of images in different splits, in hash bits."""
    paths: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for r in records:
        paths[(r.patient_id, r.split or "unassigned")].append(r.path)
    out: dict[str, int | None] = {}
    for patient, splits in shared:
        distances = [
            closest_distance(paths[(patient, a)], paths[(patient, b)], hashes)
            for i, a in enumerate(splits)
            for b in splits[i + 1 :]
        ]
        known = [d for d in distances if d is not None]
        out[patient] = min(known) if known else None
    return out


def split_summary(records: list[Record], *, findings: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, int]]]:
    """{split: {class: {"images": n, "patients": m}}} for the report and the console.

    Given `findings` (multi-label), one entry per finding instead: {"images": positive images,
    "patients": patients with one, "known": images whose label for it is known}, then NO_FINDING:
    the images with no known positive (its "known": every image of the split).
    """
    if findings is not None:
        return {split: _finding_counts([r for r in records if (r.split or "unassigned") == split], findings)
                for split in sorted({r.split or "unassigned" for r in records})}
    images: dict[tuple[str, str], int] = Counter()
    patients: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in records:
        key = (r.split or "unassigned", r.label)
        images[key] += 1
        patients[key].add(r.patient_id)
    summary: dict[str, dict[str, dict[str, int]]] = {}
    for (split, label), n in sorted(images.items()):
        summary.setdefault(split, {})[label] = {"images": n, "patients": len(patients[(split, label)])}
    return summary


def _finding_counts(records: list[Record], findings: Sequence[str]) -> dict[str, dict[str, int]]:
    positive = [set(known_positives(r, findings)) for r in records]

    def entry(has: list[bool], known: int) -> dict[str, int]:
        patients = {r.patient_id for r, yes in zip(records, has) if yes}
        return {"images": sum(has), "patients": len(patients), "known": known}

    counts = {f: entry([f in p for p in positive], sum(f not in r.masked for r in records)) for f in findings}
    return {**counts, NO_FINDING: entry([not p for p in positive], len(records))}


def summary_lines(summary: dict[str, dict[str, dict[str, int]]]) -> list[str]:
    """One console line per split: images and patients per class (multi-label: positives per
    finding, and the images whose label is known where that is not every image of the split)."""
    lines = []
    for split, per_class in summary.items():
        total = max((c.get("known", 0) for c in per_class.values()), default=0)  # multi-label: the split's images
        lines.append(f"  {split:5s}: " + ", ".join(
            f"{label} {c['images']} images / {c['patients']} patients"
            + (f" ({c['known']} known)" if c.get("known", total) != total else "")
            for label, c in per_class.items()
        ))
    return lines


def write_split_csv(records: list[Record], path: Path) -> None:
    """Atomically, with absolute paths (a resumed run may start in another folder); a file
    name that is not UTF-8 is kept byte for byte (surrogateescape). The columns masked
    (findings, '|'-joined) and view follow only when some record has masked findings or a view."""
    extra = any(r.masked or r.view for r in records)
    rows = (
        [os.path.abspath(r.path), r.label, r.patient_id, r.split] + ([join_findings(r.masked), r.view or ""] if extra else [])
        for r in records
    )
    write_csv_atomic(path, SPLIT_CSV_COLUMNS + (SPLIT_CSV_EXTRA_COLUMNS if extra else ()), rows)


def read_split_csv(path: Path) -> list[Record]:
    """Records from a split.csv written by `write_split_csv` (an empty split or view reads back as None)."""
    try:
        handle = path.open(newline="", encoding="utf-8-sig", errors="surrogateescape")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the split file ({exc.strerror or exc}); check the run folder") from None
    with handle:
        reader = csv.DictReader(handle)
        missing = [c for c in SPLIT_CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{path}: split file lacks column(s) {', '.join(missing)}; "
                f"found {', '.join(reader.fieldnames or []) or 'no header'}. Expected {','.join(SPLIT_CSV_COLUMNS)}"
            )
        return [
            Record(
                Path(row["path"]), row["label"], row["patient_id"], row["split"] or None,
                masked=tuple(m for m in (row.get("masked") or "").split(LABEL_SEPARATOR) if m), view=row.get("view") or None,
            )
            for row in reader
        ]
