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

Example
-------
>>> from pathlib import Path
>>> result = compare_runs([Path("runs/resnet18"), Path("runs/effnet")], out=Path("runs/compare"))  # doctest: +SKIP
>>> print(result.markdown)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation import resampling
from medtransfer.evaluation.report import METRIC_ROWS  # the same metrics, labels and order as the report

__all__ = ["ComparisonResult", "METRIC_ROWS", "OUTPUT_FILES", "compare_runs"]


# What compare_runs writes into ``out``; nothing else there is touched.
OUTPUT_FILES = ("comparison.md", "comparison.html", "comparison.json")

# Prediction files, in the order they are looked for.
_PREDICTION_FILES = (("predictions_test.csv", "run"), ("predictions.csv", "evaluation"))
_DASH = "\u2013"


@dataclass(frozen=True)
class _Folder:
    """One input folder, read."""

    path: Path
    name: str
    kind: str  # "run" or "evaluation"
    metrics: dict[str, Any]
    test: dict[str, Any]
    predictions: Path


@dataclass(frozen=True)
class _Predictions:
    """A prediction CSV reduced to what the paired tests need, keyed by image path."""

    labels: dict[str, str]
    prob_pos: dict[str, float]
    patient_ids: dict[str, str] | None  # None when the CSV has no patient_id column


