"""The run-folder contract: typed reading of a run or evaluation directory, and atomic writes.

``medtransfer train --out RUN`` and ``medtransfer evaluate --out DIR`` write one layout
(DESIGN.md, "The run directory"); :class:`RunDir` reads each document of it:
``config.yaml`` (:meth:`~RunDir.config`), ``split.csv`` (:meth:`~RunDir.split`),
``history.csv`` (:meth:`~RunDir.history`), ``metrics.json`` (:meth:`~RunDir.metrics`, a
:class:`RunMetrics`; its one writer is :func:`write_metrics`), ``predictions_<split>.csv``
or an evaluation's ``predictions.csv`` (:meth:`~RunDir.predictions`), ``model/model.json``,
``gallery.json`` and ``plots/``. A missing required document or a malformed one is a
DataError naming the file. ``metrics.json`` keys may be added, never renamed: older
documents read (absent keys are None), unknown keys are kept in ``extra`` and written back.

Writes are atomic (:mod:`medtransfer.safeio`, re-exported here): a killed process leaves
each document old or whole. Imports nothing from medtransfer but ``errors`` and ``safeio``,
so every layer may use it.

>>> RunDir("runs/resnet18").metrics().test.interval("auc")  # doctest: +SKIP
(0.948, 0.975)
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from medtransfer.errors import DataError
from medtransfer.safeio import FolderLock, atomic_path, write_csv_atomic, write_text_atomic, write_yaml_atomic

__all__ = [
    "CONFIG_FILE", "FolderLock", "HISTORY_FILE", "METRICS_FILE", "METRIC_KEYS", "Predictions", "REPORT_FILE", "RunDir",
    "RunMetrics", "SplitMetrics", "SplitRow", "atomic_path", "write_csv_atomic", "write_metrics", "write_text_atomic",
    "write_yaml_atomic",
]

CONFIG_FILE = "config.yaml"
SPLIT_FILE = "split.csv"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
MODEL_JSON = Path("model") / "model.json"
GALLERY_FILE = "gallery.json"
REPORT_FILE = "report.html"  # written last by `train`: its presence marks a finished run
SPLIT_COLUMNS = ("path", "label", "patient_id", "split")

# Threshold metrics of a split block, each with an optional "<key>_ci" interval.
METRIC_KEYS = ("auc", "average_precision", "accuracy", "sensitivity", "specificity", "precision", "npv", "f1")

_WHAT_IS_A_RUN = "pass a run directory (from `medtransfer train`) or an evaluation directory (from `medtransfer evaluate`)"


# ------------------------------------------------------------------------ writing


def write_metrics(run_dir: Path, metrics: RunMetrics | Mapping[str, Any]) -> Path:
    """Write ``run_dir/metrics.json`` atomically; the one writer of that file.

    A mapping is checked as a file is read (DataError: e.g. ``test.auc`` not a number), so
    nothing is written that would not read back. Keys in DESIGN.md's order, then added ones."""
    if not isinstance(metrics, RunMetrics):
        metrics = RunMetrics.from_dict(metrics, source=f"metrics for {Path(run_dir) / METRICS_FILE}")
    return write_text_atomic(Path(run_dir) / METRICS_FILE, json.dumps(metrics.to_dict(), indent=2) + "\n")


# ------------------------------------------------------------- metrics.json, typed


def _check(value: Any, kind: str, where: str) -> Any:
    """``value`` when it is of ``kind`` (None passes); else a DataError naming ``where``."""
    if value is None:
        return None
    if kind == "split":
        return SplitMetrics.from_dict(value, where=where)
    if kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind == "count":  # a whole number; 7.0 from an older writer reads as 7
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())
        value = int(value) if ok else value
    elif kind == "matrix":  # rows of counts, e.g. [[tn, fp], [fn, tp]]
        ok = isinstance(value, list) and all(isinstance(row, list) and all(_check(v, "count", where) is not None for v in row) for row in value)
    else:
        ok = isinstance(value, {"str": str, "bool": bool, "dict": dict, "list": list}[kind])
    if not ok:
        wanted = {"count": "a whole number", "matrix": "rows of counts", "dict": "an object"}.get(kind, f"a {kind}")
        raise DataError(f"{where} must be {wanted}; got {value!r}")
    return value


def _spec(kind: str, key: str | None = None) -> Any:
    """A dataclass field read from the JSON key ``key`` (default: its name) and checked as ``kind``."""
    return field(default=None, metadata={"kind": kind, "key": key})


