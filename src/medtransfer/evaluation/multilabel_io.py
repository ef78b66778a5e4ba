"""Reading what multi-label runs write, and matching finding names across data sets.

A multi-label predictions CSV (:func:`medtransfer.evaluation.multilabel.write_multilabel_predictions`)
has the columns ``path,label,prob_<finding>...,pred,pred_<finding>...,masked,patient_id``:
``label`` lists the findings present and ``masked`` the findings with an unknown label, both
``|``-joined. :func:`read_multilabel_predictions` turns it back into 1 / 0 / NaN targets and
the probabilities, in the file's finding order.

Finding names are matched without case, and with ``_``, ``-`` and runs of spaces read as one
space: NIH writes ``Pleural_Thickening``, CheXNet's table ``Pleural Thickening``.

    >>> normalise_finding("Pleural_Thickening") == normalise_finding("pleural thickening")
    True
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from medtransfer.errors import DataError
from medtransfer.privacy import folder_name
from medtransfer.rundir import RunDir
from medtransfer.task import split_findings

__all__ = [
    "MultiLabelPredictions", "is_multilabel_columns", "match_findings", "normalise_finding", "read_multilabel_predictions",
    "reference_predictions",
]


def normalise_finding(name: str) -> str:
    """Lower case, ``_``/``-`` as spaces, one space between words."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", str(name))).strip().lower()


def match_findings(wanted: Sequence[str], available: Sequence[str]) -> dict[str, str | None]:
    """Each name of ``wanted`` -> its name in ``available`` (the exact name first, else the one
    equal under :func:`normalise_finding`), or None when ``available`` has no such finding."""
    exact = set(available)
    by_key: dict[str, str] = {}
    for name in available:
        by_key.setdefault(normalise_finding(name), name)
    return {name: name if name in exact else by_key.get(normalise_finding(name)) for name in wanted}


def is_multilabel_columns(columns: Sequence[str]) -> bool:
    """A predictions CSV of a multi-label run: a ``masked`` column and ``pred_<finding>`` columns."""
    return "masked" in columns and any(c.startswith("pred_") for c in columns)


@dataclass(frozen=True)
class MultiLabelPredictions:
    """A multi-label predictions CSV: targets 1 / 0 / NaN and probabilities, ``(n, findings)``."""

    file: Path
    findings: tuple[str, ...]
    paths: list[str]
    targets: np.ndarray
    probabilities: np.ndarray
    patient_ids: list[str] | None

    def __len__(self) -> int:
        return len(self.paths)


def read_multilabel_predictions(path: str | Path) -> MultiLabelPredictions:
    """The CSV at ``path``, checked; DataError naming the file and line of any problem."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot be read as CSV ({exc})") from None
    missing = [c for c in ("path", "label", "masked") if c not in columns]
    findings = tuple(c[len("prob_"):] for c in columns if c.startswith("prob_"))
    if missing or not findings:
        what = ", ".join(missing + ([] if findings else ["prob_<finding>"]))
        raise DataError(f"{path}: not a multi-label predictions file: missing column(s) {what}; got {', '.join(columns)}")
    column = {f: k for k, f in enumerate(findings)}
    targets = np.zeros((len(rows), len(findings)))
    probs = np.empty((len(rows), len(findings)))
    seen: set[str] = set()
    for i, row in enumerate(rows):
        line = i + 2
        if row["path"] in seen:
            raise DataError(f"{path}, line {line}: image {row['path']} appears twice; each image must have one row")
        seen.add(row["path"])
        for f in split_findings(row["label"] or ""):
            if f not in column:
                raise DataError(f"{path}, line {line}: finding {f!r} in label has no prob_{f} column")
            targets[i, column[f]] = 1.0
        for f in split_findings(row["masked"] or ""):
            if f in column:
                targets[i, column[f]] = np.nan
        for f, k in column.items():
            try:
                value = float(row[f"prob_{f}"])
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value):
                raise DataError(f"{path}, line {line}: prob_{f} must be a number; got {row[f'prob_{f}']!r}")
            probs[i, k] = value
    patients = [row["patient_id"] for row in rows] if "patient_id" in columns else None
    return MultiLabelPredictions(path, findings, [row["path"] for row in rows], targets, probs, patients)


def reference_predictions(run: str | Path) -> tuple[str, MultiLabelPredictions] | None:
    """The run's own test predictions (else validation) as ``(description, predictions)``; None without either."""
    root = Path(run)
    if not (root / "metrics.json").is_file() and (root.parent / "metrics.json").is_file():
        root = root.parent  # --run named the model/ folder
    folder = RunDir(root)
    for name in ("test", "val"):
        found = folder.predictions(name)
        if found is not None and is_multilabel_columns(found.columns):
            return f"{name} split of {folder_name(root)}", read_multilabel_predictions(found.file)
    return None
