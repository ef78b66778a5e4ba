"""One self-contained ``report.html`` per run directory (or evaluation directory).

The report reads only what the run directory holds (see DESIGN.md, "The run directory"):
``metrics.json`` (required), and when present ``config.yaml``, ``history.csv``,
``plots/*.png``, ``model/model.json`` and ``gallery.json`` (CAM galleries). Absent
pieces are stated in the report, never guessed.

The page is a single file that opens offline and prints cleanly: every image is a
base64 ``data:`` URI, the CSS is inline, there is no JavaScript and no reference to
any network resource (no fonts, no CDNs, no links). Every piece of text that comes from
the data (class names, paths, settings) is HTML-escaped.

Example
-------
>>> from pathlib import Path
>>> write_report(Path("runs/resnet18"))  # doctest: +SKIP
PosixPath('runs/resnet18/report.html')
"""

from __future__ import annotations

import base64
import csv
import json
import math
from html import escape
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from medtransfer import __version__
from medtransfer.errors import DataError

__all__ = ["PUBLISHED_RESULTS", "SECTION_IDS", "write_report"]

SECTION_IDS = (
    "summary",
    "configuration",
    "data",
    "training",
    "metrics",
    "curves",
    "calibration",
    "explanations",
    "published",
)

# (source, model, accuracy, sensitivity, specificity, AUC); None = not reported.
PUBLISHED_RESULTS: tuple[tuple[str, str, float | None, float | None, float | None, float | None], ...] = (
    ("Original transfer-learning script", "ResNet-18, fine-tune", 0.813, None, 0.50, None),
    ("Same script, frozen stem", "ResNet-18, first 4 children frozen", 0.838, None, None, None),
    ("Kermany et al. 2018 (Cell)", "InceptionV3", 0.928, 0.932, 0.901, 0.968),
    ("MedMNIST v2, PneumoniaMNIST", "ResNet-18, 224 px", 0.864, None, None, 0.956),
    ("Google AutoML Vision", "AutoML", 0.946, None, None, 0.991),
)
PUBLISHED_CLASSES = ("NORMAL", "PNEUMONIA")
OFFICIAL_TEST_IMAGES = 624

# Metrics reported per split, in table order: (key, label). All have optional "<key>_ci".
METRIC_ROWS = (
    ("auc", "ROC AUC"),
    ("average_precision", "Average precision"),
    ("accuracy", "Accuracy"),
    ("sensitivity", "Sensitivity (recall)"),
    ("specificity", "Specificity"),
    ("precision", "Precision (PPV)"),
    ("npv", "NPV"),
    ("f1", "F1"),
)

_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}
_DASH = "\u2013"  # en dash: missing values and CI ranges


def write_report(run_dir: Path, *, console: Any = None, title: str | None = None) -> Path:
    """Write ``run_dir/report.html`` from the run directory's files and return its path.

    Args:
        run_dir: a training run or evaluation directory holding ``metrics.json``.
        console: optional ``rich.console.Console``; prints ``Report: <path>``.
        title: page title; defaults to ``medtransfer report: <folder name>``.

    Raises:
        DataError: ``metrics.json`` (or ``config.yaml``/``gallery.json`` when present)
            is missing or unreadable.
    """
    run_dir = Path(run_dir)
    run = _Run.load(run_dir)
    page_title = title or f"medtransfer report: {run_dir.resolve().name}"
    sections = [
        _summary(run),
        _configuration(run),
        _data(run),
        _training(run),
        _metrics(run),
        _curves(run),
        _calibration(run),
        _explanations(run),
        _published(run),
    ]
    body = "\n".join(s for s in sections if s)
    html = _page(page_title, run, body)
    path = run_dir / "report.html"
    path.write_text(html, encoding="utf-8")
    if console is not None:
        console.print(f"Report: {path}", markup=False, highlight=False)
    return path


# ------------------------------------------------------------------ reading the run