def _read_fields(cls: type, data: Any, where: str, join: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(field values, unknown keys) of a JSON object, each known value type-checked.

    ``where`` names the object in errors, ``join`` glues a key to it (``f"{where}{join}{key}"``)."""
    if not isinstance(data, Mapping):
        raise DataError(f"{where} must be a JSON object; got {type(data).__name__}")
    known = {f.metadata.get("key") or f.name: f for f in fields(cls) if "kind" in f.metadata}
    values, extra = {}, {}
    for key, value in data.items():
        if key in known:
            values[known[key].name] = _check(value, known[key].metadata["kind"], f"{where}{join}{key}")
        else:
            extra[key] = value
    return values, extra


def _write_fields(obj: Any, *, nulls: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of ``obj`` that are set (or named in ``nulls``), under their JSON keys, in field order."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name == "intervals":
            out.update({f"{metric}_ci": list(ci) for metric, ci in value.items()})
        elif "kind" in f.metadata and (value is not None or f.name in nulls):
            out[f.metadata.get("key") or f.name] = value.to_dict() if isinstance(value, SplitMetrics) else value
    return out


@dataclass(frozen=True)
class SplitMetrics:
    """One split's block of ``metrics.json`` (``val``, ``test``, or the block ``at_0.5``).

    Field order is the order of the JSON keys the evaluation writes. ``intervals`` holds
    the ``"<metric>_ci"`` keys as ``{metric: (lo, hi)}``; ``extra`` every unknown key.
    """

    n: int | None = _spec("count")
    n_positive: int | None = _spec("count")
    auc: float | None = _spec("number")
    average_precision: float | None = _spec("number")
    accuracy: float | None = _spec("number")
    sensitivity: float | None = _spec("number")
    specificity: float | None = _spec("number")
    precision: float | None = _spec("number")
    npv: float | None = _spec("number")
    f1: float | None = _spec("number")
    threshold: float | None = _spec("number")
    confusion_matrix: list[list[int]] | None = _spec("matrix")  # [[tn, fp], [fn, tp]]
    at_half: SplitMetrics | None = _spec("split", "at_0.5")  # the same metrics at threshold 0.5
    multiclass: dict[str, Any] | None = _spec("dict")
    calibration: dict[str, float] | None = _spec("dict")
    patients: int | None = _spec("count")
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    n_resamples: int | None = _spec("count")
    n_valid: dict[str, int] | None = _spec("dict")
    confidence: float | None = _spec("number")
    n_groups: int | None = _spec("count")
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "split") -> SplitMetrics:
        """Read and type-check one block; ``where`` names it in errors (``runs/x/metrics.json: test``)."""
        values, rest = _read_fields(cls, data, where, ".")
        intervals, extra = {}, {}
        for key, value in rest.items():
            metric = key[: -len("_ci")] if key.endswith("_ci") else None
            if metric not in METRIC_KEYS:
                extra[key] = value
            elif isinstance(value, (list, tuple)) and len(value) == 2:
                intervals[metric] = tuple(_check(v, "number", f"{where}.{key}") for v in value)
            else:
                raise DataError(f"{where}.{key} must be [lo, hi]; got {value!r}")
        return cls(**values, intervals=intervals, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        return {**_write_fields(self), **self.extra}

    def value(self, key: str) -> float | None:
        """One of :data:`METRIC_KEYS` (``None`` when the document lacks it)."""
        if key not in METRIC_KEYS:
            raise KeyError(f"{key!r} is not a split metric; choose one of {', '.join(METRIC_KEYS)}")
        return getattr(self, key)

    def interval(self, key: str) -> tuple[float, float] | None:
        """``(lo, hi)`` of ``key``'s bootstrap interval, or ``None`` when there is none."""
        ci = self.intervals.get(key)
        return ci if ci is not None and all(math.isfinite(v) for v in ci) else None

    def cell(self, row: int, column: int) -> int | None:
        """``confusion_matrix[row][column]`` (0: negative, 1: positive; row = truth), or None."""
        if self.confusion_matrix is None:
            return None
        try:
            return self.confusion_matrix[row][column]
        except (TypeError, IndexError):
            return None


_SPLITS = ("val", "test")


@dataclass(frozen=True)
class RunMetrics:
    """``metrics.json``: the typed document. Field order is the key order of the file.

    A training run sets the first block (DESIGN.md's example) and the data facts; an
    evaluation directory sets ``run``, ``data`` and ``split`` (what was evaluated) and only
    ``test``. Every field may be ``None`` in a document written by an older version.
    """

    backbone: str | None = _spec("str")
    strategy: str | None = _spec("str")
    weights: str | None = _spec("str")
    params: dict[str, int] | None = _spec("dict")  # {"total": ..., "trainable": ...}
    epochs_run: int | None = _spec("count")
    best_epoch: int | None = _spec("count")
    stopped_early: bool | None = _spec("bool")
    train_seconds: float | None = _spec("number")
    positive_class: str | None = _spec("str")
    threshold: float | None = _spec("number")
    val: SplitMetrics | None = _spec("split")
    test: SplitMetrics | None = _spec("split")
    classes: list[str] | None = _spec("list")
    threshold_policy: str | None = _spec("str")
    total_seconds: float | None = _spec("number")
    precision: str | None = _spec("str")  # numeric precision of training, e.g. "bf16-mixed"
    leakage: dict[str, Any] | None = _spec("dict")
    data_summary: dict[str, Any] | None = _spec("dict")
    run: str | None = _spec("str")
    data: str | None = _spec("str")
    split: str | None = _spec("str")
    border_evidence: dict[str, Any] | None = _spec("dict")  # explain/border.py: heatmap mass in the image border
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = METRICS_FILE) -> RunMetrics:
        """Read and type-check a document; ``source`` (the file) starts every error message."""
        values, extra = _read_fields(cls, data, source, ": ")
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        # A run without a test split says so: its file has always held "test": null.
        nulls = ("test",) if self.val is not None else ()
        return {**_write_fields(self, nulls=nulls), **self.extra}

    @property
    def splits(self) -> dict[str, SplitMetrics]:
        """The split blocks present, val first."""
        return {name: getattr(self, name) for name in _SPLITS if getattr(self, name) is not None}

    @property
    def headline(self) -> tuple[str, SplitMetrics] | None:
        """The split a reader looks at first: test, else val."""
        for name in reversed(_SPLITS):
            if getattr(self, name) is not None:
                return name, getattr(self, name)
        return None


