"""The sections of ``report.html`` for a multi-label run, as CheXNet and CheXpert report one.

:func:`medtransfer.evaluation.report.write_report` uses them when metrics.json says
``"task": "multi-label"`` (:func:`is_multilabel`): the same page shell, escaping and number
formatting (:mod:`medtransfer.evaluation.html`), with the single-label summary, metrics,
curves and calibration replaced, and the sections that only make sense for one positive class
(two-class confusion matrix, published pneumonia results, CAM gallery, border evidence) left out.

The page, in order: the summary (macro and micro AUC with their intervals per split, the means
over findings at each finding's threshold, the headline split's ROC grid, the run's facts), the
data (positives per finding and split, leakage), the per-finding tables (counts, AUC, AP,
sensitivity and specificity at the finding's threshold, each with its interval, threshold,
temperature, ECE before and after; the findings without an AUC named with the reason), the
figures (ROC grid with operating points, co-occurrence) per split, calibration, training,
configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from medtransfer.evaluation import html as h
from medtransfer.evaluation.published import chestxray14_section
from medtransfer.evaluation.report_findings import (
    foreign_inputs_html,
    leakage_html,
    shift_html,
)
from medtransfer.rundir import METRIC_KEYS, RunMetrics, SplitMetrics

__all__ = ["MULTILABEL_SECTION_IDS", "ReportRun", "is_multilabel", "multilabel_sections"]

MULTI_LABEL = "multi-label"

# In reading order; "training" and "configuration" are the single-label report's own sections.
MULTILABEL_SECTION_IDS = (
    "summary", "shift", "data", "findings", "published-chestxray14", "foreign-inputs", "curves", "calibration", "training",
    "configuration",
)


class ReportRun(Protocol):
    """What these sections read of the report's run (``report._Run``)."""

    metrics: RunMetrics
    classes: list[str]

    def plot(self, name: str) -> Path | None: ...


Section = Callable[[Any], str]


def is_multilabel(metrics: RunMetrics) -> bool:
    """metrics.json of a multi-label run or evaluation (top-level ``"task": "multi-label"``)."""
    return metrics.extra.get("task") == MULTI_LABEL


def multilabel_sections(run_facts: Section) -> dict[str, Section]:
    """The builders of the multi-label sections, by section id; ``run_facts(run)`` is the report's
    table of run facts (backbone, hardware, epochs, ...), shown at the end of the summary."""
    return {
        "summary": lambda run: _summary(run, run_facts(run)),
        "shift": lambda run: shift_html(run.metrics.extra.get("shift")),
        "data": _data,
        "findings": _findings,
        # CheXNet's per-finding table beside the test split's AUCs, where the findings carry ChestX-ray14 names
        "published-chestxray14": lambda run: chestxray14_section(run.metrics.test.extra) if run.metrics.test is not None else "",
        "foreign-inputs": lambda run: foreign_inputs_html(run.metrics.extra.get("ood"), run.metrics.test),
        "curves": _curves,
        "calibration": _calibration,
    }


# ---------------------------------------------------------------------- reading


def _label(name: str) -> str:
    return {"val": "Validation", "test": "Test", "train": "Train"}.get(name, name)


def _findings_of(split: SplitMetrics) -> dict[str, dict[str, Any]]:
    findings = split.extra.get("findings")
    return {str(k): v for k, v in findings.items() if isinstance(v, dict)} if isinstance(findings, dict) else {}


def _undefined(split: SplitMetrics) -> list[str]:
    """Findings without an AUC on this split: those metrics.json lists, and any entry lacking one."""
    listed = [str(f) for f in split.extra.get("undefined") or []]
    return listed + [f for f, e in _findings_of(split).items() if f not in listed and not h.is_number(e.get("auc"))]


def _ci(value: Any, ci: Any, confidence: Any) -> str:
    return h.format_with_ci(value, ci if isinstance(ci, (list, tuple)) else None, confidence=confidence)


def _split_ci(split: SplitMetrics, key: str) -> str:
    """A split-level figure (``macro_auc``, ``micro_auc``, ...) with its ``<key>_ci`` interval."""
    if key in METRIC_KEYS:
        return h.split_value(split, key)
    return _ci(split.extra.get(key), split.extra.get(f"{key}_ci"), split.confidence)


def _operating_point(metrics: RunMetrics) -> dict[str, Any]:
    point = metrics.extra.get("operating_point")
    return point if isinstance(point, dict) else {}


def _why_undefined(entry: dict[str, Any]) -> str:
    known, positive, masked = entry.get("n_known"), entry.get("n_positive"), entry.get("n_masked")
    fmt = h.format_number
    if not known:
        why = "no known label"
    elif not positive:
        why = f"no positive among {fmt(known)} known labels"
    elif positive == known:
        why = f"every one of its {fmt(known)} known labels is positive"
    else:
        why = f"{fmt(positive)} positive of {fmt(known)} known"
    return why + (f", {fmt(masked)} masked" if masked else "")


# ---------------------------------------------------------------------- sections


