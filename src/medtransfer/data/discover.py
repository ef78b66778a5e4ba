"""Turn images on disk into records: (path, label, patient_id, split).

Four sources:
- the Kaggle layout, DIR/{train,val,test}/{CLASS}/images (classes are folder names);
- plain class folders, DIR/{CLASS}/images (torchvision's ImageFolder): records without a
  split, which data.split then draws by patient;
- a CSV manifest with columns path,label[,patient_id][,split] (paths relative to the CSV);
- a MedMNIST `.npz` file (see data.npz), its splits kept.

A class map (`--class-map OLD=NEW`) then renames or merges classes.

Patient IDs follow the Kermany file-name rules unless a regex overrides them, because the
chest X-ray set holds several images per patient and splitting by image leaks patients.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from medtransfer.data.manifest import discover_multilabel_csv, is_multilabel
from medtransfer.data.npz import extract_npz
from medtransfer.data.dicom import read_dicom_header
from medtransfer.data.patients import (
    check_views,
    local_salt,
    normalise_view,
    patient_id_from_path,
    salted_patient_id,
    view_from_path,
)
from medtransfer.errors import ConfigError, DataError
from medtransfer.task import MULTI_LABEL, SINGLE_LABEL, Task

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})
SPLIT_NAMES = ("train", "val", "test")
IGNORED_DIR_NAMES = frozenset({"__MACOSX"})

# Kermany names, in the order tried: person123_bacteria_456 -> person123_bacteria;
# NORMAL2-IM-0427-0001 -> NORMAL2-IM-0427; IM-0115-0001 -> IM-0115, also with the extra image
# number 133 Kaggle files carry (IM-0555-0001-0001; NORMAL2-IM-0587-0001-0001 and -0002 are
# byte-identical).
# Kermany numbers pneumonia patients per infection type (in train, 808 person numbers occur
# with both types, and the numbers train and test share all differ in type), so the type
# is part of the patient: person123_bacteria and person123_virus are different children.
KERMANY_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+_[A-Za-z]+)_\d+"),
    re.compile(r"^((?:NORMAL\d*-)?IM-\d+)(?:-\d+)+$"),
)

LABEL_SCHEMES = ("folder", "kermany-3class")


@dataclass(frozen=True)
class Record:
    path: Path
    label: str  # the class; multi-label: the findings present, '|'-joined ('' for none; see medtransfer.task)
    patient_id: str
    split: str | None  # None when the source does not assign one
    masked: tuple[str, ...] = ()  # multi-label: findings whose label is unknown (blank, or uncertain under ignore)
    view: str | None = None  # frontal / lateral where the data says so (CSV column, file name, DICOM ViewPosition)


def patient_id_from_name(path: str | Path, pattern: str | re.Pattern | None = None) -> str:
    """Patient ID from a file name.

    With `pattern`, its first capture group (or whole match) of the file stem is the ID.
    Without it, the Kermany rules apply; a name that fits none is its own patient.

    >>> patient_id_from_name("person123_bacteria_456.jpeg")
    'person123_bacteria'
    >>> patient_id_from_name("NORMAL2-IM-0427-0001.jpeg")
    'NORMAL2-IM-0427'
    """
    stem = Path(path).stem
    if pattern is not None:
        regex = _compile_patient_regex(pattern)
        match = regex.search(stem)
        if match is None:
            raise DataError(
                f"--patient-regex '{regex.pattern}' does not match file name {Path(path).name!r}; "
                "fix the regex or leave it out to use the Kermany naming rules"
            )
        patient = match.group(1) if regex.groups else match.group(0)
        if not patient:
            raise DataError(
                f"--patient-regex '{regex.pattern}' captures an empty patient ID from file name {Path(path).name!r}; "
                "make its first group match at least one character"
            )
        return patient
    for regex in KERMANY_PATIENT_PATTERNS:
        match = regex.match(stem)
        if match:
            return match.group(1)
    return stem


def _compile_patient_regex(pattern: str | re.Pattern) -> re.Pattern:
    if isinstance(pattern, re.Pattern):
        return pattern
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(
            f"--patient-regex '{pattern}': not a valid regular expression ({exc}); "
            r"fix it, e.g. '^(patient\d+)_'"
        ) from None


def kermany_3class_label(path: str | Path, folder_label: str) -> str:
    """NORMAL / BACTERIA / VIRUS from a Kermany file name (the paper's second task)."""
    stem = Path(path).stem.lower()
    if folder_label.upper() == "NORMAL":
        return "NORMAL"
    if "_bacteria_" in stem:
        return "BACTERIA"
    if "_virus_" in stem:
        return "VIRUS"
    raise DataError(
        f"--labels kermany-3class: cannot tell bacteria from virus in file name {Path(path).name!r} "
        f"(class folder {folder_label!r}); names must contain _bacteria_ or _virus_"
    )


def _is_visible_image(path: Path, folder: Path) -> bool:
    """An image file under `folder` that is neither hidden nor inside a hidden or __MACOSX folder."""
    return (
        path.suffix.lower() in IMAGE_SUFFIXES
        and not path.name.startswith(".")
        and not any(part in IGNORED_DIR_NAMES or part.startswith(".") for part in path.relative_to(folder).parts[:-1])
        and path.is_file()
    )


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in IGNORED_DIR_NAMES
    )


