"""``MODEL_CARD.md`` beside ``report.html``: the run as a model card (Mitchell et al., 2019).

"Model Cards for Model Reporting" (FAT* 2019) asks for model details, intended use, factors,
metrics, evaluation data, training data, quantitative analyses, ethical considerations and
caveats; a medtransfer card adds the calibration and where each threshold came from. Everything
is read from the run folder (:class:`~medtransfer.rundir.RunDir`: ``metrics.json``,
``config.yaml``, ``model/model.json``, ``model/ood.json``, the file types of ``split.csv``);
what a folder lacks is stated, never guessed. The card names no absolute path, user name or
patient ID: the data folder appears as its last component, counts stand for people. Figures
with an interval are written as the report writes them (:func:`~medtransfer.evaluation.html.format_with_ci`).

>>> write_model_card(Path("runs/resnet18"))  # doctest: +SKIP
PosixPath('runs/resnet18/MODEL_CARD.md')
"""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from medtransfer import __version__
from medtransfer.evaluation import html as h
from medtransfer.rundir import METRICS_FILE, RunDir, RunMetrics, SplitMetrics
from medtransfer.safeio import write_text_atomic

__all__ = ["CARD_FILE", "SECTIONS", "model_card", "write_model_card"]

CARD_FILE = "MODEL_CARD.md"
SECTIONS = ("Model details", "Intended use", "Factors", "Metrics", "Evaluation data", "Training data",
            "Quantitative analyses", "Calibration", "Threshold provenance", "Ethical considerations",
            "Caveats and recommendations")
_ROWS = (("auc", "ROC AUC"), ("average_precision", "Average precision"), ("sensitivity", "Sensitivity"),
         ("specificity", "Specificity"), ("precision", "Precision (PPV)"), ("npv", "NPV"), ("accuracy", "Accuracy"),
         ("f1", "F1"))
_ML_ROWS = (("macro_auc", "Macro AUC (mean over findings)"), ("micro_auc", "Micro AUC (image-finding pairs pooled)"),
            ("average_precision", "Mean average precision"), ("sensitivity", "Mean sensitivity"),
            ("specificity", "Mean specificity"), ("f1", "Mean F1"))
_SHIFT_KEYS = ("shift", "test_shift", "label_free_shift", "site_shift")
# An absolute path (POSIX, home or Windows drive) with at least one folder: shown by its last part.
_ABSOLUTE = re.compile(r"(?<![\w.])(?:~|[A-Za-z]:)?[/\\](?:[^\s/\\|`)]+[/\\])+([^\s/\\|`)]*)")
fmt = h.format_number


def write_model_card(run_dir: Path) -> Path:
    """Write ``run_dir/MODEL_CARD.md`` atomically and return its path (DataError: metrics.json missing or malformed)."""
    return write_text_atomic(Path(run_dir) / CARD_FILE, model_card(run_dir))


def model_card(run_dir: Path) -> str:
    """The card's Markdown: one ``##`` section per entry of :data:`SECTIONS`, in that order."""
    card = _Card(RunDir(run_dir))
    body = [f"# Model card: {_md(card.folder.root.resolve().name)}", "",
            f"Written by medtransfer {__version__} from the run folder's metrics.json, config.yaml and model/model.json. "
            "Figures with a 95% CI: patient-level bootstrap, as in report.html.", ""]
    builders = (card.details, card.intended_use, card.factors, card.metrics_text, card.evaluation_data, card.training_data,
                card.quantitative, card.calibration, card.thresholds, card.ethics, card.caveats)
    for title, build in zip(SECTIONS, builders):
        body += [f"## {title}", "", *build(), ""]
    return _ABSOLUTE.sub(lambda m: m.group(1), "\n".join(body).rstrip() + "\n")


# ---------------------------------------------------------------------------- helpers


