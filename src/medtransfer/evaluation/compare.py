"""`medtransfer compare`: runs side by side, and paired tests of their AUC difference.

Each input folder is a training run directory (``metrics.json`` + ``predictions_test.csv``)
or an evaluation directory written by ``medtransfer evaluate`` (``metrics.json`` +
``predictions.csv``). Nothing is recomputed for the side-by-side table: every cell is the
test block of that folder's ``metrics.json`` with its bootstrap interval, so the numbers
match each run's own report.

The paired tests need the prediction files. Two models can only be compared pairwise on
the same images with the same labels: rows are matched by ``path`` (order may differ),
and a different image set or a disagreeing label is a :class:`DataError`, never a silent
intersection. With two folders the pair is (first, second); with more, every folder is
tested against the first (the reference). Each pair gets

* a paired bootstrap of ``AUC_a - AUC_b`` that resamples *patients* (the
  ``patient_id`` column; images when the column is absent, and the output says so), see
  :func:`medtransfer.evaluation.resampling.paired_bootstrap_auc_test`;
* DeLong's test (image-level), :func:`medtransfer.evaluation.resampling.delong_test`.

Multi-label folders (metrics.json ``task: multi-label``) are compared per finding and by
macro AUC (:mod:`medtransfer.evaluation.multilabel_compare`): each pair's test is the macro AUC
difference (the keys above; no DeLong p), with the per-finding tests under ``findings``; the
table shows macro and micro AUC and each finding's AUC, sensitivity, specificity and threshold.

Example
-------
>>> from pathlib import Path
>>> result = compare_runs([Path("runs/resnet18"), Path("runs/effnet")], out=Path("runs/compare"))  # doctest: +SKIP
>>> print(result.markdown)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation import html as h
from medtransfer.evaluation import multilabel_compare as ml
from medtransfer.evaluation import resampling
from medtransfer.privacy import folder_name, relative_location
from medtransfer.rundir import Predictions, RunDir, RunMetrics, SplitMetrics, write_text_atomic
from medtransfer.task import MULTI_LABEL, SINGLE_LABEL

__all__ = ["ComparisonResult", "OUTPUT_FILES", "compare_runs"]


# What compare_runs writes into ``out``; nothing else there is touched.
OUTPUT_FILES = ("comparison.md", "comparison.html", "comparison.json")


@dataclass(frozen=True)
class _Folder:
    """One input folder, read."""

    path: Path
    name: str
    kind: str  # "run" or "evaluation"
    metrics: RunMetrics
    test: SplitMetrics
    predictions: Predictions  # of the test split; a run's predictions_test.csv or an evaluation's predictions.csv


@dataclass
class ComparisonResult:
    """The comparison, ready to print or save.

    Attributes:
        names: column name of each folder (folder name; ``parent/name`` for duplicates).
        paths: the folders, in input order (the first is the reference).
        positive_class: the class whose AUC is compared (None for multi-label runs).
        rows: ``(label, [cell per folder])`` for the side-by-side table.
        tests: one dict per pair: ``a, b, n_images, n_patients, bootstrap_unit, auc_a,
            auc_b, auc_diff (a - b), ci, confidence, p_bootstrap, p_delong, delong_z,
            n_resamples, n_valid, seed``.
        task: ``single-label`` or ``multi-label`` (then ``findings`` lists them, and each test
            is the macro AUC one with the per-finding tests under ``findings``).
        markdown: the table and the "Paired tests" table as Markdown.
        html: a self-contained HTML page (inline CSS, no scripts, no network references).
        files: what was written to ``out`` (empty without ``out``).
    """

    names: list[str]
    paths: list[Path]
    positive_class: str | None
    rows: list[tuple[str, list[str]]]
    tests: list[dict[str, Any]]
    task: str = SINGLE_LABEL
    findings: list[str] = field(default_factory=list)
    markdown: str = ""
    html: str = ""
    files: list[Path] = field(default_factory=list)
    out: Path | None = None  # where the files were written (paths in comparison.json are relative to it)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what ``comparison.json`` holds."""
        return {
            "positive_class": self.positive_class,
            **({"task": self.task, "findings": self.findings} if self.task == MULTI_LABEL else {}),
            "runs": [{"name": n, "path": self._location(p)} for n, p in zip(self.names, self.paths)],
            "table": {"columns": list(self.names), "rows": [{"metric": label, "values": cells} for label, cells in self.rows]},
            "tests": [{k: self._location(v) if k in ("path_a", "path_b") else v for k, v in t.items()} for t in self.tests],
        }

    def _location(self, folder: str | Path) -> str:
        """Shareable: a folder relative to the comparison's folder (or by its name), never absolute."""
        return relative_location(folder, self.out) if self.out is not None else folder_name(folder)


