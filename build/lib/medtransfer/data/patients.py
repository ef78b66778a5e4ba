"""Patient IDs and radiographic views from the naming of public datasets and DICOM headers.

A split by image lets follow-ups of one person land in train and test; a split by patient
needs the patient of every image. Datasets carry it in their own naming, recognised here by
an ordered table of named rules (:data:`PATIENT_RULES`, first match wins), applied to a path
relative to the dataset root:

========  =========================================================  ===================
rule      naming                                                     patient
========  =========================================================  ===================
kermany   ``person123_bacteria_456.jpeg``, ``NORMAL2-IM-0427-0001``  ``person123_bacteria``,
                                                                     ``NORMAL2-IM-0427``
nih       ``00000061_012.png`` (NIH ChestX-ray14)                    ``00000061``
chexpert  ``train/patient00001/study1/view1_frontal.jpg``            ``patient00001``
mimic     ``files/p10/p10000032/s50414267/<uuid>.jpg`` (MIMIC-CXR)   ``p10000032``
========  =========================================================  ===================

Other sources, named in the same :data:`RULE_LABELS`: ``regex`` (the user's
``--patient-regex`` on the file stem, which replaces the table), ``dicom`` (the PatientID
tag as a salted hash, :func:`dicom_patient_id`), ``csv`` (a CSV ``patient_id`` column, read
by the caller) and ``none`` (no rule fired: the image is its own patient, which
:func:`patient_grouping_warning` reports when it is the common case).

DICOM PatientIDs are personal data: only ``"pid-" + sha256(salt + id)[:16]`` leaves this
module, with a secret salt kept per machine (:func:`local_salt`), so hashes are stable on
one machine and recipients of a shared ``split.csv`` cannot test guessed IDs against them.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath

from filelock import FileLock, Timeout

from medtransfer.data.dicom import read_dicom_header
from medtransfer.errors import ConfigError, DataError
from medtransfer.safeio import atomic_path

__all__ = [
    "KERMANY_PATIENT_PATTERNS", "PATIENT_RULES", "RULE_LABELS", "SALT_FILE", "VIEW_CHOICES", "PatientRule",
    "check_views", "compile_patient_regex", "dicom_patient_id", "local_salt", "normalise_view",
    "patient_grouping_warning", "patient_id_from_path", "rules_summary", "salted_patient_id", "view_from_path",
]

KERMANY_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+_[A-Za-z]+)_\d+"),  # pneumonia: the patient is per infection type
    re.compile(r"^((?:NORMAL\d*-)?IM-\d+)(?:-\d+)+$"),
)
_NIH = re.compile(r"^(\d{8})_\d{3}$")
_CHEXPERT = re.compile(r"^patient\d+$")
_MIMIC_PATIENT, _MIMIC_GROUP, _MIMIC_STUDY = re.compile(r"^p\d{8}$"), re.compile(r"^p\d{2}$"), re.compile(r"^s\d+$")

SALT_FILE = "patient-salt"
_SALT_BYTES = 32


@dataclass(frozen=True)
class PatientRule:
    """A named naming rule: ``find`` maps a path (relative to the dataset root) to a patient or None."""

    name: str
    label: str  # human-readable, for the one summary line
    find: Callable[[PurePath], str | None]


def _kermany(path: PurePath) -> str | None:
    for regex in KERMANY_PATIENT_PATTERNS:
        if match := regex.match(path.stem):
            return match.group(1)
    return None


def _nih(path: PurePath) -> str | None:
    match = _NIH.match(path.stem)
    return match.group(1) if match else None


def _chexpert(path: PurePath) -> str | None:
    """The innermost folder named ``patient<digits>``."""
    return next((part for part in reversed(path.parts[:-1]) if _CHEXPERT.match(part)), None)


def _mimic(path: PurePath) -> str | None:
    """A ``p<8 digits>`` folder inside a ``p<2 digits>`` group folder or above an ``s<digits>`` study folder."""
    folders = path.parts[:-1]
    for i in reversed(range(len(folders))):
        if _MIMIC_PATIENT.match(folders[i]) and (
            (i > 0 and _MIMIC_GROUP.match(folders[i - 1]))
            or (i + 1 < len(folders) and _MIMIC_STUDY.match(folders[i + 1]))
        ):
            return folders[i]
    return None


PATIENT_RULES: tuple[PatientRule, ...] = (
    PatientRule("kermany", "Kermany file names", _kermany),
    PatientRule("nih", "NIH file names", _nih),
    PatientRule("chexpert", "CheXpert patient folders", _chexpert),
    PatientRule("mimic", "MIMIC-CXR patient folders", _mimic),
)

RULE_LABELS: dict[str, str] = {
    "csv": "CSV patient_id column",
    "regex": "--patient-regex",
    "dicom": "DICOM PatientID (salted hash)",
    **{rule.name: rule.label for rule in PATIENT_RULES},
    "none": "file name",
}


def compile_patient_regex(pattern: str | re.Pattern) -> re.Pattern:
    """``--patient-regex`` compiled; ConfigError naming the option and the value when invalid."""
    if isinstance(pattern, re.Pattern):
        return pattern
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(
            f"--patient-regex '{pattern}': not a valid regular expression ({exc}); "
            r"fix it, e.g. '^(patient\d+)_'"
        ) from None


def _relative(path: str | os.PathLike, root: str | os.PathLike | None) -> PurePath:
    """``path`` relative to ``root`` when it lies under it; otherwise as given."""
    path = Path(path)
    if root is None:
        return path
    root = Path(root)
    if path.is_absolute() and not root.is_absolute():
        root = Path(os.path.abspath(root))
    try:
        return path.relative_to(root)
    except ValueError:
        return path


def patient_id_from_path(
    path: str | os.PathLike, root: str | os.PathLike | None = None, pattern: str | re.Pattern | None = None
) -> tuple[str, str]:
    """``(patient_id, rule_name)`` of an image file.

    With ``pattern`` (``--patient-regex``), its first capture group (or whole match) searched
    in the file stem is the ID and the rule is ``regex``. Without it, the rules of
    :data:`PATIENT_RULES` are tried in order on the path relative to ``root`` (so that a data
    folder named ``patient5`` is not every image's patient); when none fires, the stem is the
    ID and the rule is ``none``.

    >>> patient_id_from_path("train/PNEUMONIA/person123_bacteria_456.jpeg")
    ('person123_bacteria', 'kermany')
    >>> patient_id_from_path("images/00000061_012.png")
    ('00000061', 'nih')
    >>> patient_id_from_path("/d/patient9/train/patient00001/study1/view1_frontal.jpg", root="/d/patient9")
    ('patient00001', 'chexpert')
    >>> patient_id_from_path("files/p10/p10000032/s50414267/02aa804e.jpg")
    ('p10000032', 'mimic')
    >>> patient_id_from_path("scans/img_001.png")
    ('img_001', 'none')
    >>> patient_id_from_path("scans/pat017_view2.png", pattern=r"^(pat\\d+)_")
    ('pat017', 'regex')

    Raises:
        ConfigError: ``pattern`` is not a valid regular expression.
        DataError: ``pattern`` does not match the file name, or captures an empty ID.
    """
    if pattern is not None:
        return _from_regex(Path(path), compile_patient_regex(pattern)), "regex"
    relative = _relative(path, root)
    for rule in PATIENT_RULES:
        if (patient := rule.find(relative)) is not None:
            return patient, rule.name
    return relative.stem, "none"


def _from_regex(path: Path, regex: re.Pattern) -> str:
    match = regex.search(path.stem)
    if match is None:
        raise DataError(
            f"--patient-regex '{regex.pattern}' does not match file name {path.name!r}; fix the regex or leave "
            "it out to use the built-in naming rules (Kermany, NIH, CheXpert, MIMIC-CXR)"
        )
    patient = match.group(1) if regex.groups else match.group(0)
    if not patient:
        raise DataError(
            f"--patient-regex '{regex.pattern}' captures an empty patient ID from file name {path.name!r}; "
            "make its first group match at least one character"
        )
    return patient


# -- DICOM PatientID, salted -------------------------------------------------------------------


def salted_patient_id(patient_id: str, salt: bytes) -> str:
    """``"pid-"`` + the first 16 hex digits of sha256(salt + UTF-8 ID): stable for one salt,
    not reversible without it.

    >>> salted_patient_id("12345", b"s" * 32)[:4], len(salted_patient_id("12345", b"s" * 32))
    ('pid-', 20)
    """
    if len(salt) < 16:
        raise ValueError(f"salt of {len(salt)} bytes: use local_salt(cache_dir) (32 random bytes)")
    return "pid-" + hashlib.sha256(salt + patient_id.encode("utf-8")).hexdigest()[:16]


def dicom_patient_id(path: str | os.PathLike, salt: bytes) -> str | None:
    """The DICOM file's PatientID as :func:`salted_patient_id`; None when the tag is absent or blank.

    The clear ID is neither returned nor logged (rule name: ``dicom``).

    Raises:
        DataError: the file's header cannot be read (the message names the file).
    """
    patient = read_dicom_header(path).patient_id
    return None if patient is None else salted_patient_id(patient, salt)


def local_salt(cache_dir: str | os.PathLike) -> bytes:
    """The machine's secret salt: 32 random bytes in ``cache_dir/patient-salt``, created once
    (atomically, owner-only permissions) and reused afterwards.

    Deleting the file changes every DICOM patient hash made from then on.

    Raises:
        DataError: the salt file exists but is unreadable or not 32 bytes, or cannot be created.
    """
    path = Path(cache_dir) / SALT_FILE
    if path.exists():
        return _read_salt(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=60):  # two first runs at once write one salt
            if path.exists():
                return _read_salt(path)
            with atomic_path(path) as temporary:
                handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(handle, secrets.token_bytes(_SALT_BYTES))
                finally:
                    os.close(handle)
    except (OSError, Timeout) as exc:
        raise DataError(
            f"patient salt {path}: cannot be created ({getattr(exc, 'strerror', None) or exc}); "
            "make the cache folder writable or choose another with --cache-dir"
        ) from None
    return _read_salt(path)


def _read_salt(path: Path) -> bytes:
    try:
        salt = path.read_bytes()
    except OSError as exc:
        raise DataError(f"patient salt {path}: cannot be read ({exc.strerror or exc}); check its permissions") from None
    if len(salt) != _SALT_BYTES:
        raise DataError(
            f"patient salt {path}: {len(salt)} bytes, expected {_SALT_BYTES}; delete it to create a new one "
            "(DICOM patient hashes will change)"
        )
    return salt


# -- views -------------------------------------------------------------------------------------

VIEW_CHOICES = ("frontal", "lateral")

# DICOM ViewPosition and dataset CSV values (MIMIC-CXR, CheXpert, NIH). Oblique projections
# (LAO, RAO, LPO, RPO) and the swimmer's view are neither frontal nor lateral: None.
_VIEWS = {
    **dict.fromkeys(("PA", "AP", "AP AXIAL", "PA AXIAL", "AP LLD", "AP RLD", "PA LLD", "PA RLD", "FRONTAL"), "frontal"),
    **dict.fromkeys(("LATERAL", "LL", "RL", "LAT", "XTABLE LATERAL"), "lateral"),
}
_CHEXPERT_VIEW = re.compile(r"^view\d+_(frontal|lateral)$", re.IGNORECASE)


def normalise_view(value: str | None) -> str | None:
    """``frontal`` / ``lateral`` from a dataset's view value; None when blank, unknown or oblique.

    >>> normalise_view("PA"), normalise_view("ap llD"), normalise_view("Lateral"), normalise_view("LL")
    ('frontal', 'frontal', 'lateral', 'lateral')
    >>> normalise_view("LAO"), normalise_view(""), normalise_view(None)
    (None, None, None)
    """
    if value is None:
        return None
    return _VIEWS.get(" ".join(str(value).replace("_", " ").split()).upper())


def view_from_path(path: str | os.PathLike) -> str | None:
    """The view a file name states (CheXpert ``view1_frontal.jpg``), else None.

    >>> view_from_path("patient00001/study1/view2_lateral.jpg")
    'lateral'
    """
    match = _CHEXPERT_VIEW.match(PurePath(path).stem)
    return match.group(1).lower() if match else None


def check_views(value: str | Iterable[str]) -> tuple[str, ...]:
    """``--views`` (``frontal`` or ``frontal,lateral``) -> the views, in the given order.

    >>> check_views("frontal"), check_views("Frontal, lateral")
    (('frontal',), ('frontal', 'lateral'))

    Raises:
        ConfigError: empty, or a view not in :data:`VIEW_CHOICES` (the message lists them).
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    views = tuple(dict.fromkeys(str(item).strip().lower() for item in items if str(item).strip()))
    shown = value if isinstance(value, str) else ",".join(map(str, items))
    unknown = [view for view in views if view not in VIEW_CHOICES]
    if not views or unknown:
        what = f"unknown view {', '.join(map(repr, unknown))}" if unknown else "no view given"
        raise ConfigError(
            f"--views '{shown}': {what}; choose from {', '.join(VIEW_CHOICES)}, comma-separated "
            "(e.g. --views frontal)"
        )
    return views


# -- what the user is told ---------------------------------------------------------------------


def rules_summary(rules_fired: Counter) -> str:
    """One line naming where the patient IDs came from, most images first.

    >>> rules_summary(Counter(nih=1000))
    'Patient IDs: NIH file names (1,000 images)'
    >>> rules_summary(Counter(chexpert=300, none=20))
    'Patient IDs: CheXpert patient folders (300), file name (20)'

    A rule name missing from :data:`RULE_LABELS` is shown as it is.
    """
    counts = [(name, count) for name, count in rules_fired.most_common() if count > 0]
    if not counts:
        return "Patient IDs: no images"
    if len(counts) == 1:
        name, count = counts[0]
        return f"Patient IDs: {RULE_LABELS.get(name, name)} ({count:,} image{'s' if count != 1 else ''})"
    return "Patient IDs: " + ", ".join(f"{RULE_LABELS.get(name, name)} ({count:,})" for name, count in counts)


def patient_grouping_warning(patient_ids: Iterable[str], rules_fired: Counter) -> str | None:
    """One warning line when the split will in effect be by image, else None.

    It fires when ``none`` is the rule that fired for most images (ties included) and more
    than half of the patients have a single image. ``patient_ids`` holds one ID per image.

    >>> patient_grouping_warning(["a", "b", "c"], Counter(none=3))[:49]
    'Patient IDs: no naming rule matched 3 of 3 images'
    >>> patient_grouping_warning(["a", "a", "b", "b"], Counter(nih=4)) is None
    True
    """
    images = sum(rules_fired.values())
    unmatched = rules_fired.get("none", 0)
    if not unmatched or unmatched < max(rules_fired.values()):
        return None
    per_patient = Counter(patient_ids)
    if not per_patient:
        return None
    single = sum(1 for count in per_patient.values() if count == 1) / len(per_patient)
    if single <= 0.5:
        return None
    return (
        f"Patient IDs: no naming rule matched {unmatched:,} of {images:,} images and "
        f"{math.floor(single * 100)}% of patients have a single image, so the split treats each image as its own "
        "patient; follow-ups of one person may land in train and test. Give a CSV patient_id column or "
        r"--patient-regex (e.g. '^(\d+)_')."
    )