def _md(value: Any) -> str:
    """Text from the data made safe in Markdown (a table cell, no HTML)."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _last(value: Any) -> str:
    """A path setting by its last component (``/data/chest_xray`` -> ``chest_xray``); other text as it is."""
    text = str(value)
    if "/" in text or "\\" in text:
        text = (PureWindowsPath(text) if re.match(r"^[A-Za-z]:", text) or "\\" in text else PurePosixPath(text)).name
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _ci(entry: dict[str, Any], key: str, confidence: Any = 0.95) -> str:
    ci = entry.get(f"{key}_ci")
    return h.format_with_ci(entry.get(key), ci if isinstance(ci, (list, tuple)) else None,
                            confidence=entry.get("confidence", confidence))


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _ood(path: Path) -> dict[str, Any] | None:
    """model/ood.json (the guard is there), {} when unreadable (loading the model names the problem), None when absent."""
    if not path.is_file():
        return None
    try:
        return _dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


class _Card:
    """What the run folder holds, read once; one method per section (each returns Markdown lines)."""

    def __init__(self, folder: RunDir):
        self.folder = folder
        self.m: RunMetrics = folder.metrics()
        self.model = _dict(folder.model_json())
        self.config = folder.config() or _dict(self.model.get("training_config"))
        self.ood = _ood(folder.root / "model" / "ood.json")
        self.extra = self.m.extra
        self.multilabel = (self.extra.get("task") or self.model.get("task")) == "multi-label"
        self.classes = [str(c) for c in (self.m.classes or self.model.get("classes") or [])]
        self.cv = _dict(self.extra.get("cross_validation"))

    # ------------------------------------------------------------------ shared facts

    def label(self, name: str) -> str:
        if name == "val" and self.cv:
            return "Out-of-fold (pooled validation)"
        return {"val": "Validation", "test": "Test"}.get(name, name)

    def setting(self, key: str) -> Any:
        return self.config.get(key, self.model.get(key))

    def data_name(self) -> str:
        data = self.m.data or self.config.get("data")
        return _md(_last(data)) if data else "not recorded"

    def findings(self, split: SplitMetrics) -> dict[str, dict[str, Any]]:
        return {str(k): v for k, v in _dict(split.extra.get("findings")).items() if isinstance(v, dict)}

    def point(self) -> dict[str, Any]:
        return _dict(self.extra.get("operating_point"))

    def per_finding(self, key: str) -> dict[str, Any]:
        """thresholds or temperatures per finding: the operating point, else model.json's lists."""
        values = self.point().get(key)
        if isinstance(values, dict):
            return values
        values = self.model.get(key)
        return dict(zip(self.classes, values)) if isinstance(values, list) else {}

    def source_kind(self) -> str:
        suffix = PurePosixPath(self.data_name()).suffix.lower()
        kind = {".csv": "a CSV manifest", ".npz": "a MedMNIST .npz file"}.get(suffix, "image folders")
        if self.multilabel:
            return f"{kind}; uncertain labels: {_md(self.config.get('uncertain', 'not recorded'))}"
        return f"{kind}; label mapping: {_md(self.config.get('labels', 'not recorded'))}"

    def hardware(self) -> str:
        hw = _dict(self.extra.get("hardware"))
        if not hw:
            return f"not recorded (precision {self.m.precision})" if self.m.precision else "not recorded"
        device = hw.get("gpu") or f"{hw.get('cpu') or 'CPU'} ({hw.get('cores')} cores)"
        nodes = hw.get("num_nodes", 1)
        return (f"{hw.get('devices', 1)} x {_md(device)} on {nodes} node{'s' if nodes != 1 else ''} (world size "
                f"{hw.get('world_size', 1)}, {hw.get('distributed', 'none')}, precision {hw.get('precision') or self.m.precision})")

    # ------------------------------------------------------------------ sections

    def details(self) -> list[str]:
        m, names = self.m, ", ".join(_md(c) for c in self.classes) or "not recorded"
        versions = _dict(self.model.get("versions"))
        written = self.folder.root / METRICS_FILE
        date = datetime.fromtimestamp(written.stat().st_mtime, timezone.utc).date().isoformat()
        strategy = m.strategy or self.model.get("strategy")
        if strategy == "freeze" and self.config.get("freeze_children") is not None:
            strategy = f"freeze (first {self.config['freeze_children']} children frozen)"
        params = _dict(m.params)
        rows = [
            ("Backbone", _md(m.backbone or self.model.get("backbone") or "not recorded")),
            ("Pretrained weights", _md(_last(m.weights or self.setting("weights") or "not recorded"))),
            ("Transfer strategy", _md(strategy or "not recorded")),
            ("Head", _md(self.extra.get("head") or self.model.get("head") or "not recorded")),
            ("Parameters", f"{fmt(params.get('total'))} total, {fmt(params.get('trainable'))} trainable" if params else None),
            ("Task", "multi-label (one sigmoid per finding)" if self.multilabel else "single-label (softmax over the classes)"),
            ("Findings" if self.multilabel else "Classes", names),
            ("Positive class", _md(m.positive_class) if m.positive_class else None),
            ("Input", f"{fmt(self.model.get('image_size'))} px, {fmt(self.model.get('in_channels'))} channel(s), "
                      f"test-time augmentation {self.model.get('tta') or 'none'}" if self.model else None),
            ("Version", f"medtransfer {versions.get('medtransfer') or __version__}"
                        + (f", torch {versions['torch']}" if versions.get("torch") else "")),
            ("Date", f"{date} (metrics.json written)"),
        ]
        ensemble = _dict(self.extra.get("ensemble"))
        if self.cv:
            rows.append(("Ensemble", f"the {self.cv.get('folds')} fold models of a patient-grouped cross-validation, logits averaged"))
        elif ensemble.get("members"):
            rows.append(("Ensemble", f"{len(ensemble['members'])} seed runs on one split, logits averaged"))
        rows += [
            ("Epochs", f"{fmt(m.epochs_run)} run of at most {fmt(self.config.get('epochs'))}"
                       + (" (stopped early)" if m.stopped_early else "") if m.epochs_run is not None else None),
            ("Best epoch (lowest val loss)", fmt(m.best_epoch) if m.best_epoch is not None else None),
            ("Optimisation", ", ".join(f"{k.replace('_', ' ')} {_md(self.config[k])}" for k in
                                       ("batch_size", "lr", "loss", "augment", "class_weights", "seed") if k in self.config) or None),
            ("WiSE-FT", f"alpha {fmt(_dict(self.extra.get('wise_ft')).get('alpha'), 2)} (chosen on validation loss)"
             if self.extra.get("wise_ft") else None),
            ("Numeric precision", _md(m.precision) if m.precision else None),
            ("Hardware", self.hardware()),
            ("Training time", h.format_duration(m.train_seconds) if m.train_seconds is not None else None),
        ]
        return _table(["Field", "Value"], [[k, v] for k, v in rows if v is not None])

    def intended_use(self) -> list[str]:
        what = "findings" if self.multilabel else "classes"
        names = ", ".join(_md(c) for c in self.classes) or "those of its training data"
        one = ("the probability of each finding, each decided at its own threshold" if self.multilabel
               else "a probability per class and the decision at the chosen threshold")
        return [
            f"- **Primary use:** research on transfer learning for medical image classification: for one image like the "
            f"training images ({self.data_name()}), {one}. Its {what}: {names}.",
            "- **Primary users:** researchers and engineers who evaluate, compare or adapt models, with the report beside this card.",
            "- **Out of scope:** it is **not a diagnostic device**: not cleared or approved for clinical use, and not a "
            "substitute for a clinician's reading. It knows only the " + what + " above: any other condition is "
            + ("not reported." if self.multilabel else "forced into one of those classes.")
            + " Inputs unlike the training images (another modality, body part, view, age group, scanner or site) are "
            "out of scope until evaluated there. Heatmaps do not localise findings.",
        ]

    def factors(self) -> list[str]:
        suffixes = Counter(PurePosixPath(r.path.replace("\\", "/")).suffix.lower() or "(none)" for r in self.folder.split() or [])
        types = ", ".join(f"{_md(s)} ({fmt(n)})" for s, n in suffixes.most_common()) or "not recorded (no split.csv)"
        mean, std = self.model.get("mean"), self.model.get("std")
        views = self.config.get("views")
        known = self.data_name() != "not recorded"
        shape = (f"; decoded to {fmt(self.model.get('decode_size'))} px, centre crop {fmt(self.model.get('eval_crop_fraction'), 3)}, "
                 f"resized to {fmt(self.model.get('image_size'))} px, {fmt(self.model.get('in_channels'))} channel(s)"
                 + (f", normalised with mean {mean} and std {std}" if mean and std else "")) if self.model else ""
        return [
            f"- **Data source:** {self.data_name()}" + (f" ({self.source_kind()})." if known else "."),
            f"- **Image type:** files {types}{shape}.",
            f"- **Views:** {'only ' + ', '.join(map(_md, views)) if views else 'not filtered (--views not set); the views are not recorded'}.",
            "- **Not recorded:** patient age, sex, ethnicity, scanner, site and acquisition settings; no figure here is "
            "disaggregated by them, so performance across such groups is unknown.",
        ]

    def metrics_text(self) -> list[str]:
        resamples = next((s.n_resamples for s in self.m.splits.values() if s.n_resamples), None)
        lines = [
            "- **ROC AUC** ranks positives above negatives whatever the threshold; "
            + ("per finding, with the macro mean over findings and the micro AUC over image-finding pairs. "
               if self.multilabel else "")
            + f"95% CIs from a patient-level (cluster) bootstrap ({fmt(resamples) if resamples else 'resamples not recorded'} "
            "resamples): a patient's images are resampled together, as they are not independent.",
            "- **Sensitivity and specificity** at the threshold chosen on validation (see Threshold provenance): the "
            "trade-off a user of the decision gets; on validation they are optimistic, as the threshold was chosen there.",
            "- **Average precision, PPV, NPV, F1** depend on prevalence: they carry over only to sites with the same share of positives.",
            "- **Calibration: ECE** (expected calibration error, 15 bins) before and after temperature scaling: how far "
            "the probabilities are from observed frequencies.",
        ]
        return lines

    def evaluation_data(self) -> list[str]:
        lines, test = [], self.m.test
        if self.m.run or self.m.split:  # an evaluation folder
            lines.append(f"- External evaluation on {self.data_name()} ({_md(self.m.split or 'all')} images) of the model "
                         f"of run {_md(_last(self.m.run or 'not recorded'))}.")
        if test is None:
            lines.append("- **No test split.** This run's figures are validation figures only (the split that chose "
                         "the threshold and temperature), so they are optimistic: evaluate on held-out data first.")
        else:
            counts = [f"{fmt(test.n)} images", f"{fmt(test.patients)} patients"]
            if test.n_positive is not None:
                counts.append(f"{fmt(test.n_positive)} positive ({_md(self.m.positive_class or 'positive class')})")
            lines.append(f"- **Test split:** {', '.join(counts)}; held out by patient, used for nothing but these figures.")
        for name, block in _dict(self.extra.get("external") or self.extra.get("externals")).items():
            block = _dict(block)
            block = _dict(block.get("test")) or block
            lines.append(f"- **External set {_md(_last(name))}:** {fmt(block.get('n'))} images, AUC {_ci(block, 'auc')}.")
        return lines

    def training_data(self) -> list[str]:
        summary = {k: v for k, v in _dict(self.m.data_summary).items() if isinstance(v, dict)}
        lines = [f"Data: {self.data_name()}."]
        if summary:
            header = ["Split", "Finding" if self.multilabel else "Class", "Images", "Patients"] + (["Known labels"] if self.multilabel else [])
            rows = [[self.label(s) if s != "train" else "Train", _md(c), fmt(_dict(n).get("images")), fmt(_dict(n).get("patients"))]
                    + ([fmt(_dict(n).get("known"))] if self.multilabel else []) for s, per in summary.items() for c, n in per.items()]
            lines += ["", *_table(header, rows), ""]
            if self.multilabel:
                lines.append("An image may hold several findings; Images counts the positives per finding.")
        else:
            lines.append("No data summary in metrics.json.")
        split = (f"{self.cv.get('folds')} patient-grouped folds (test outside)" if self.cv
                 else "patient-level: all images of a patient lie in one split")
        lines.append(f"- **Split:** {split}; stratified by {'finding' if self.multilabel else 'class'}.")
        leakage = _dict(self.m.leakage)
        text = leakage.get("summary") if isinstance(leakage.get("summary"), str) else None
        if text is None and leakage:
            text = (f"{fmt(leakage.get('shared_patients'))} patient(s) and {fmt(leakage.get('duplicate_images'))} identical "
                    f"image(s) in two splits")
        lines.append(f"- **Leakage check:** {_md(text) if text else 'not recorded'}"
                     + ("." if not leakage else " (clean)" if leakage.get("clean") else " (**not clean**: see report.html)"))
        return lines

    def quantitative(self) -> list[str]:
        splits = self.m.splits
        if not splits:
            return ["metrics.json holds no split metrics."]
        header = ["Metric", *(self.label(n) for n in splits)]
        if self.multilabel:
            rows = [[label, *(_ci(s.to_dict(), key, s.confidence) for s in splits.values())] for key, label in _ML_ROWS]
        else:
            rows = [[label, *(h.split_value(s, key) for s in splits.values())] for key, label in _ROWS]
            if any((s.multiclass or {}).get("macro_auc") is not None for s in splits.values()):
                rows.append(["Macro AUC (one-vs-rest)", *(_ci(s.multiclass or {}, "macro_auc", s.confidence) for s in splits.values())])
        rows += [["Images", *(fmt(s.n) for s in splits.values())], ["Patients", *(fmt(s.patients) for s in splits.values())]]
        lines = _table(header, rows)
        for name, split in reversed(list(splits.items())) if self.multilabel else ():
            findings = self.findings(split)
            lines += ["", f"{self.label(name)}, per finding:", ""]
            lines += _table(["Finding", "Positive / known", "AUC", "Sensitivity", "Specificity", "Threshold"], [
                [_md(f), f"{fmt(e.get('n_positive'))} / {fmt(e.get('n_known'))}",
                 _ci(e, "auc", split.confidence) if h.is_number(e.get("auc")) else "no AUC (one class only)",
                 _ci(e, "sensitivity", split.confidence), _ci(e, "specificity", split.confidence), fmt(e.get("threshold"))]
                for f, e in findings.items()])
        if self.cv:
            spread = _dict(_dict(self.cv.get("per_fold")).get("auc"))
            lines += ["", f"Cross-validation: {fmt(self.cv.get('folds'))} folds; per-fold validation AUC "
                      f"{fmt(spread.get('mean'))} ± {fmt(spread.get('sd'))} (mean ± sd); the out-of-fold column pools "
                      f"{fmt(self.cv.get('pooled_images'))} images, each predicted once by the fold model that did not train on it."]
        return lines

    def calibration(self) -> list[str]:
        method = self.config.get("calibrate")
        lines = [f"Method: {_md(method)} (fitted on validation only)." if method else "Method: not recorded."]
        if self.multilabel:
            temperatures = self.per_finding("temperatures")
            rows = [[_md(f), fmt(t)] for f, t in temperatures.items()]
            lines += ["", *_table(["Finding", "Temperature"], rows or [["not recorded", h.DASH]]), ""]
            for name, s in self.m.splits.items():
                c = s.calibration or {}
                lines.append(f"- {self.label(name)}: mean ECE {fmt(c.get('ece_before_mean'), 4)} before, "
                             f"{fmt(c.get('ece_after_mean'), 4)} after.")
            return lines
        temperature = self.model.get("temperature")
        for name, s in self.m.splits.items():
            c = s.calibration or {}
            temperature = temperature if temperature is not None else c.get("temperature")
            lines.append(f"- {self.label(name)}: ECE {fmt(c.get('ece_before'), 4)} before, {fmt(c.get('ece_after'), 4)} after; "
                         f"Brier {fmt(c.get('brier_before'), 4)} before, {fmt(c.get('brier_after'), 4)} after.")
        lines.insert(1, f"- Temperature: {fmt(temperature)} (the logits are divided by it before the softmax).")
        return lines

    def thresholds(self) -> list[str]:
        m = self.m
        policy = self.point().get("policy") or m.threshold_policy or self.model.get("threshold_policy") or "not recorded"
        where = ("the pooled out-of-fold predictions (never test)" if self.cv
                 else "the validation split only; the test split never influenced it")
        lines = [f"- **Policy:** {_md(policy)}, chosen on {where}."]
        if self.multilabel:
            lines.append("- **Values:** one threshold per finding:")
            rows = [[_md(f), fmt(t)] for f, t in self.per_finding("thresholds").items()]
            lines += ["", *_table(["Finding", "Threshold"], rows or [["not recorded", h.DASH]])]
            fallback = [str(f) for f in self.point().get("fallback") or []]
            if fallback:
                lines += ["", f"- Validation held one class only for {', '.join(map(_md, fallback))}: threshold 0.5, temperature 1."]
            return lines
        threshold = m.threshold if m.threshold is not None else self.model.get("threshold")
        lines.append(f"- **Value:** {fmt(threshold)} on the probability of {_md(m.positive_class or 'the positive class')}.")
        if m.test is not None and m.test.at_half is not None:
            lines.append(f"- At 0.5 instead, test sensitivity {fmt(m.test.at_half.sensitivity)}, specificity "
                         f"{fmt(m.test.at_half.specificity)} (report.html).")
        return lines

    def ethics(self) -> list[str]:
        identifiers = self.extra.get("identifiers")
        return [
            "- Medical images are personal health data. "
            + (f"This run's shareable files hold {_md(identifiers)}." if isinstance(identifiers, str)
               else "This card holds counts only: no image path, patient ID or user name."),
            "- Labels mined from reports or folder names carry their own errors; the figures measure agreement with them.",
            "- A confident wrong answer can anchor a reader (automation bias): show probabilities with their context.",
        ]

    def caveats(self) -> list[str]:
        lines, m = [], self.m
        if m.test is None:
            lines.append("- No test split: every figure is a validation figure.")
        elif m.test.n is not None and m.test.n < 200:
            lines.append(f"- Small test split ({fmt(m.test.n)} images): wide intervals; read the CIs, not the point values.")
        for key in _SHIFT_KEYS:
            block = _dict(self.extra.get(key))
            if block.get("verdict"):
                lines.append(f"- **Shift ({key.replace('_', ' ')}):** {_md(block['verdict'])}.")
            elif block.get("reference") or block.get("prevalence") is not None:
                ref = _dict(block.get("reference"))
                lines.append(f"- **Shift:** the evaluated images differ from the run's own split: prevalence "
                             f"{fmt(block.get('prevalence'))} vs {fmt(ref.get('prevalence'))}, score KS distance "
                             f"{fmt(ref.get('ks_distance'))}, calibration slope {fmt(block.get('calibration_slope'))}.")
        flagged = _dict(self.extra.get("ood"))
        if self.ood is not None:
            accept = self.ood.get("accept_fraction") if h.is_number(self.ood.get("accept_fraction")) else 0.95
            lines.append(f"- **OOD guard** (model/ood.json, {_md(self.ood.get('method'))}): flags an input whose score is above "
                         f"the level that accepts {accept:.0%} of the validation images, as not like the "
                         "training data (predict and serve mark it); it catches foreign inputs, not wrong answers.")
        else:
            lines.append("- **No OOD guard** in model/: inputs unlike the training images are not flagged.")
        if flagged.get("flagged_fraction") is not None:
            lines.append(f"- The OOD guard flagged {fmt(flagged.get('flagged'))} evaluated image(s) "
                         f"({h.format_percent(flagged['flagged_fraction'])}).")
        if _dict(m.leakage) and not _dict(m.leakage).get("clean"):
            lines.append("- The leakage check found images or patients in two splits: the figures may be optimistic.")
        lines += [
            "- **A new site:** check it before use. `medtransfer evaluate` on labelled local images (shift summary), "
            "`medtransfer recalibrate` to refit temperature and threshold there, `medtransfer adapt` for unlabelled "
            "images (a label-free shift test, then BatchNorm statistics or a new prevalence).",
            "- **Heatmaps** (CAM, Grad-CAM) show where evidence raised a score, not where a finding is: they are "
            "not localisation evidence.",
        ]
        border = _dict(m.border_evidence)
        if border.get("n_flagged"):
            lines.append(f"- The shortcut check flagged {fmt(border['n_flagged'])} test image(s) drawing most of their "
                         "evidence from the image border (markers, text): see report.html.")
        return lines