class _Run:
    """What the run directory holds, read once."""

    def __init__(self, root: Path, metrics: dict, config: dict | None, config_source: str, history: list[dict]):
        self.root = root
        self.metrics = metrics
        self.config = config
        self.config_source = config_source
        self.history = history
        self.classes = _classes(root, metrics)
        self.splits = _splits(metrics)
        self._used_plots: set[str] = set()

    @classmethod
    def load(cls, root: Path) -> "_Run":
        if not root.is_dir():
            raise DataError(f"report: {root} is not a folder; pass a run directory (the --out of medtransfer train)")
        metrics = _read_json(root / "metrics.json", what="metrics")
        if metrics is None:
            raise DataError(f"report: no metrics.json in {root}; run medtransfer train or evaluate into it first")
        if not isinstance(metrics, dict):
            raise DataError(f"report: {root / 'metrics.json'} must hold a JSON object; got {type(metrics).__name__}")
        config, source = None, ""
        config_file = root / "config.yaml"
        if config_file.is_file():
            try:
                config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as exc:
                raise DataError(f"report: {config_file} is not valid YAML ({str(exc).splitlines()[0]})") from None
            source = "config.yaml"
        else:
            model = _read_json(root / "model" / "model.json", what="model description")
            if isinstance(model, dict) and isinstance(model.get("training_config"), dict):
                config, source = model["training_config"], "model/model.json (training_config)"
        if config is not None and not isinstance(config, dict):
            raise DataError(f"report: {config_file} must hold a mapping of setting: value; got {type(config).__name__}")
        return cls(root, metrics, config, source, _read_history(root / "history.csv"))

    @property
    def headline_split(self) -> str | None:
        for name in ("test", "val"):
            if name in self.splits:
                return name
        return next(iter(self.splits), None)

    @property
    def threshold(self) -> Any:
        value = self.metrics.get("threshold")
        if value is None and self.headline_split:
            value = self.splits[self.headline_split].get("threshold")
        return value

    def plot(self, name: str) -> Path | None:
        """plots/<name> if it exists; marks it as shown."""
        path = self.root / "plots" / name
        if path.is_file():
            self._used_plots.add(name)
            return path
        return None

    def unused_plots(self) -> list[Path]:
        folder = self.root / "plots"
        if not folder.is_dir():
            return []
        return [p for p in sorted(folder.glob("*.png")) if p.is_file() and p.name not in self._used_plots]


def _read_json(path: Path, *, what: str) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"report: {path} ({what}) is not valid JSON ({exc})") from None


def _read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return [dict(row) for row in csv.DictReader(handle)]


def _splits(metrics: dict) -> dict[str, dict]:
    """Split name -> split metrics, val and test first (a null split is absent)."""
    found = {k: v for k, v in metrics.items() if isinstance(v, dict) and "confusion_matrix" in v and "auc" in v}
    order = [k for k in ("val", "test") if k in found] + [k for k in found if k not in ("val", "test")]
    return {k: found[k] for k in order}


def _classes(root: Path, metrics: dict) -> list[str]:
    """Class names from metrics.json, model/model.json, multiclass metrics, the prob_<class>
    columns of predictions_*.csv, or else the data summary."""
    if isinstance(metrics.get("classes"), list):
        return [str(c) for c in metrics["classes"]]
    model = _read_json(root / "model" / "model.json", what="model description")
    if isinstance(model, dict) and isinstance(model.get("classes"), list):
        return [str(c) for c in model["classes"]]
    for split in _splits(metrics).values():
        per_class = (split.get("multiclass") or {}).get("per_class")
        if isinstance(per_class, dict):
            return [str(c) for c in per_class]
    for predictions in sorted(root.glob("predictions_*.csv")):
        with predictions.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
        from_header = [c[len("prob_") :] for c in header if c.startswith("prob_")]
        if from_header:
            return from_header
    names: set[str] = set()
    summary = metrics.get("data_summary")
    if isinstance(summary, dict):
        for per_class in summary.values():
            if isinstance(per_class, dict):
                names.update(str(c) for c in per_class)
    return sorted(names)