def _class_folder_records(class_dir: Path, split: str | None, namer: Callable[[Path], str]) -> list[Record]:
    images = sorted(p for p in class_dir.rglob("*") if _is_visible_image(p, class_dir))
    if not images:
        raise DataError(
            f"--data: folder {class_dir} holds no images (.jpg, .jpeg, .png, .bmp, .tif, .dcm); "
            "add its images or remove the empty folder"
        )
    return [Record(image, class_dir.name, namer(image), split, view=_view(namer, image)) for image in images]


def _view(namer: Callable[[Path], str], image: Path) -> str | None:
    return namer.view(image) if isinstance(namer, PatientNamer) else view_from_path(image)


def discover_folder(
    root: Path, *, patient_regex: str | None = None, namer: Callable[[Path], str] | None = None
) -> list[Record]:
    """Records from DIR/{train,val,test}/{CLASS}/* (absent splits are not listed), or from
    plain class folders DIR/{CLASS}/* when there is no split folder (records without a split)."""
    namer = namer or PatientNamer(root, patient_regex, None)
    split_dirs = [root / name for name in SPLIT_NAMES if (root / name).is_dir()]
    if not split_dirs:
        class_dirs = _visible_dirs(root)
        if not class_dirs:
            found = ", ".join(p.name for p in sorted(root.iterdir())[:8]) or "nothing"
            raise DataError(
                f"--data {root}: expected one folder per class (DIR/CLASS/image.png) or split folders "
                f"train/ (and optionally val/, test/) each holding one folder per class; found {found}"
            )
        nested = [d for d in class_dirs if any((d / name).is_dir() for name in SPLIT_NAMES)]
        if nested:
            raise DataError(f"--data {root}: the split folders sit one level deeper; use --data {nested[0]}")
        return [r for class_dir in class_dirs for r in _class_folder_records(class_dir, None, namer)]
    records: list[Record] = []
    for split_dir in split_dirs:
        class_dirs = _visible_dirs(split_dir)
        if not class_dirs:
            raise DataError(f"--data: split folder {split_dir} has no class folders; add one folder per class")
        for class_dir in class_dirs:
            records += _class_folder_records(class_dir, split_dir.name, namer)
    return records


def discover_csv(
    manifest: Path, *, patient_regex: str | None = None, namer: Callable[[Path], str] | None = None
) -> list[Record]:
    """Records from a CSV with columns path,label[,patient_id][,split]."""
    namer = namer or PatientNamer(manifest.parent, patient_regex, None)
    # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark.
    with manifest.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        # Header names are matched without surrounding spaces and case ("Path", " label").
        reader.fieldnames = [name.strip().lower() for name in reader.fieldnames or []]
        columns = set(reader.fieldnames)
        missing = {"path", "label"} - columns
        if missing:
            raise DataError(
                f"--data {manifest}: CSV manifest lacks column(s) {', '.join(sorted(missing))}; "
                f"found {', '.join(sorted(columns)) or 'no header'}. Required: path,label[,patient_id][,split]"
            )
        records: list[Record] = []
        first_seen: dict[str, tuple[int, str]] = {}  # normalised path -> (line, label) of its first row
        for line_number, row in enumerate(reader, start=2):
            raw_path = (row.get("path") or "").strip()
            label = (row.get("label") or "").strip()
            if not raw_path or not label:
                raise DataError(f"--data {manifest}, line {line_number}: empty path or label; fill both in")
            path = Path(raw_path)
            if not path.is_absolute():
                path = manifest.parent / path
            split = (row.get("split") or "").strip().lower() or None
            if split is not None and split not in SPLIT_NAMES:
                raise DataError(
                    f"--data {manifest}, line {line_number}: split {split!r} is not one of {', '.join(SPLIT_NAMES)}"
                )
            column = (row.get("patient_id") or "").strip()
            patient = namer.from_column(column) if column and isinstance(namer, PatientNamer) else column or namer(path)
            key = os.path.normpath(os.path.abspath(path))
            if key in first_seen:  # a repeat would weigh twice, or land in two splits, or teach two labels
                line, first_label = first_seen[key]
                clash = f" with label {label} where it had {first_label}" if label != first_label else ""
                raise DataError(
                    f"--data {manifest}, line {line_number}: {raw_path} is listed again{clash} (first on line {line}); "
                    "keep one row per image"
                )
            first_seen[key] = (line_number, label)
            view = normalise_view((row.get("view") or "").strip()) or _view(namer, path)
            records.append(Record(path, label, patient, split, view=view))
    if not records:
        raise DataError(f"--data {manifest}: the CSV manifest lists no images")
    return records