_HEADLINE_ROWS = (
    ("macro_auc", "Macro AUC (mean over findings)"),
    ("micro_auc", "Micro AUC (image-finding pairs pooled)"),
    ("average_precision", "Mean average precision"),
    ("sensitivity", "Mean sensitivity"),
    ("specificity", "Mean specificity"),
    ("f1", "Mean F1"),
)


def headline_table(metrics: RunMetrics) -> str:
    """Macro and micro AUC with their intervals, the means over findings and the counts: one column per split."""
    splits = metrics.splits
    rows = [[label] + [_split_ci(s, key) for s in splits.values()] for key, label in _HEADLINE_ROWS]

    def ece(s: SplitMetrics) -> str:
        c = s.calibration or {}
        return f"{h.format_number(c.get('ece_before_mean'), 4)} \u2192 {h.format_number(c.get('ece_after_mean'), 4)}"

    rows.append(["Mean ECE, before \u2192 after calibration"] + [ece(s) for s in splits.values()])
    rows.append(["Images"] + [h.format_number(s.n) for s in splits.values()])
    rows.append(["Patients"] + [h.format_number(s.patients) for s in splits.values()])
    rows.append(["Findings with an AUC"] + [
        f"{len(_findings_of(s)) - len(_undefined(s))} of {len(_findings_of(s))}" for s in splits.values()
    ])
    return h.table(["", *(_label(n) for n in splits)], rows, css="headline")


def _summary(run: ReportRun, facts: str) -> str:
    if run.metrics.headline is None:
        return h.section("summary", "Summary", h.note("metrics.json holds no split metrics.") + facts)
    name, split = run.metrics.headline
    lead = (
        f"{len(run.classes)} findings per image, each with its own sigmoid, temperature and threshold (chosen on "
        f"validation). {_label(name)} macro AUC {_split_ci(split, 'macro_auc')}, micro AUC {_split_ci(split, 'micro_auc')}."
    )
    notes = [h.note(
        "Macro AUC: the mean of the findings' AUCs (findings without one left out); micro AUC: every known "
        "image-finding pair ranked together. Sensitivity, specificity and F1 are means over findings, each at its own threshold."
    )]
    if split.n_resamples:
        notes.append(h.note(
            f"Intervals: {h.format_number(split.n_resamples)} patient bootstrap resamples, the same resamples for every "
            "finding, so macro and micro AUC intervals keep the findings' correlation."
        ))
    caption = f"{_label(name)}: ROC curve per finding; the dot marks its operating point at its own threshold"
    roc = h.figures([(run.plot(f"{name}_roc_findings.png"), caption)], css="wide")
    content = f'<p class="lead">{h.escape(lead)}</p>' + headline_table(run.metrics) + "".join(notes) + roc
    return h.section("summary", "Summary", content + facts)


def _data(run: ReportRun) -> str:
    m = run.metrics
    parts = []
    summary = {k: v for k, v in (m.data_summary or {}).items() if isinstance(v, dict)}
    if summary:
        rows = []
        for split, per_finding in summary.items():
            for finding, counts in per_finding.items():
                counts = counts if isinstance(counts, dict) else {}
                rows.append((split, str(finding), *(h.format_number(counts.get(k)) for k in ("images", "patients", "known"))))
        parts.append(h.table(["Split", "Finding", "Positive images", "Patients with one", "Known labels"], rows, css="data"))
        parts.append(h.note(
            "An image may hold several findings, so the rows do not add up. No Finding: the images with no known positive "
            "(its known labels: every image of the split). A patient's images all lie in one split (patient-level split)."
        ))
    else:
        rows = [(_label(n), h.format_number(s.n), h.format_number(s.patients)) for n, s in m.splits.items()]
        parts.append(h.table(["Split", "Images", "Patients"], rows) if rows else h.note("No data summary in metrics.json."))
    parts.append(leakage_html(m.leakage))
    return h.section("data", "Data", "\n".join(parts))


_TABLE_HEADER = ["Finding", "Positive / known", "Prevalence", "Masked", "AUC", "Average precision", "Sensitivity",
                 "Specificity", "Threshold", "Temperature", "ECE before \u2192 after"]


def findings_table(split: SplitMetrics) -> str:
    """One row per finding (metrics.json order), then the macro means."""
    fmt, conf = h.format_number, split.confidence
    rows = []
    for finding, e in _findings_of(split).items():
        confidence = e.get("confidence", conf)
        calibration = e.get("calibration") if isinstance(e.get("calibration"), dict) else {}
        has_auc = h.is_number(e.get("auc"))
        rows.append([
            finding, f"{fmt(e.get('n_positive'))} / {fmt(e.get('n_known'))}", h.format_percent(e.get("prevalence")),
            fmt(e.get("n_masked")),
            _ci(e.get("auc"), e.get("auc_ci"), confidence) if has_auc else "no AUC (see below)",
            *(_ci(e.get(k), e.get(f"{k}_ci"), confidence) for k in ("average_precision", "sensitivity", "specificity")),
            fmt(e.get("threshold")), fmt(e.get("temperature")),
            f"{fmt(calibration.get('ece_before'), 4)} \u2192 {fmt(calibration.get('ece_after'), 4)}" if calibration else h.DASH,
        ])
    c = split.calibration or {}
    rows.append([
        "Macro mean", h.DASH, h.DASH, h.DASH,
        *(_split_ci(split, k) for k in ("macro_auc", "average_precision", "sensitivity", "specificity")),
        h.DASH, h.DASH, f"{fmt(c.get('ece_before_mean'), 4)} \u2192 {fmt(c.get('ece_after_mean'), 4)}",
    ])
    return f'<div class="scroll">{h.table(_TABLE_HEADER, rows, css="findings")}</div>'