@dataclass
class ComparisonResult:
    """The comparison, ready to print or save.

    Attributes:
        names: column name of each folder (folder name; ``parent/name`` for duplicates).
        paths: the folders, in input order (the first is the reference).
        positive_class: the class whose AUC is compared.
        rows: ``(label, [cell per folder])`` for the side-by-side table.
        tests: one dict per pair: ``a, b, n_images, n_patients, bootstrap_unit, auc_a,
            auc_b, auc_diff (a - b), ci, confidence, p_bootstrap, p_delong, delong_z,
            n_resamples, n_valid, seed``.
        markdown: the table and the "Paired tests" table as Markdown.
        html: a self-contained HTML page (inline CSS, no scripts, no network references).
        files: what was written to ``out`` (empty without ``out``).
    """

    names: list[str]
    paths: list[Path]
    positive_class: str
    rows: list[tuple[str, list[str]]]
    tests: list[dict[str, Any]]
    markdown: str = ""
    html: str = ""
    files: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what ``comparison.json`` holds."""
        return {
            "positive_class": self.positive_class,
            "runs": [{"name": n, "path": str(p)} for n, p in zip(self.names, self.paths)],
            "table": {"columns": list(self.names), "rows": [{"metric": label, "values": cells} for label, cells in self.rows]},
            "tests": self.tests,
        }


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
    positive = _positive_class(folders)
    predictions = [_read_predictions(f, positive) for f in folders]

    pairs = [(0, 1)] if len(folders) == 2 else [(0, j) for j in range(1, len(folders))]
    for i, j in pairs:  # check every pair before spending time on any bootstrap
        _check_same_images(folders[i], predictions[i], folders[j], predictions[j])
    tests = [_paired_test(folders[i], predictions[i], folders[j], predictions[j], n_resamples=n_resamples, seed=seed) for i, j in pairs]

    result = ComparisonResult(names=names, paths=paths, positive_class=positive, rows=_table_rows(folders), tests=tests)
    result.markdown = _markdown(result, folders)
    result.html = _html(result, folders)
    if out is not None:
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
    if not path.is_dir():
        raise DataError(f"{path}: not a folder; pass a run directory or an evaluation directory")
    metrics_path = path / "metrics.json"
    if not metrics_path.is_file():
        raise DataError(
            f"{path}: no metrics.json; pass a run directory (from `medtransfer train`) "
            "or an evaluation directory (from `medtransfer evaluate`)"
        )
    try:
        data = json.loads(metrics_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{metrics_path}: cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{metrics_path}: expected a JSON object; got {type(data).__name__}")
    test = data.get("test")
    if not isinstance(test, dict):
        raise DataError(f"{metrics_path}: no \"test\" block (the run had no test split); nothing to compare")
    for filename, kind in _PREDICTION_FILES:
        if (path / filename).is_file():
            return _Folder(path, name, kind, data, test, path / filename)
    wanted = " or ".join(f for f, _ in _PREDICTION_FILES)
    raise DataError(f"{path}: no {wanted}; the paired tests need the per-image test predictions")


def _positive_class(folders: list[_Folder]) -> str:
    found = {}
    for f in folders:
        value = f.metrics.get("positive_class")
        if not isinstance(value, str) or not value:
            raise DataError(f"{f.path / 'metrics.json'}: no \"positive_class\"; cannot tell which AUC to compare")
        found[f.path] = value
    if len(set(found.values())) > 1:
        listed = ", ".join(f"{p} uses {v}" for p, v in found.items())
        raise DataError(f"the folders disagree on the positive class ({listed}); only runs of the same task can be compared")
    return next(iter(found.values()))


def _read_predictions(folder: _Folder, positive: str) -> _Predictions:
    source = folder.predictions
    column = f"prob_{positive}"
    with source.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in ("path", "label", column) if c not in header]
        if missing:
            raise DataError(f"{source}: missing column(s) {', '.join(missing)}; got {', '.join(header) or 'no header'}")
        has_patients = "patient_id" in header
        labels: dict[str, str] = {}
        probs: dict[str, float] = {}
        patients: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            image = row["path"]
            if image in labels:
                raise DataError(f"{source}, line {line}: image {image} appears twice; each test image must have one row")
            try:
                prob = float(row[column])
            except (TypeError, ValueError):
                raise DataError(f"{source}, line {line}: {column} must be a number; got {row[column]!r}") from None
            if not math.isfinite(prob):
                raise DataError(f"{source}, line {line}: {column} must be finite; got {row[column]!r}")
            labels[image] = row["label"]
            probs[image] = prob
            if has_patients:
                patients[image] = row["patient_id"]
    if not labels:
        raise DataError(f"{source}: no predictions (header only)")
    return _Predictions(labels, probs, patients if has_patients else None)


# ------------------------------------------------------------------- paired tests


def _check_same_images(fa: _Folder, pa: _Predictions, fb: _Folder, pb: _Predictions) -> None:
    only_a = pa.labels.keys() - pb.labels.keys()
    only_b = pb.labels.keys() - pa.labels.keys()
    if only_a or only_b:
        example = sorted(only_a or only_b)[0]
        raise DataError(
            f"{fa.path} and {fb.path} were evaluated on different test images "
            f"({len(only_a)} only in {fa.path}, {len(only_b)} only in {fb.path}; e.g. {example}); "
            "a paired comparison needs the same test set"
        )
    differ = sorted(p for p in pa.labels if pa.labels[p] != pb.labels[p])
    if differ:
        example = differ[0]
        raise DataError(
            f"{fa.path} and {fb.path} give different labels to {len(differ)} of {len(pa.labels)} test images "
            f"(e.g. {example}: {pa.labels[example]} vs {pb.labels[example]}); "
            "a paired comparison needs the same test set with the same labels"
        )


def _paired_test(
    fa: _Folder, pa: _Predictions, fb: _Folder, pb: _Predictions, *, n_resamples: int, seed: int
) -> dict[str, Any]:
    order = list(pa.labels)  # reference order; pb is matched by path
    positive = fa.metrics["positive_class"]
    y = np.fromiter((pa.labels[p] == positive for p in order), dtype=np.int64, count=len(order))
    prob_a = np.fromiter((pa.prob_pos[p] for p in order), dtype=np.float64, count=len(order))
    prob_b = np.fromiter((pb.prob_pos[p] for p in order), dtype=np.float64, count=len(order))
    patient_source = pa.patient_ids if pa.patient_ids is not None else pb.patient_ids
    groups = None if patient_source is None else [patient_source[p] for p in order]
    context = f"comparing {fa.path} with {fb.path}"
    try:
        boot = resampling.paired_bootstrap_auc_test(y, prob_a, prob_b, groups=groups, n_resamples=n_resamples, seed=seed)
        delong = resampling.delong_test(y, prob_a, prob_b)
    except DataError as exc:
        raise DataError(f"{context}: {exc}") from None
    return {
        "a": fa.name,
        "b": fb.name,
        "path_a": str(fa.path),
        "path_b": str(fb.path),
        "n_images": len(order),
        "n_positive": int(y.sum()),
        "n_patients": len(set(groups)) if groups is not None else len(order),
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any, digits: int = 3) -> str:
    if not _is_number(value):
        return _DASH if value is None or isinstance(value, (int, float)) else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _with_ci(block: dict[str, Any], key: str) -> str:
    """'0.962 [0.948, 0.975]', or the value alone when there is no interval."""
    text = _fmt(block.get(key))
    ci = block.get(f"{key}_ci")
    if _is_number(block.get(key)) and isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_number(v) for v in ci):
        text += f" [{_fmt(float(ci[0]))}, {_fmt(float(ci[1]))}]"
    return text


def _trainable(m: dict[str, Any]) -> Any:
    params = m.get("params")
    return params.get("trainable") if isinstance(params, dict) else None


def _ece_after(test: dict[str, Any]) -> Any:
    calibration = test.get("calibration")
    return calibration.get("ece_after") if isinstance(calibration, dict) else None


def _source(f: _Folder) -> str:
    if f.kind == "run":
        return "run (test split)"
    data, split = f.metrics.get("data"), f.metrics.get("split")
    return f"evaluation on {data} ({split})" if data else "evaluation"


def _table_rows(folders: list[_Folder]) -> list[tuple[str, list[str]]]:
    rows: list[tuple[str, list[str]]] = [(label, [_with_ci(f.test, key) for f in folders]) for key, label in METRIC_ROWS]
    threshold = [f.test.get("threshold", f.metrics.get("threshold")) for f in folders]
    rows.append(("Threshold", [_fmt(t) for t in threshold]))
    rows.append(("Images (n)", [_fmt(f.test.get("n")) for f in folders]))
    optional = [
        ("Patients", [f.test.get("patients") for f in folders]),
        ("Positives", [f.test.get("n_positive") for f in folders]),
        ("ECE after calibration", [_ece_after(f.test) for f in folders]),
        ("Backbone", [f.metrics.get("backbone") for f in folders]),
        ("Strategy", [f.metrics.get("strategy") for f in folders]),
        ("Trainable params", [_trainable(f.metrics) for f in folders]),
    ]
    for label, values in optional:
        if any(v is not None for v in values):
            rows.append((label, [_fmt(v) for v in values]))
    rows.append(("Source", [_source(f) for f in folders]))
    return rows


def _p(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _test_row(t: dict[str, Any]) -> list[str]:
    lo, hi = t["ci"]
    return [
        t["a"],
        t["b"],
        _fmt(t["auc_a"]),
        _fmt(t["auc_b"]),
        f"{t['auc_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]",
        _p(t["p_bootstrap"]),
        _p(t["p_delong"]),
        f"{t['n_images']:,} / {t['n_patients']:,}",
    ]


_TEST_HEADER = [
    "A",
    "B",
    "AUC A",
    "AUC B",
    "AUC A \u2212 B [95% CI]",
    "p (paired bootstrap)",
    "p (DeLong)",
    "Images / patients",
]


def _intro(result: ComparisonResult, folders: list[_Folder]) -> str:
    confidence = folders[0].test.get("confidence", 0.95)
    percent = f"{confidence * 100:g}%" if _is_number(confidence) else "95%"
    return (
        f"Test metrics as stored in each folder's metrics.json (positive class {result.positive_class}); "
        f"value [{percent} bootstrap CI] where the run computed one."
    )


def _tests_note(result: ComparisonResult) -> str:
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
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _markdown(result: ComparisonResult, folders: list[_Folder]) -> str:
    parts = [
        "# Run comparison",
        "",
        _intro(result, folders),
        "",
        _md_table(["Metric", *result.names], [[label, *cells] for label, cells in result.rows]),
        "",
        "## Paired tests",
        "",
        _tests_note(result),
        "",
        _md_table(_TEST_HEADER, [_test_row(t) for t in result.tests]),
        "",
        "Folders: " + "; ".join(f"{n}: {p}" for n, p in zip(result.names, result.paths)),
        "",
    ]
    return "\n".join(parts)


# -------------------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _html_table(header: list[str], rows: list[list[str]], *, css: str) -> str:
    parts = [f'<table class="{css}"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for first, *rest in rows:
        parts.append(f'<tr><th scope="row">{_e(first)}</th>' + "".join(f"<td>{_e(c)}</td>" for c in rest) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def _html(result: ComparisonResult, folders: list[_Folder]) -> str:
    metrics_table = _html_table(["Metric", *result.names], [[label, *cells] for label, cells in result.rows], css="metrics")
    tests_table = _html_table(_TEST_HEADER, [_test_row(t) for t in result.tests], css="tests")
    sources = "".join(f"<li><strong>{_e(n)}</strong>: {_e(p)}</li>" for n, p in zip(result.names, result.paths))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>Run comparison</title>
<style>{_CSS}</style>
</head>
<body>
<h1>Run comparison</h1>
<p class="note">{_e(_intro(result, folders))}</p>
{metrics_table}
<h2>Paired tests</h2>
<p class="note">{_e(_tests_note(result))}</p>
{tests_table}
<h2>Folders</h2>
<ul>{sources}</ul>
</body>
</html>
"""


_CSS = """
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1100px; padding: 1.5rem;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; color: #1d2330; background: #fff; }
h1 { font-size: 1.6rem; margin: 0 0 .5rem; }
h2 { font-size: 1.25rem; margin: 2rem 0 .75rem; padding-bottom: .25rem; border-bottom: 2px solid #dde3ec; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #dde3ec; padding: .3rem .6rem; text-align: left; vertical-align: top; }
thead th { background: #f2f5f9; }
tbody th { font-weight: 600; background: #fafbfd; }
table.metrics td, table.tests td { white-space: nowrap; }
.note { color: #5a6474; font-size: .9rem; }
li { word-break: break-all; }
@media print { body { max-width: none; padding: 0; font-size: 11pt; } table { break-inside: avoid; } }
"""


# ------------------------------------------------------------------------ output


def _write(result: ComparisonResult, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    contents = {
        "comparison.md": result.markdown,
        "comparison.html": result.html,
        "comparison.json": json.dumps(result.to_dict(), indent=2) + "\n",
    }
    written = []
    for filename in OUTPUT_FILES:
        target = out / filename
        target.write_text(contents[filename], encoding="utf-8")
        written.append(target)
    return written
