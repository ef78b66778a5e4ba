"""Multi-label CSV manifests, as the chest X-ray datasets ship them.

Two layouts (column names are matched without case and surrounding spaces):

- a ``labels`` column of ``|``-separated findings, NIH ChestX-ray14's ``Finding Labels``
  convention (``Effusion|Mass``; ``No Finding`` means none of them); ``--labels-column``
  names another column;
- one column per finding holding ``1`` (present), ``0`` (absent), ``-1`` (uncertain) or blank
  (not mentioned), as CheXpert and MIMIC-CXR ship them. ``--findings A,B,C`` chooses and
  orders them; without it every column whose values are all 1 / 0 / -1 / blank is a finding
  (CheXpert's ``No Finding`` column aside: it means none of them).

Uncertain labels follow ``--uncertain`` (CheXpert's U-Ones, U-Zeros, U-Ignore); ignored and
blank labels are unknown: masked out of the loss and the metrics (:mod:`medtransfer.task`).

The image column is ``path`` (or ``Path``, ``Image Index``, ``image``, ``filename``); a
relative path is looked up beside the CSV, then beside its folder (CheXpert's paths start with
the dataset folder's own name), then, for a bare file name, anywhere under the CSV's folder
(NIH spreads its images over ``images_001/images``, ...).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from medtransfer.data.patients import normalise_view, view_from_path
from medtransfer.errors import ConfigError, DataError
from medtransfer.task import NO_FINDING, UNCERTAIN_POLICIES, join_findings, split_findings

PATH_COLUMNS = ("path", "image index", "image", "filename", "file")
PATIENT_COLUMNS = ("patient_id", "patient id", "patientid", "subject_id")
VIEW_COLUMNS = ("view", "view position", "viewposition", "frontal/lateral")
LABELS_COLUMNS = ("labels", "finding labels")
SPLIT_COLUMN = "split"
_CODES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": None}
_LINE = "\0line"  # read_rows: the row's line in the file (blank lines are skipped, so not its index + 2)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff")


def _normalised(name: str) -> str:
    return name.strip().lower()


def read_rows(manifest: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header as written and every row keyed by the normalised header names (blank rows
    left out; each row's line in the file, for messages, under a private key)."""
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            keys = [_normalised(h) for h in header]
            rows, start = [], reader.line_num + 1
            for row in reader:
                if any(v.strip() for v in row):
                    rows.append({**dict(zip(keys, (value.strip() for value in row))), _LINE: str(start)})
                start = reader.line_num + 1
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"--data {manifest}: cannot read the CSV manifest ({exc}); save it as UTF-8 CSV") from None
    return header, rows


def _first(columns: Sequence[str], choices: Sequence[str]) -> str | None:
    return next((c for c in choices if c in columns), None)


def finding_columns(header: Sequence[str], rows: list[dict[str, str]]) -> list[str]:
    """Columns (as written) whose every value is 1, 0, -1 or blank, metadata columns left out.

    CheXpert's ``No Finding`` column is left out too: a label of ``No Finding`` means none of
    the findings (:func:`medtransfer.task.split_findings`), so it cannot be an output of its own.
    """
    metadata = {*PATH_COLUMNS, *PATIENT_COLUMNS, *VIEW_COLUMNS, SPLIT_COLUMN, "label", *LABELS_COLUMNS, _normalised(NO_FINDING)}
    found = []
    for name in header:
        key = _normalised(name)
        if key in metadata or not key:
            continue
        values = [row.get(key, "") for row in rows]
        if values and all(v in _CODES for v in values) and any(v not in ("",) for v in values):
            found.append(name.strip())
    return found


def is_multilabel(manifest: Path, *, labels_column: str | None, findings: Sequence[str] | None) -> bool:
    """Multi-label when asked for (--labels-column, --findings), or, without a `label` column,
    when the manifest has a labels column or finding columns."""
    if labels_column or findings:
        return True
    header, rows = read_rows(manifest)
    columns = [_normalised(h) for h in header]
    if "label" in columns:
        return False
    return _first(columns, LABELS_COLUMNS) is not None or bool(finding_columns(header, rows))


def _parse_findings(findings: Sequence[str] | None) -> list[str] | None:
    if findings is None:
        return None
    names = [f.strip() for f in findings if f.strip()]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"--findings: got {', '.join(findings)!r}; list distinct finding names, e.g. Effusion,Mass")
    return names