# ------------------------------------------------------------------ other documents


@dataclass(frozen=True)
class SplitRow:
    """One line of ``split.csv``; ``split`` is None where the file leaves it empty."""

    path: str
    label: str  # multi-label: the findings present, '|'-joined
    patient_id: str
    split: str | None
    masked: tuple[str, ...] = ()  # multi-label: findings with an unknown label


@dataclass(frozen=True)
class Predictions:
    """A predictions CSV (``path,label,prob_<class>...,pred[,patient_id]``), checked.

    ``probabilities`` is ``(n, len(classes))`` in the order of ``classes`` (the
    ``prob_<class>`` columns); ``patient_ids`` and ``predicted`` are None when the file
    has no such column.
    """

    file: Path
    columns: tuple[str, ...]
    classes: tuple[str, ...]
    paths: list[str]
    labels: list[str]
    probabilities: np.ndarray
    predicted: list[str] | None
    patient_ids: list[str] | None

    def __len__(self) -> int:
        return len(self.paths)

    def probability(self, cls: str) -> np.ndarray:
        """The ``prob_<cls>`` column; DataError naming the file when it has none."""
        if cls not in self.classes:
            raise DataError(f"{self.file}: missing column(s) prob_{cls}; got {', '.join(self.columns)}")
        return self.probabilities[:, self.classes.index(cls)]