# ---------------------------------------------------------------------- formatting


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any, digits: int = 3) -> str:
    """Numbers for people: ints with thousands separators, floats to `digits` decimals."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return _DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci_label(split: dict) -> str:
    confidence = split.get("confidence", 0.95)
    percent = confidence * 100 if _is_number(confidence) else 95
    return f"{percent:g}% CI"


def _with_ci(split: dict, key: str) -> str:
    """'0.962 (95% CI 0.948–0.975)', or just the value when there is no interval."""
    text = _fmt(split.get(key))
    ci = split.get(f"{key}_ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_number(v) for v in ci):
        text += f" ({_ci_label(split)} {_fmt(float(ci[0]))}{_DASH}{_fmt(float(ci[1]))})"
    return text


def _percent(value: float | None) -> str:
    return _DASH if value is None else f"{value * 100:.1f}%"


def _duration(seconds: Any) -> str:
    if not _is_number(seconds):
        return _DASH
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _setting(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ", ".join(_setting(v) for v in value) or "[]"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


# ------------------------------------------------------------------- HTML pieces


def _section(section_id: str, heading: str, content: str) -> str:
    return f'<section id="{section_id}">\n<h2>{_e(heading)}</h2>\n{content}\n</section>'


def _table(header: Sequence[str] | None, rows: Iterable[Sequence[str]], *, css: str = "") -> str:
    """A table of plain-text cells (escaped here); the first cell of a row is its header."""
    cell = _e
    parts = [f'<table class="{css}">' if css else "<table>"]
    if header:
        parts.append("<thead><tr>" + "".join(f"<th>{cell(h)}</th>" for h in header) + "</tr></thead>")
    parts.append("<tbody>")
    for row in rows:
        first, *rest = row
        parts.append(f'<tr><th scope="row">{cell(first)}</th>' + "".join(f"<td>{cell(v)}</td>" for v in rest) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def _data_uri(path: Path) -> str | None:
    mime = _IMAGE_TYPES.get(path.suffix.lower())
    if mime is None:
        return None
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figure(path: Path, caption: str) -> str:
    uri = _data_uri(path)
    if uri is None:
        return f'<p class="note">Cannot embed {_e(path.name)}: not a PNG, JPEG, GIF or WebP image.</p>'
    return f'<figure><img src="{uri}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _figures(items: list[tuple[Path | None, str]]) -> str:
    shown = [_figure(p, c) for p, c in items if p is not None]
    return f'<div class="figures">{"".join(shown)}</div>' if shown else ""


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _split_label(name: str) -> str:
    return {"val": "Validation", "test": "Test", "train": "Train"}.get(name, name)


# ---------------------------------------------------------------------- sections


def _summary(run: _Run) -> str:
    m = run.metrics
    parts = []
    name = run.headline_split
    if name is None:
        parts.append(_note("metrics.json holds no split metrics."))
    else:
        split = run.splits[name]
        if name == "test":
            lead = "Test split"
        elif name == "val":
            lead = "Validation split (this run has no test split)"
        else:
            lead = f"{_split_label(name)} split"
        counts = f"{_fmt(split.get('n'))} images"
        if split.get("patients") is not None:
            counts += f", {_fmt(split.get('patients'))} patients"
        if split.get("n_positive") is not None:
            counts += f", {_fmt(split.get('n_positive'))} positive"
        parts.append(f"<p class=\"lead\">{_e(lead)}: {_e(counts)}, at the chosen threshold.</p>")
        parts.append(_table(None, [(label, _with_ci(split, key)) for key, label in METRIC_ROWS], css="headline"))
    rows: list[tuple[str, str]] = []
    policy = m.get("threshold_policy")
    threshold = run.threshold
    if threshold is not None or policy is not None:
        text = _fmt(threshold)
        if policy:
            text += f" (policy: {policy}, chosen on validation)"
        rows.append(("Decision threshold", text))
    if m.get("positive_class") is not None:
        rows.append(("Positive class", str(m["positive_class"])))
    if run.classes:
        rows.append(("Classes", ", ".join(run.classes)))
    if m.get("backbone") is not None:
        rows.append(("Backbone", str(m["backbone"])))
    if m.get("strategy") is not None:
        rows.append(("Strategy", str(m["strategy"])))
    if m.get("weights") is not None:
        rows.append(("Weights", str(m["weights"])))
    params = m.get("params")
    if isinstance(params, dict):
        rows.append(("Parameters", f"{_fmt(params.get('total'))} total, {_fmt(params.get('trainable'))} trainable"))
    if m.get("precision") is not None:
        rows.append(("Numeric precision", str(m["precision"])))
    if m.get("epochs_run") is not None:
        rows.append(("Epochs run", _fmt(m["epochs_run"])))
    if m.get("best_epoch") is not None:
        rows.append(("Best epoch (lowest val loss)", _fmt(m["best_epoch"])))
    if m.get("stopped_early") is not None:
        rows.append(("Stopped early", _fmt(bool(m["stopped_early"]))))
    if m.get("train_seconds") is not None:
        rows.append(("Training time", _duration(m["train_seconds"])))
    if rows:
        parts.append(_table(None, rows))
    return _section("summary", "Summary", "\n".join(parts))


def _configuration(run: _Run) -> str:
    if run.config is None:
        return _section("configuration", "Configuration", _note("No config.yaml in this directory (not a training run)."))
    rows = [(str(k), _setting(v)) for k, v in run.config.items()]
    content = _note(f"Every setting, as resolved for this run (from {run.config_source}).") + _table(
        ["Setting", "Value"], rows, css="config"
    )
    return _section("configuration", "Configuration", content)


def _data(run: _Run) -> str:
    m = run.metrics
    parts = []
    summary = m.get("data_summary")
    if isinstance(summary, dict) and summary:
        rows = []
        for split, per_class in summary.items():
            if not isinstance(per_class, dict):
                continue
            images = patients = 0
            for label, counts in per_class.items():
                counts = counts if isinstance(counts, dict) else {}
                rows.append((split, str(label), _fmt(counts.get("images")), _fmt(counts.get("patients"))))
                images += counts.get("images") or 0
                patients += counts.get("patients") or 0
            rows.append((split, "all", _fmt(images), _fmt(patients)))
        parts.append(_table(["Split", "Class", "Images", "Patients"], rows, css="data"))
        parts.append(_note("A patient's images all lie in one split (patient-level split); 'all' sums the classes."))
    else:
        rows = [(_split_label(n), _fmt(s.get("n")), _fmt(s.get("n_positive")), _fmt(s.get("patients"))) for n, s in run.splits.items()]
        if rows:
            parts.append(_table(["Split", "Images", "Positive", "Patients"], rows))
        else:
            parts.append(_note("No data summary in metrics.json."))
    leakage = m.get("leakage")
    if isinstance(leakage, dict):
        if leakage.get("clean"):
            parts.append('<p class="ok">Leakage check passed: no patient and no byte-identical image appears in two splits.</p>')
        else:
            text = (
                f"Leakage check failed: {_fmt(leakage.get('shared_patients'))} patient(s) in more than one split, "
                f"{_fmt(leakage.get('duplicate_images'))} byte-identical image(s) in more than one split."
            )
            examples = "".join(f"<li>{_e(x)}</li>" for x in leakage.get("examples") or [])
            parts.append(f'<p class="warn">{_e(text)}</p>' + (f"<ul>{examples}</ul>" if examples else ""))
    else:
        parts.append(_note("No leakage check recorded in metrics.json."))
    return _section("data", "Data", "\n".join(parts))


def _history_cell(column: str, value: str) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value or _DASH
    if not math.isfinite(number):
        return _DASH
    if column == "epoch":
        return str(int(number))
    if column == "lr":
        return f"{number:.2e}"
    if column == "seconds":
        return f"{number:.1f}"
    return f"{number:.4f}"


def _training(run: _Run) -> str:
    parts = []
    figure = _figures([(run.plot("history.png"), "Loss and accuracy per epoch (train and validation)")])
    if figure:
        parts.append(figure)
    if run.history:
        columns = list(run.history[0].keys())
        best = run.metrics.get("best_epoch")
        rows = []
        for row in run.history:
            cells = [_e(_history_cell(c, row.get(c, ""))) for c in columns]
            try:
                is_best = best is not None and int(float(row.get("epoch", ""))) == int(best)
            except ValueError:
                is_best = False
            rows.append((is_best, cells))
        head = "<thead><tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr></thead>"
        body = "".join(
            ('<tr class="best">' if is_best else "<tr>") + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
            for is_best, cells in rows
        )
        parts.append(f'<table class="history">{head}<tbody>{body}</tbody></table>')
        if best is not None:
            parts.append(_note(f"Highlighted: the best epoch ({best}), whose weights were kept."))
    if not parts:
        parts.append(_note("No training history in this directory (not a training run)."))
    return _section("training", "Training", "\n".join(parts))


def _metrics(run: _Run) -> str:
    if not run.splits:
        return _section("metrics", "Metrics", _note("metrics.json holds no split metrics."))
    header = ["Metric"]
    columns: list[tuple[dict, bool]] = []  # (metrics at that threshold, show CIs)
    for name, split in run.splits.items():
        header.append(f"{_split_label(name)} @ {_fmt(split.get('threshold', run.threshold))} (chosen)")
        columns.append((split, True))
        at_half = split.get("at_0.5")
        if isinstance(at_half, dict):
            header.append(f"{_split_label(name)} @ 0.5")
            columns.append((at_half, False))
    rows = []
    for key, label in METRIC_ROWS:
        rows.append([label] + [_with_ci(s, key) if ci else _fmt(s.get(key)) for s, ci in columns])
    for key, label in (("n", "Images"), ("n_positive", "Positive images")):
        rows.append([label] + [_fmt(s.get(key)) for s, _ in columns])
    for (i, j), label in (((0, 0), "TN"), ((0, 1), "FP"), ((1, 0), "FN"), ((1, 1), "TP")):
        rows.append([label] + [_fmt(_cm_cell(s, i, j)) for s, _ in columns])
    parts = [_table(header, rows, css="metrics")]
    notes = []
    for name, split in run.splits.items():
        if split.get("n_resamples"):
            groups = f" over {_fmt(split.get('n_groups'))} patients" if split.get("n_groups") else ""
            notes.append(f"{_split_label(name)}: {_ci_label(split)} from {_fmt(split['n_resamples'])} bootstrap resamples{groups}.")
    notes.append("The threshold was chosen on validation; the test split never influenced it. AUC and average precision do not depend on the threshold.")
    parts.append("".join(_note(n) for n in notes))
    for name, split in run.splits.items():
        multi = split.get("multiclass")
        if isinstance(multi, dict):
            parts.append(_multiclass(name, multi))
    return _section("metrics", "Metrics", "\n".join(parts))


def _cm_cell(split: dict, i: int, j: int) -> Any:
    cm = split.get("confusion_matrix")
    try:
        return cm[i][j]
    except (TypeError, IndexError, KeyError):
        return None


def _multiclass(name: str, multi: dict) -> str:
    summary = (
        f"{_split_label(name)}, all classes (argmax): accuracy {_fmt(multi.get('accuracy'))}, "
        f"macro AUC {_fmt(multi.get('macro_auc'))}, macro F1 {_fmt(multi.get('macro_f1'))}"
    )
    per_class = multi.get("per_class") or {}
    rows = [
        (str(c), _fmt(v.get("support")), _fmt(v.get("auc")), _fmt(v.get("sensitivity")), _fmt(v.get("precision")), _fmt(v.get("f1")))
        for c, v in per_class.items()
        if isinstance(v, dict)
    ]
    parts = [f"<h3>{_e(summary)}</h3>", _table(["Class", "Images", "AUC (one-vs-rest)", "Sensitivity", "Precision", "F1"], rows)]
    cm = multi.get("confusion_matrix")
    names = list(per_class)
    if isinstance(cm, list) and len(cm) == len(names):
        header = ["true \\ predicted", *names]
        parts.append(_table(header, [(names[i], *[_fmt(v) for v in row]) for i, row in enumerate(cm)], css="confusion"))
    return "\n".join(parts)


def _binary_names(run: _Run) -> tuple[str, str]:
    positive = str(run.metrics.get("positive_class") or "positive")
    others = [c for c in run.classes if c != positive]
    negative = others[0] if len(run.classes) == 2 and others else f"not {positive}"
    return negative, positive


def _confusion_table(run: _Run, split: dict) -> str:
    negative, positive = _binary_names(run)
    rows = [
        (f"true {negative}", _fmt(_cm_cell(split, 0, 0)), _fmt(_cm_cell(split, 0, 1))),
        (f"true {positive}", _fmt(_cm_cell(split, 1, 0)), _fmt(_cm_cell(split, 1, 1))),
    ]
    return _table(["", f"predicted {negative}", f"predicted {positive}"], rows, css="confusion")


def _curves(run: _Run) -> str:
    parts = []
    for name, split in run.splits.items():
        label = _split_label(name)
        threshold = _fmt(split.get("threshold", run.threshold))
        parts.append(f"<h3>{_e(label)}</h3>")
        figures = _figures(
            [
                (run.plot(f"{name}_roc.png"), f"{label}: ROC curve, AUC {_with_ci(split, 'auc')}"),
                (run.plot(f"{name}_pr.png"), f"{label}: precision-recall curve, AP {_fmt(split.get('average_precision'))}"),
                (run.plot(f"{name}_confusion.png"), f"{label}: confusion matrix"),
                (run.plot(f"{name}_roc_classes.png"), f"{label}: one-vs-rest ROC per class"),
            ]
        )
        parts.append(figures or _note(f"No {name} plots in plots/."))
        parts.append(f'<p class="caption">{_e(label)}: confusion matrix at the chosen threshold {_e(threshold)}</p>')
        parts.append(_confusion_table(run, split))
    if not run.splits:
        parts.append(_note("metrics.json holds no split metrics."))
    return _section("curves", "Curves", "\n".join(parts))


def _calibration(run: _Run) -> str:
    rows = []
    for name, split in run.splits.items():
        cal = split.get("calibration")
        if isinstance(cal, dict):
            rows.append(
                (
                    _split_label(name),
                    _fmt(cal.get("temperature")),
                    _fmt(cal.get("ece_before"), 4),
                    _fmt(cal.get("ece_after"), 4),
                    _fmt(cal.get("brier_before"), 4),
                    _fmt(cal.get("brier_after"), 4),
                )
            )
    parts = []
    if rows:
        parts.append(
            _note(
                "Temperature scaling: one temperature fitted on validation divides the logits. "
                "ECE (expected calibration error) and Brier score of the positive class, lower is better."
            )
        )
        parts.append(_table(["Split", "Temperature", "ECE before", "ECE after", "Brier before", "Brier after"], rows))
    figures = _figures(
        [(run.plot(f"{n}_calibration.png"), f"{_split_label(n)}: reliability diagram before and after calibration") for n in run.splits]
    )
    if figures:
        parts.append(figures)
    if not parts:
        parts.append(_note("No calibration results in metrics.json."))
    return _section("calibration", "Calibration", "\n".join(parts))


def _explanations(run: _Run) -> str:
    gallery_file = run.root / "gallery.json"
    gallery = _read_json(gallery_file, what="CAM gallery")
    if gallery is None:
        return ""
    sections = gallery.get("sections") if isinstance(gallery, dict) else None
    if not isinstance(sections, list):
        raise DataError(f'report: {gallery_file} must hold {{"sections": [{{"title": ..., "items": [...]}}]}}')
    root = run.root.resolve()
    parts = []
    for section in sections:
        if not isinstance(section, dict):
            raise DataError(f"report: {gallery_file}: each section must be an object with title and items; got {section!r}")
        parts.append(f"<h3>{_e(section.get('title', ''))}</h3>")
        figures = []
        for item in section.get("items") or []:
            image = str(item.get("image", "")) if isinstance(item, dict) else ""
            caption = str(item.get("caption", "")) if isinstance(item, dict) else ""
            path = (root / image).resolve()
            if not image or not path.is_relative_to(root):
                figures.append(_note(f"Not shown: {image!r} is not a file inside the run directory."))
            elif not path.is_file():
                figures.append(_note(f"Not shown: {image} does not exist."))
            else:
                figures.append(_figure(path, caption))
        parts.append(f'<div class="figures gallery">{"".join(figures)}</div>')
    intro = _note("Class activation maps: where the model looked. Warm colours mark the regions that raised the score.")
    cells, size = gallery.get("map_cells"), gallery.get("input_size")
    if isinstance(cells, list) and len(cells) == 2 and all(isinstance(c, int) and c > 0 for c in cells) and isinstance(size, int):
        method = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "cam": "CAM"}.get(str(gallery.get("method")), str(gallery.get("method")))
        intro += _note(
            f"{method} on layer {gallery.get('target_layer', '?')}: a {cells[0]} x {cells[1]} map of the {size} px input, "
            f"one cell per {size / cells[1]:.0f} px, so a finding smaller than a cell cannot be outlined; "
            "train at a larger --image-size or with --output-stride 16 for finer maps."
        )
    return _section("explanations", "Explanations", intro + "\n".join(parts))


def _published(run: _Run) -> str:
    if sorted(run.classes) != list(PUBLISHED_CLASSES):
        return ""
    rows = [(src, model, _percent(acc), _percent(sens), _percent(spec), _fmt(auc)) for src, model, acc, sens, spec, auc in PUBLISHED_RESULTS]
    parts = [
        '<p class="warn">Published results, official Kaggle/Kermany test split; not computed by this run. '
        f"The official test split has {OFFICIAL_TEST_IMAGES} images.</p>",
        _table(["Source", "Model", "Accuracy", "Sensitivity", "Specificity", "AUC"], rows, css="published"),
    ]
    test = run.splits.get("test")
    if test is not None:
        n = test.get("n")
        same = " (the same size as the official split)" if n == OFFICIAL_TEST_IMAGES else ""
        parts.append(
            _note(
                f"This run's test split has {_fmt(n)} images{same}; its numbers are comparable with the table "
                "only when it is the official test split."
            )
        )
    return _section("published", "Published results on this task", "\n".join(parts))


# -------------------------------------------------------------------------- page


def _other_figures(run: _Run) -> str:
    extra = run.unused_plots()
    if not extra:
        return ""
    return _section("other-figures", "Other figures", _figures([(p, p.stem.replace("_", " ")) for p in extra]))


def _page(title: str, run: _Run, body: str) -> str:
    body += "\n" + _other_figures(run)  # after every section has claimed its plots
    present = [s for s in SECTION_IDS if f'<section id="{s}">' in body]
    if 'id="other-figures"' in body:
        present.append("other-figures")
    nav = " ".join(f'<a href="#{s}">{_e(s.replace("-", " ").capitalize())}</a>' for s in present)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="medtransfer {_e(__version__)}">
<link rel="icon" href="data:,">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>{_e(title)}</h1>
<p class="note">Run directory: {_e(run.root.resolve().name)}. Generated by medtransfer {_e(__version__)}.</p>
<nav>{nav}</nav>
</header>
<main>
{body}
</main>
</body>
</html>
"""