def discover_multilabel_csv(
    manifest: Path,
    *,
    labels_column: str | None = None,
    findings: Sequence[str] | None = None,
    uncertain: str = "ignore",
) -> tuple[list[tuple[Path, str, str | None, tuple[str, ...], str | None, str | None]], list[str]]:
    """Rows (path, findings present '|'-joined, patient ID from a column or None, masked findings,
    split, view) and the findings in output order."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ConfigError(f"--uncertain: got {uncertain!r}; choose one of {', '.join(UNCERTAIN_POLICIES)}")
    chosen = _parse_findings(findings)
    header, rows = read_rows(manifest)
    columns = [_normalised(h) for h in header]
    path_column = _first(columns, PATH_COLUMNS)
    if path_column is None:
        raise DataError(
            f"--data {manifest}: CSV manifest lacks an image column; found {', '.join(h.strip() for h in header) or 'no header'}. "
            "Name it path (or Path, Image Index, filename)"
        )
    if not rows:
        raise DataError(f"--data {manifest}: the CSV manifest lists no images")
    if labels_column is not None and _normalised(labels_column) not in columns:
        raise ConfigError(
            f"--labels-column {labels_column!r}: no such column in {manifest}; columns: {', '.join(h.strip() for h in header)}"
        )
    label_key = _normalised(labels_column) if labels_column else _first(columns, LABELS_COLUMNS)
    if label_key is not None:
        parsed, order = _from_labels_column(manifest, rows, label_key, chosen)
    else:
        parsed, order = _from_finding_columns(manifest, header, rows, chosen, uncertain)
    patient_key, view_key = _first(columns, PATIENT_COLUMNS), _first(columns, VIEW_COLUMNS)
    resolve = _PathResolver(manifest)
    out = []
    seen: dict[Path, str] = {}  # image -> its first line
    for row, (present, masked) in zip(rows, parsed):
        line = row[_LINE]
        raw = row.get(path_column, "")
        if not raw:
            raise DataError(f"--data {manifest}, line {line}: empty {path_column!r}; fill it in")
        path = resolve(raw)
        if path in seen:
            raise DataError(f"--data {manifest}, line {line}: {raw} is listed again (first on line {seen[path]}); keep one row per image")
        seen[path] = line
        split = row.get(SPLIT_COLUMN, "").lower() or None
        if split is not None and split not in ("train", "val", "test"):
            raise DataError(f"--data {manifest}, line {line}: split {split!r} is not one of train, val, test")
        patient = row.get(patient_key, "") if patient_key else ""
        view = normalise_view(row.get(view_key, "")) if view_key else None
        out.append((path, join_findings(present), patient or None, tuple(masked), split, view or view_from_path(path)))
    return out, order


def _from_labels_column(
    manifest: Path, rows: list[dict[str, str]], key: str, chosen: list[str] | None
) -> tuple[list[tuple[list[str], list[str]]], list[str]]:
    per_row = [split_findings(row.get(key, "")) for row in rows]
    seen = sorted({f for found in per_row for f in found})
    order = chosen or seen
    missing = [f for f in order if f not in seen]
    if missing:
        raise ConfigError(
            f"--findings: {', '.join(missing)} never appear(s) in column {key!r} of {manifest}; "
            f"findings found: {', '.join(seen) or 'none'}"
        )
    wanted = set(order)
    return [([f for f in order if f in found and f in wanted], []) for found in per_row], order


def _from_finding_columns(
    manifest: Path, header: Sequence[str], rows: list[dict[str, str]], chosen: list[str] | None, uncertain: str
) -> tuple[list[tuple[list[str], list[str]]], list[str]]:
    available = finding_columns(header, rows)
    by_key = {_normalised(h): h.strip() for h in header}
    if chosen is None:
        order = available
        if not order:
            raise DataError(
                f"--data {manifest}: no labels found: add a 'label' column (one class per image), a 'labels' column "
                "of |-separated findings, or one column per finding holding 1 / 0 / -1 / blank"
            )
    else:
        if any(_normalised(f) == _normalised(NO_FINDING) for f in chosen):
            raise ConfigError(
                f"--findings: {NO_FINDING!r} means none of the findings and cannot be trained as one; leave it out "
                f"(finding columns: {', '.join(available) or 'none'})"
            )
        absent = [f for f in chosen if _normalised(f) not in by_key]
        if absent:
            raise ConfigError(
                f"--findings: no column {', '.join(map(repr, absent))} in {manifest}; finding columns: {', '.join(available) or 'none'}"
            )
        order = [by_key[_normalised(f)] for f in chosen]
    parsed = []
    for row in rows:
        line = row[_LINE]
        present, masked = [], []
        for finding in order:
            raw = row.get(_normalised(finding), "")
            if raw not in _CODES:
                raise DataError(
                    f"--data {manifest}, line {line}: column {finding!r} holds {raw[:40]!r}; expected 1, 0, -1 (uncertain) or blank"
                )
            code = _CODES[raw]
            if code == -1.0:
                code = {"ones": 1.0, "zeros": 0.0, "ignore": None}[uncertain]
            if code is None:
                masked.append(finding)
            elif code == 1.0:
                present.append(finding)
        parsed.append((present, masked))
    return parsed, list(order)


class _PathResolver:
    """A manifest path -> the image file (see the module docstring for the places looked in)."""

    def __init__(self, manifest: Path):
        self.folder = manifest.parent
        self._by_name: dict[str, Path] | None = None

    def __call__(self, raw: str) -> Path:
        path = Path(raw)
        if path.is_absolute():
            return path
        candidate = self.folder / path
        if candidate.exists():
            return candidate
        if path.parts and path.parts[0] == self.folder.name and (self.folder.parent / path).exists():
            return self.folder.parent / path
        if len(path.parts) == 1:
            found = self._index().get(path.name)
            if found is not None:
                return found
        return candidate  # missing: the cache build names it with the other unreadable files

    def _index(self) -> dict[str, Path]:
        if self._by_name is None:
            self._by_name = {}
            for found in sorted(self.folder.rglob("*")):
                if found.suffix.lower() in _IMAGE_SUFFIXES:
                    self._by_name.setdefault(found.name, found)
        return self._by_name


__all__ = ["NO_FINDING", "discover_multilabel_csv", "finding_columns", "is_multilabel", "read_rows"]