def discover_npz(
    path: Path, *, extract_dir: Path | None, class_names: Sequence[str] | None = None
) -> tuple[list[Record], list[str] | None]:
    """Records from a MedMNIST `.npz` (splits kept; each image is its own patient), and the findings
    of a multi-label file (None: one class per image)."""
    if extract_dir is None:
        raise ConfigError(f"--data {path}: an .npz source needs a folder to write its images to (the cache folder)")
    extracted, findings = extract_npz(path, extract_dir, class_names=class_names)
    return [Record(png, label, png.stem, split) for png, label, split in extracted], findings


@dataclass(frozen=True)
class Discovered:
    """What discovery found: the records and the task they define (kind, classes or findings in order)."""

    records: list[Record]
    task: Task
    patient_rules: Counter  # rule name -> images whose patient ID it gave (data.patients)


def discover(data: str | Path, **options) -> list[Record]:
    """The records of :func:`discover_data` (same options)."""
    return discover_data(data, **options).records


def discover_data(
    data: str | Path,
    *,
    patient_regex: str | None = None,
    labels: str = "folder",
    class_map: Mapping[str, str] | None = None,
    class_names: Sequence[str] | None = None,
    extract_dir: str | Path | None = None,
    labels_column: str | None = None,
    findings: Sequence[str] | None = None,
    uncertain: str = "ignore",
    views: Sequence[str] | None = None,
    salt_dir: str | Path | None = None,
) -> Discovered:
    """Records from a folder, a CSV manifest or a MedMNIST `.npz`, label scheme and class map applied.

    `class_names` names an `.npz` file's class indices; `extract_dir` is where its images are
    written as PNG files (the CLI passes CACHE_DIR/npz). A CSV with a `labels` column or one
    column per finding, or an `.npz` with one label column per finding, is multi-label
    (:mod:`medtransfer.data.manifest`). `views` keeps images of those views only (frontal,
    lateral). `salt_dir` holds the secret that hashes DICOM PatientIDs (the cache folder).
    """
    root = Path(data)
    if labels not in LABEL_SCHEMES:
        raise ConfigError(f"--labels: got {labels!r}; choose one of {', '.join(LABEL_SCHEMES)}")
    if not root.exists():
        raise DataError(
            f"--data {root}: no such file or folder; pass the dataset folder (DIR/CLASS/... or DIR/train/CLASS/...), "
            "a CSV manifest or a MedMNIST .npz"
        )
    is_npz = root.is_file() and root.suffix.lower() == ".npz"
    if class_names is not None and not is_npz:
        raise ConfigError("--class-names names the class indices of an .npz file; to rename folder classes use --class-map")
    namer = PatientNamer(root if root.is_dir() else root.parent, patient_regex, salt_dir)
    order: list[str] | None = None
    if is_npz:
        if patient_regex is not None:
            raise ConfigError("--patient-regex: an .npz file has no patient IDs in file names; leave it out")
        records, order = discover_npz(
            root, extract_dir=None if extract_dir is None else Path(extract_dir), class_names=class_names or findings
        )
        namer.rules["npz"] += len(records)
    elif root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(f"--data {root}: a file must be a CSV manifest (path,label[,patient_id][,split]) or an .npz")
        if is_multilabel(root, labels_column=labels_column, findings=findings):
            rows, order = discover_multilabel_csv(root, labels_column=labels_column, findings=findings, uncertain=uncertain)
            records = []
            for p, label, patient, masked, split, view in rows:
                patient_id = namer.from_column(patient) if patient else namer(p)  # reads a DICOM's ViewPosition too
                records.append(Record(p, label, patient_id, split, masked, view or namer.view(p)))
        else:
            records = discover_csv(root, patient_regex=patient_regex, namer=namer)
    else:
        records = discover_folder(root, patient_regex=patient_regex, namer=namer)
    if order is None and (labels_column or findings):
        raise ConfigError("--labels-column and --findings describe a multi-label CSV manifest or .npz; leave them out for class folders")
    if views:
        records = _keep_views(records, check_views(",".join(views)), root)
    if order is not None:
        if labels != "folder" or class_map:
            raise ConfigError("--labels kermany-3class and --class-map apply to single-label classes; leave them out for multi-label data")
        return Discovered(records, Task(MULTI_LABEL, tuple(order)), namer.rules)
    if labels == "kermany-3class":
        records = [replace(r, label=kermany_3class_label(r.path, r.label)) for r in records]
    if class_map:
        records = apply_class_map(records, class_map)
    check_class_sets(records)
    return Discovered(records, Task(SINGLE_LABEL, tuple(sorted({r.label for r in records}))), namer.rules)