_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1100px; padding: 1.5rem 1.5rem 3rem;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  color: #1d2330; background: #fff; }
h1 { font-size: 1.6rem; margin: 0 0 .25rem; }
h2 { font-size: 1.25rem; margin: 2rem 0 .75rem; padding-bottom: .25rem; border-bottom: 2px solid #dde3ec; }
h3 { font-size: 1.05rem; margin: 1.25rem 0 .5rem; }
nav { margin: .75rem 0 0; display: flex; flex-wrap: wrap; gap: .35rem .9rem; font-size: .9rem; }
nav a { color: #2456a6; text-decoration: none; }
nav a:hover { text-decoration: underline; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #dde3ec; padding: .3rem .6rem; text-align: left; vertical-align: top; }
thead th { background: #f2f5f9; }
tbody th { font-weight: 600; background: #fafbfd; }
table.headline td { font-size: 1.05rem; font-weight: 600; }
table.history td { text-align: right; }
table.history tr.best td { background: #fff6d6; font-weight: 600; }
table.config td { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .85rem; word-break: break-word; }
table.confusion td { text-align: right; min-width: 6rem; }
.lead { font-size: 1.05rem; }
.note { color: #5a6474; font-size: .9rem; }
.caption { margin-bottom: 0; font-weight: 600; }
.ok { border-left: 4px solid #2e8b57; background: #eef8f2; padding: .4rem .7rem; }
.warn { border-left: 4px solid #c27c0e; background: #fdf5e6; padding: .4rem .7rem; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 1rem; }
.gallery { grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); }
figure { margin: 0; border: 1px solid #dde3ec; border-radius: 4px; padding: .5rem; background: #fff; }
figure img { display: block; width: 100%; height: auto; }
figcaption { font-size: .85rem; color: #5a6474; margin-top: .35rem; }
@media print {
  body { max-width: none; padding: 0; font-size: 11pt; }
  nav { display: none; }
  section { break-inside: auto; }
  h2, h3 { break-after: avoid; }
  figure, table, .ok, .warn { break-inside: avoid; }
  .figures { grid-template-columns: repeat(2, 1fr); }
  a { color: inherit; text-decoration: none; }
}
"""