def compare_runs(
    paths: Sequence[Path], *, out: Path | None = None, n_resamples: int = 2000, seed: int = 0
) -> ComparisonResult:
    """Compare the test results of two or more run or evaluation folders.

    Args:
        paths: run directories or evaluation directories; the first is the reference.
        out: when given, write ``comparison.md``, ``comparison.html`` and
            ``comparison.json`` there (the folder is created; only these files are
            overwritten).
        n_resamples: bootstrap resamples of the paired AUC test.
        seed: seed of the paired bootstrap.

    Raises:
        ConfigError: fewer than two folders, a bad ``n_resamples``, or ``out`` is a file.
        DataError: a folder without ``metrics.json``, a test block or a prediction file;
            positive classes that differ; folders evaluated on different test images.
    """
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise ConfigError(f"compare needs at least 2 run or evaluation folders; got {len(paths)}: {[str(p) for p in paths]}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ConfigError(f"--n-resamples must be a positive integer; got {n_resamples!r}")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; choose a folder for the comparison files")

    names = _column_names(paths)
    folders = [_read_folder(p, n) for p, n in zip(paths, names)]
    pairs = [(0, 1)] if len(folders) == 2 else [(0, j) for j in range(1, len(folders))]
    multilabel = [ml.is_multilabel_folder(f.metrics, f.predictions) for f in folders]
    if any(multilabel):
        if not all(multilabel):
            kinds = ", ".join(f"{f.path}: {'multi-label' if m else 'single-label'}" for f, m in zip(folders, multilabel))
            raise DataError(f"cannot compare multi-label with single-label folders ({kinds}); compare runs of one task")
        tests, findings = ml.compare_multilabel(folders, pairs, n_resamples=n_resamples, seed=seed)
        result = ComparisonResult(names=names, paths=paths, positive_class=None, rows=_table_rows(folders, findings),
                                  tests=tests, task=MULTI_LABEL, findings=findings)
    else:
        positive = _positive_class(folders)
        for folder in folders:
            _check_predictions(folder, positive)
        for i, j in pairs:  # check every pair before spending time on any bootstrap
            _check_same_images(folders[i], folders[j])
        tests = [_paired_test(folders[i], folders[j], positive, n_resamples=n_resamples, seed=seed) for i, j in pairs]
        result = ComparisonResult(names=names, paths=paths, positive_class=positive, rows=_table_rows(folders), tests=tests)
    result.markdown = _markdown(result)
    result.html = _html(result)
    if out is not None:
        result.out = Path(out)
        result.files = _write(result, Path(out))
    return result


# ----------------------------------------------------------------------- reading


def _column_names(paths: list[Path]) -> list[str]:
    """Folder names; ``parent/name`` where names repeat; `` (2)``... if still ambiguous."""
    base = [p.resolve().name or str(p) for p in paths]
    names = [f"{p.resolve().parent.name}/{b}" if base.count(b) > 1 else b for p, b in zip(paths, base)]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return unique


def _read_folder(path: Path, name: str) -> _Folder:
    folder = RunDir(path)
    data = folder.metrics()
    if data.test is None:
        raise DataError(f"{path / 'metrics.json'}: no \"test\" block (the run had no test split); nothing to compare")
    predictions = folder.predictions("test")
    if predictions is None:
        raise DataError(f"{path}: no predictions_test.csv or predictions.csv; the paired tests need the per-image test predictions")
    kind = "run" if predictions.file.name == "predictions_test.csv" else "evaluation"
    return _Folder(path, name, kind, data, data.test, predictions)


def _positive_class(folders: list[_Folder]) -> str:
    found = {}
    for f in folders:
        if not f.metrics.positive_class:
            raise DataError(f"{f.path / 'metrics.json'}: no \"positive_class\"; cannot tell which AUC to compare")
        found[f.path] = f.metrics.positive_class
    if len(set(found.values())) > 1:
        listed = ", ".join(f"{p} uses {v}" for p, v in found.items())
        raise DataError(f"the folders disagree on the positive class ({listed}); only runs of the same task can be compared")
    return next(iter(found.values()))