def _keep_views(records: list[Record], wanted: tuple[str, ...], root: Path) -> list[Record]:
    views = {r.view for r in records if r.view is not None}
    if not views:
        raise DataError(
            f"--views {','.join(wanted)}: {root} says nothing about views (no view column, no view1_frontal-style "
            "file names, no DICOM ViewPosition); leave --views out"
        )
    kept = [r for r in records if r.view in wanted]
    if not kept:
        found = ", ".join(sorted(views))
        raise DataError(f"--views {','.join(wanted)}: no image of that view in {root}; views found: {found}")
    return kept


class PatientNamer:
    """The patient ID of a path by the field's naming rules (data.patients), counting which rule fired.

    A DICOM file's PatientID tag comes first (as a salted hash, never in clear), then
    --patient-regex, then the naming rules; a name that fits none is its own patient.
    """

    def __init__(self, root: Path, regex: str | None, salt_dir: str | Path | None):
        self.root, self.regex, self.salt_dir = root, regex, salt_dir
        self.rules: Counter = Counter()
        self.views: dict[Path, str | None] = {}  # DICOM ViewPosition, read with the PatientID
        self._salt: bytes | None = None

    def view(self, path: Path) -> str | None:
        """The view of an image: its DICOM ViewPosition tag, else CheXpert-style file names."""
        if path not in self.views and self._reads_dicom(path) and path.is_file():  # a CSV patient column: not yet read
            self.views[path] = normalise_view(read_dicom_header(path).view_position)
        return self.views.get(path) or view_from_path(path)

    def _reads_dicom(self, path: Path) -> bool:
        return path.suffix.lower() in (".dcm", ".dicom") and self.salt_dir is not None

    def from_column(self, patient: str) -> str:
        """A patient ID the data gives in a column, counted as such."""
        self.rules["csv"] += 1
        return patient

    def __call__(self, path: Path) -> str:
        if self._reads_dicom(path):
            header = read_dicom_header(path)
            self.views[path] = normalise_view(header.view_position)
            if self.regex is None and header.patient_id is not None:
                if self._salt is None:
                    assert self.salt_dir is not None  # _reads_dicom: only with a salt folder
                    self._salt = local_salt(Path(self.salt_dir))
                self.rules["dicom"] += 1
                return salted_patient_id(header.patient_id, self._salt)  # never the clear ID
        patient, rule = patient_id_from_path(path, root=self.root, pattern=self.regex)
        self.rules[rule] += 1
        return patient


def apply_class_map(records: list[Record], class_map: Mapping[str, str]) -> list[Record]:
    """Records with classes renamed (or merged, where several OLD share a NEW) in one step.

    Every OLD must be a class of the data, so a typo does not silently leave a class as it is.
    """
    found = sorted({r.label for r in records})
    missing = [old for old in class_map if old not in found]
    if missing:
        raise ConfigError(
            f"--class-map: class {', '.join(map(repr, missing))} does not exist; classes found: {', '.join(found)}"
        )
    return [replace(r, label=class_map.get(r.label, r.label)) for r in records]


def check_class_sets(records: list[Record]) -> None:
    """Every split that is present must have images and the same classes as the others."""
    by_split: dict[str, dict[str, int]] = {}
    for record in records:
        counts = by_split.setdefault(record.split or "unassigned", {})
        counts[record.label] = counts.get(record.label, 0) + 1
    if not records:
        raise DataError("--data: no images found (looked for .jpg, .jpeg, .png, .bmp, .tif, .dcm files)")
    reference_split = "train" if "train" in by_split else next(iter(by_split))
    reference = set(by_split[reference_split])
    for split, counts in by_split.items():
        if split == "val":
            continue  # val is pooled with train and re-split; its class set need not be complete
        if set(counts) != reference:
            raise DataError(
                f"--data: split {split!r} has classes {sorted(counts)} but {reference_split!r} has {sorted(reference)}; "
                "every split needs the same class folders"
            )
    if len(reference) < 2:
        raise DataError(f"--data: found only class {sorted(reference)}; a classifier needs at least two classes")