def _findings(run: ReportRun) -> str:
    m = run.metrics
    if not m.splits:
        return h.section("findings", "Findings", h.note("metrics.json holds no split metrics."))
    point = _operating_point(m)
    parts = []
    for name, split in reversed(list(m.splits.items())):  # test first
        findings = _findings_of(split)
        parts.append(f"<h3>{h.escape(_label(name))}: {len(findings)} findings, {h.format_number(split.n)} images</h3>")
        parts.append(findings_table(split))
        undefined = _undefined(split)
        if undefined:
            reasons = "; ".join(f"{f} ({_why_undefined(findings.get(f, {}))})" for f in undefined)
            parts.append(h.note(
                f"No AUC on {_label(name).lower()} for {reasons}: an AUC needs both classes among the known labels; "
                "a finding without one is left out of the macro mean.", css="warn",
            ))
        for finding, e in findings.items():
            if e.get("ci_note"):
                parts.append(h.note(f"{finding}: no interval ({e['ci_note']})."))
    fallback = [str(f) for f in point.get("fallback") or []]
    if fallback:
        parts.append(h.note(
            f"Validation held one class only for {', '.join(fallback)}: no temperature or threshold could be fitted, "
            "so these keep temperature 1 and threshold 0.5.", css="warn",
        ))
    policy = point.get("policy") or m.threshold_policy
    parts.append(h.note(
        f"Each finding's threshold (policy: {policy or 'not recorded'}) and temperature were chosen on validation; the "
        "test split never influenced them. Masked: images whose label for the finding is unknown (blank, or uncertain "
        "under --uncertain ignore), left out of that finding's figures. Sensitivity and specificity are at the "
        "finding's threshold; AUC and average precision do not depend on it."
    ))
    confidence = next((s.confidence for s in m.splits.values() if h.is_number(s.confidence)), 0.95)
    resamples = {n: s.n_resamples for n, s in m.splits.items() if s.n_resamples}
    if resamples:
        each = ", ".join(f"{_label(n).lower()} {h.format_number(r)}" for n, r in resamples.items())
        parts.append(h.note(f"{confidence * 100:g}% CIs from patient bootstrap resamples ({each})."))
    return h.section("findings", "Findings", "\n".join(parts))


def _curves(run: ReportRun) -> str:
    """Each split's ROC grid (unless the summary showed it) and co-occurrence figure."""
    parts = []
    for name in run.metrics.splits:
        label = _label(name)
        figures = h.figures([
            (run.plot(f"{name}_roc_findings.png"), f"{label}: ROC curve per finding; the dot marks its operating point"),
            (run.plot(f"{name}_co_occurrence.png"),
             f"{label}: images positive for both findings (diagonal: each finding's positives; unknown counts as not positive)"),
        ])
        parts.append(f"<h3>{h.escape(label)}</h3>" + (figures or h.note(f"No further {name} plots in plots/.")))
    if not parts:
        parts.append(h.note("metrics.json holds no split metrics."))
    return h.section("curves", "Curves", "\n".join(parts))


def _calibration(run: ReportRun) -> str:
    fmt = h.format_number
    splits = run.metrics.splits
    rows = [
        (_label(n), fmt((s.calibration or {}).get("ece_before_mean"), 4), fmt((s.calibration or {}).get("ece_after_mean"), 4))
        for n, s in splits.items()
    ]
    per_finding = [
        (f, _label(n), fmt(e.get("temperature")), *(fmt(e["calibration"].get(k), 4) for k in ("ece_before", "ece_after", "brier_after")))
        for n, s in splits.items() for f, e in _findings_of(s).items() if isinstance(e.get("calibration"), dict)
    ]
    if not rows:
        return h.section("calibration", "Calibration", h.note("No calibration results in metrics.json."))
    parts = [
        h.note("Temperature scaling per finding: one temperature, fitted on validation, divides that finding's logit. "
               "ECE (expected calibration error) and Brier score, lower is better; means over the findings with an AUC."),
        h.table(["Split", "Mean ECE before", "Mean ECE after"], rows),
    ]
    if per_finding:
        table = h.table(["Finding", "Split", "Temperature", "ECE before", "ECE after", "Brier after"], per_finding)
        parts.append(f"<details><summary>Per finding ({len(per_finding)} rows)</summary>{table}</details>")
    return h.section("calibration", "Calibration", "\n".join(parts))