class RunDir:
    """A run directory or an evaluation directory; each method reads one document.

    Required documents (``metrics.json``) raise DataError when absent; optional ones return
    None (or an empty list). Nothing is cached: read once and keep the result.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def has_metrics(self) -> bool:
        return (self.root / METRICS_FILE).is_file()

    def finished(self) -> bool:
        """Whether `train` wrote everything: the report comes last, after metrics.json."""
        return self.has_metrics() and (self.root / REPORT_FILE).is_file()

    def metrics(self) -> RunMetrics:
        """``metrics.json``, typed. DataError: the folder or the file is missing or malformed."""
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder; {_WHAT_IS_A_RUN}")
        path = self.root / METRICS_FILE
        if not path.is_file():
            raise DataError(f"{self.root}: no {METRICS_FILE}; {_WHAT_IS_A_RUN}")
        return RunMetrics.from_dict(_read_json(path, what="run metrics"), source=str(path))

    def config(self) -> dict[str, Any] | None:
        """``config.yaml`` as a mapping of setting -> value (None when absent)."""
        path = self.root / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(config, dict):
            raise DataError(f"{path}: must hold a mapping of setting: value; got {type(config).__name__}")
        return config

    def split(self) -> list[SplitRow] | None:
        """``split.csv`` rows (None when absent)."""
        path = self.root / SPLIT_FILE
        if not path.is_file():
            return None
        _, rows = _read_csv(path, required=SPLIT_COLUMNS)
        return [
            SplitRow(r["path"], r["label"], r["patient_id"], r["split"] or None,
                     tuple(f for f in (r.get("masked") or "").split("|") if f))
            for _, r in rows
        ]

    def history(self) -> list[dict[str, float | None]]:
        """``history.csv`` rows, every cell a number (None where empty); [] when absent."""
        path = self.root / HISTORY_FILE
        if not path.is_file():
            return []
        columns, rows = _read_csv(path, required=("epoch",))
        return [{c: _csv_number(row[c], path, line, c, allow_empty=True) for c in columns} for line, row in rows]

    def predictions(self, split: str = "test") -> Predictions | None:
        """``predictions_<split>.csv`` (a run), else ``predictions.csv`` (an evaluation: test only),
        checked; None when the folder has neither."""
        names = [f"predictions_{split}.csv"] + (["predictions.csv"] if split == "test" else [])
        path = next((self.root / name for name in names if (self.root / name).is_file()), None)
        return None if path is None else _read_predictions(path)

    def model_json(self) -> dict[str, Any] | None:
        """``model/model.json`` as written (None when absent). To load the model use ``artifacts``."""
        return _read_json(self.root / MODEL_JSON, what="model description", optional=True)

    def gallery(self) -> dict[str, Any] | None:
        """``gallery.json`` (the CAM gallery) as written, None when absent."""
        return _read_json(self.root / GALLERY_FILE, what="CAM gallery", optional=True)

    def plot(self, name: str) -> Path | None:
        """``plots/<name>`` when it exists."""
        path = self.root / "plots" / name
        return path if path.is_file() else None

    def plots(self) -> list[Path]:
        """Every ``plots/*.png``, sorted by name."""
        folder = self.root / "plots"
        return sorted(p for p in folder.glob("*.png") if p.is_file()) if folder.is_dir() else []


def _read_json(path: Path, *, what: str, optional: bool = False) -> Any:
    if optional and not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: {what} is not valid JSON ({exc})") from None


def _read_csv(path: Path, *, required: tuple[str, ...]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(header, [(line number, row)]) of a CSV whose header holds ``required``."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            missing = [c for c in required if c not in columns]
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {', '.join(missing)}; got {', '.join(columns) or 'no header'}"
                )
            return columns, [(line, row) for line, row in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot be read as CSV ({exc})") from None


def _csv_number(text: str | None, path: Path, line: int, column: str, *, allow_empty: bool = False) -> float | None:
    if allow_empty and (text is None or text == ""):
        return None
    try:
        value = float("" if text is None else text)  # None (a short row) fails as "" does
    except (TypeError, ValueError):
        raise DataError(f"{path}, line {line}: {column} must be a number; got {text!r}") from None
    if not allow_empty and not math.isfinite(value):
        raise DataError(f"{path}, line {line}: {column} must be finite; got {text!r}")
    return value


def _read_predictions(path: Path) -> Predictions:
    columns, rows = _read_csv(path, required=("path", "label"))
    classes = tuple(c[len("prob_") :] for c in columns if c.startswith("prob_"))
    if not classes:
        raise DataError(f"{path}: no prob_<class> column; got {', '.join(columns)}")
    seen: set[str] = set()
    probabilities = np.empty((len(rows), len(classes)), dtype=np.float64)
    for i, (line, row) in enumerate(rows):
        if row["path"] in seen:
            raise DataError(f"{path}, line {line}: image {row['path']} appears twice; each image must have one row")
        seen.add(row["path"])
        probabilities[i] = [_csv_number(row[f"prob_{c}"], path, line, f"prob_{c}") for c in classes]

    def required(name: str) -> list[str]:  # a column _read_csv checked
        return [row[name] for _, row in rows]

    def column(name: str) -> list[str] | None:
        return required(name) if name in columns else None

    return Predictions(
        path, tuple(columns), classes, required("path"), required("label"), probabilities, column("pred"), column("patient_id")
    )