def _check_predictions(folder: _Folder, positive: str) -> None:
    folder.predictions.probability(positive)  # DataError naming the file when the column is missing
    if not len(folder.predictions):
        raise DataError(f"{folder.predictions.file}: no predictions (header only)")


# ------------------------------------------------------------------- paired tests


def _check_same_images(fa: _Folder, fb: _Folder) -> None:
    labels_a = dict(zip(fa.predictions.paths, fa.predictions.labels))
    labels_b = dict(zip(fb.predictions.paths, fb.predictions.labels))
    only_a = labels_a.keys() - labels_b.keys()
    only_b = labels_b.keys() - labels_a.keys()
    if only_a or only_b:
        example = sorted(only_a or only_b)[0]
        raise DataError(
            f"{fa.path} and {fb.path} were evaluated on different test images "
            f"({len(only_a)} only in {fa.path}, {len(only_b)} only in {fb.path}; e.g. {example}); "
            "a paired comparison needs the same test set"
        )
    differ = sorted(p for p in labels_a if labels_a[p] != labels_b[p])
    if differ:
        example = differ[0]
        raise DataError(
            f"{fa.path} and {fb.path} give different labels to {len(differ)} of {len(labels_a)} test images "
            f"(e.g. {example}: {labels_a[example]} vs {labels_b[example]}); "
            "a paired comparison needs the same test set with the same labels"
        )


def _paired_test(fa: _Folder, fb: _Folder, positive: str, *, n_resamples: int, seed: int) -> dict[str, Any]:
    pa, pb = fa.predictions, fb.predictions
    row_b = {path: i for i, path in enumerate(pb.paths)}
    order = np.fromiter((row_b[p] for p in pa.paths), dtype=np.int64, count=len(pa))  # pb's rows in pa's order
    y = np.asarray([label == positive for label in pa.labels], dtype=np.int64)
    prob_a = pa.probability(positive)
    prob_b = pb.probability(positive)[order]
    groups: list[str] | None
    if pa.patient_ids is not None:
        groups = pa.patient_ids
    else:
        groups = None if pb.patient_ids is None else [pb.patient_ids[i] for i in order]
    try:
        boot = resampling.paired_bootstrap_auc_test(y, prob_a, prob_b, groups=groups, n_resamples=n_resamples, seed=seed)
        delong = resampling.delong_test(y, prob_a, prob_b)
    except DataError as exc:
        raise DataError(f"comparing {fa.path} with {fb.path}: {exc}") from None
    return {
        "a": fa.name,
        "b": fb.name,
        "path_a": str(fa.path),
        "path_b": str(fb.path),
        "n_images": len(pa),
        "n_positive": int(y.sum()),
        "n_patients": len(set(groups)) if groups is not None else len(pa),
        "bootstrap_unit": "patient" if groups is not None else "image",
        "auc_a": boot["auc_a"],
        "auc_b": boot["auc_b"],
        "auc_diff": boot["auc_diff"],
        "ci": boot["ci"],
        "confidence": 0.95,
        "p_bootstrap": boot["p_value"],
        "p_delong": delong["p_value"],
        "delong_z": delong["z"],
        "n_resamples": boot["n_resamples"],
        "n_valid": boot["n_valid"],
        "seed": seed,
    }


# ------------------------------------------------------------------------- table


def _source(f: _Folder) -> str:
    if f.kind == "run":
        return "run (test split)"
    return f"evaluation on {f.metrics.data} ({f.metrics.split})" if f.metrics.data else "evaluation"


def _table_rows(folders: list[_Folder], findings: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """The side-by-side rows; with `findings` (multi-label) macro figures and one block per finding."""
    if findings is not None:
        rows = ml.table_rows(folders, findings)
    else:
        rows = [(label, [h.split_value(f.test, key) for f in folders]) for key, label in h.METRIC_ROWS]
        threshold = [f.test.threshold if f.test.threshold is not None else f.metrics.threshold for f in folders]
        rows.append(("Threshold", [h.format_number(t) for t in threshold]))
    rows.append(("Images (n)", [h.format_number(f.test.n) for f in folders]))
    optional: list[tuple[str, list[Any]]] = [
        ("Patients", [f.test.patients for f in folders]),
        ("Positives", [f.test.n_positive for f in folders]),
        ("ECE after calibration", [(f.test.calibration or {}).get("ece_after") for f in folders]),
        ("Backbone", [f.metrics.backbone for f in folders]),
        ("Strategy", [f.metrics.strategy for f in folders]),
        ("Trainable params", [(f.metrics.params or {}).get("trainable") for f in folders]),
    ]
    for label, values in optional:
        if any(v is not None for v in values):
            rows.append((label, [h.format_number(v) for v in values]))
    rows.append(("Source", [_source(f) for f in folders]))
    return rows


def _p(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _test_row(t: dict[str, Any]) -> list[str]:
    return [
        t["a"],
        t["b"],
        h.format_number(t["auc_a"]),
        h.format_number(t["auc_b"]),
        h.format_with_ci(t["auc_diff"], t["ci"], confidence=t["confidence"], signed=True),
        _p(t["p_bootstrap"]),
        _p(t["p_delong"]),
        f"{t['n_images']:,} / {t['n_patients']:,}",
    ]


_TEST_HEADER = ["A", "B", "AUC A", "AUC B", "AUC A \u2212 B (95% CI)", "p (paired bootstrap)", "p (DeLong)", "Images / patients"]


def _intro(result: ComparisonResult) -> str:
    if result.task == MULTI_LABEL:
        return (
            f"Test metrics as stored in each folder's metrics.json: multi-label, {len(result.findings)} findings, "
            "macro AUC (the mean of the findings' AUCs) first, with the bootstrap confidence interval where the run computed one."
        )
    return (
        f"Test metrics as stored in each folder's metrics.json (positive class {result.positive_class}), "
        "with the bootstrap confidence interval where the run computed one."
    )


def _tests_note(result: ComparisonResult) -> str:
    if result.task == MULTI_LABEL:
        return ml.tests_note(result.tests)
    if not result.tests:
        return ""
    t = result.tests[0]
    reference = " Each folder is tested against the first." if len(result.tests) > 1 else ""
    unit = "patients" if t["bootstrap_unit"] == "patient" else "images (no patient_id column)"
    return (
        f"Same test images, matched by path. Paired bootstrap: {t['n_resamples']:,} resamples of {unit}, "
        f"seed {t['seed']}; two-sided p inverts the percentile interval. DeLong's test is image-level.{reference}"
    )


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(c) for c in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _test_table(result: ComparisonResult) -> tuple[list[str], list[list[str]]]:
    if result.task == MULTI_LABEL:
        return ml.TEST_HEADER, [row for t in result.tests for row in ml.test_rows(t)]
    return _TEST_HEADER, [_test_row(t) for t in result.tests]


def _markdown(result: ComparisonResult) -> str:
    parts = [
        "# Run comparison",
        "",
        _intro(result),
        "",
        _md_table(["Metric", *result.names], [[label, *cells] for label, cells in result.rows]),
        "",
        "## Paired tests",
        "",
        _tests_note(result),
        "",
        _md_table(*_test_table(result)),
        "",
        "Folders: " + "; ".join(f"{n}: {p}" for n, p in zip(result.names, result.paths)),
        "",
    ]
    return "\n".join(parts)


def _html(result: ComparisonResult) -> str:
    sources = "".join(f"<li><strong>{h.escape(n)}</strong>: {h.escape(p)}</li>" for n, p in zip(result.names, result.paths))
    body = "\n".join(
        [
            h.table(["Metric", *result.names], [[label, *cells] for label, cells in result.rows], css="metrics"),
            "<h2>Paired tests</h2>",
            h.note(_tests_note(result)),
            h.table(*_test_table(result), css="tests"),
            "<h2>Folders</h2>",
            f"<ul>{sources}</ul>",
        ]
    )
    return h.page("Run comparison", body, subtitle=_intro(result))


# ------------------------------------------------------------------------ output


def _write(result: ComparisonResult, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    contents = {
        "comparison.md": result.markdown,
        "comparison.html": result.html,
        "comparison.json": json.dumps(result.to_dict(), indent=2) + "\n",
    }
    return [write_text_atomic(out / filename, contents[filename]) for filename in OUTPUT_FILES]
