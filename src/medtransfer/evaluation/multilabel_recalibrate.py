"""`recalibrate` for a multi-label model: one temperature and one threshold per finding, refitted locally.

The local set is split by patient, stratified over the findings' positives (iterative
stratification, data.stratify); each finding's temperature (binary NLL on its known labels)
and threshold (the run's policy) are refitted on the fit part only, and every figure of the
report part is given before (the run's operating points) and after. A finding whose known
labels in the fit part hold one class only cannot be refitted: it keeps the run's temperature
and threshold and is listed under ``kept``. :mod:`medtransfer.evaluation.recalibrate` calls
these and writes the new model folder.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.data.discover import Record
from medtransfer.data.split import grouped_stratified_split
from medtransfer.errors import DataError
from medtransfer.evaluation import html as h
from medtransfer.evaluation.multilabel import MultiLabelPoint, fit_multilabel_point
from medtransfer.privacy import folder_name
from medtransfer.rundir import write_text_atomic
from medtransfer.task import Task

__all__ = [
    "multilabel_recalibration_metrics", "multilabel_summary_lines", "refit_multilabel", "split_local_multilabel",
    "write_multilabel_recalibration_report",
]

FIT, REPORT = "fit", "report"


def split_local_multilabel(records: list[Record], findings: tuple[str, ...], fit_fraction: float, seed: int) -> list[Record]:
    """Records with split "fit" or "report": whole patients, stratified over the findings, seeded.

    DataError when a part has no finding with both classes among its known labels."""
    pooled = [replace(r, split=None) for r in records]
    drawn = grouped_stratified_split(pooled, fraction=1 - fit_fraction, seed=seed, name=REPORT, rest=FIT, findings=findings)
    task = Task("multi-label", findings)
    for name in (FIT, REPORT):
        part = [r for r in drawn if r.split == name]
        targets = task.targets([r.label for r in part], [r.masked for r in part])
        if not any(_both(targets[:, k]) for k in range(len(findings))):
            raise DataError(
                f"--data: no finding has both a positive and a negative known label in the {name} part "
                f"({len(part)} images); recalibration needs both classes of a finding in each part: add patients or "
                f"change --fit-fraction ({fit_fraction})"
            )
    return drawn


def _both(column: np.ndarray) -> bool:
    known = column[~np.isnan(column)]
    return 0 < known.sum() < len(known)


def refit_multilabel(
    before: MultiLabelPoint, logits: np.ndarray, targets: np.ndarray, *, policy: str, calibrate: str
) -> tuple[MultiLabelPoint, list[str]]:
    """Per-finding temperature and threshold fitted on (logits, targets); findings with one class
    only there keep `before`'s values and are returned as the second item."""
    fitted = fit_multilabel_point(logits, targets, before.task, policy=policy, calibrate=calibrate)
    kept = list(fitted.fallback)
    temperatures = [before.temperatures[k] if f in kept else t for k, (f, t) in enumerate(zip(before.task.classes, fitted.temperatures))]
    thresholds = [before.thresholds[k] if f in kept else t for k, (f, t) in enumerate(zip(before.task.classes, fitted.thresholds))]
    return MultiLabelPoint(before.task, temperatures, thresholds, policy, []), kept


def multilabel_recalibration_metrics(
    info: Any, after: MultiLabelPoint, provenance: dict[str, Any], results: dict[str, dict], kept: list[str]
) -> dict[str, Any]:
    """metrics.json: the run-folder keys (test = the report part after recalibration) plus before/after."""
    point = after.to_dict()
    return {
        "backbone": info.backbone, "strategy": info.strategy, "test": results["after"], "classes": list(after.task.classes),
        "threshold_policy": after.policy, "run": provenance["run"], "data": provenance["data"],
        "split": f"{provenance['split']} ({REPORT} part)", "task": after.task.kind, "operating_point": point,
        "recalibration": {**provenance, "temperatures": point["temperatures"], "thresholds": point["thresholds"],
                          "kept": kept, "before": results["before"], "after": results["after"]},
    }


def _fmt(value: Any, ci: Any = None) -> str:
    return "n/a" if value is None else f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def multilabel_summary_lines(metrics: dict[str, Any]) -> list[str]:
    """Console lines: the refit per finding and the before/after figures on the report part."""
    r = metrics["recalibration"]
    lines = [
        f"Fitted on {r['fit_images']} images ({r['fit_patients']} patients); reported on {r['report_images']} images "
        f"({r['report_patients']} patients) the fit never saw.",
    ]
    for name in ("before", "after"):
        block = r[name]
        lines.append(f"{name:6s}: macro AUC {_fmt(block.get('macro_auc'), block.get('macro_auc_ci'))}, "
                     f"sensitivity {_fmt(block.get('sensitivity'))}, specificity {_fmt(block.get('specificity'))} (macro)")
    for finding in r["thresholds"]:
        b, a = r["before"]["findings"][finding], r["after"]["findings"][finding]
        lines.append(
            f"  {finding}: temperature {r['original']['temperatures'][finding]:.3f} -> {r['temperatures'][finding]:.3f}, "
            f"threshold {r['original']['thresholds'][finding]:.3f} -> {r['thresholds'][finding]:.3f}"
            + (" (kept: one class in the fit part)" if finding in r["kept"] else "")
            + (f"; sensitivity {_fmt(b.get('sensitivity'))} -> {_fmt(a.get('sensitivity'))}, "
               f"specificity {_fmt(b.get('specificity'))} -> {_fmt(a.get('specificity'))}" if "auc" in a else "; no AUC on the report part")
        )
    return lines


def _ci_cell(block: dict[str, Any], key: str) -> str:
    return h.format_with_ci(block.get(key), block.get(f"{key}_ci"))


def write_multilabel_recalibration_report(out: Path, metrics: dict[str, Any], figure: Path | None) -> Path:
    """report.html: what was refitted on what, macro figures and one row per finding before/after."""
    r = metrics["recalibration"]
    before, after = r["before"], r["after"]
    macro = [(label, _ci_cell(before, key), _ci_cell(after, key)) for key, label in (
        ("macro_auc", "Macro AUC"), ("micro_auc", "Micro AUC"), ("sensitivity", "Sensitivity (macro)"),
        ("specificity", "Specificity (macro)"))]
    ece = ((before.get("calibration") or {}).get("ece_after_mean"), (after.get("calibration") or {}).get("ece_after_mean"))
    macro.append(("ECE (mean over findings)", h.format_number(ece[0]), h.format_number(ece[1])))
    rows = []
    for finding in r["thresholds"]:
        b, a = before["findings"][finding], after["findings"][finding]
        rows.append((
            finding + (" (kept)" if finding in r["kept"] else ""),
            f"{h.format_number(r['original']['thresholds'][finding])} \u2192 {h.format_number(r['thresholds'][finding])}",
            f"{h.format_number(r['original']['temperatures'][finding])} \u2192 {h.format_number(r['temperatures'][finding])}",
            h.format_number(a.get("auc")),
            f"{h.format_number(b.get('sensitivity'))} \u2192 {h.format_number(a.get('sensitivity'))}",
            f"{h.format_number(b.get('specificity'))} \u2192 {h.format_number(a.get('specificity'))}",
            f"{h.format_number((b.get('calibration') or {}).get('ece_after'))} \u2192 "
            f"{h.format_number((a.get('calibration') or {}).get('ece_after'))}",
            f"{a['n_positive']} / {a['n_known']}",
        ))
    facts = [
        ("Original run", r["run"]), ("Local data", f"{r['data']} ({r['split']} split)"),
        ("Fit part", f"{r['fit_images']} images, {r['fit_patients']} patients"),
        ("Report part", f"{r['report_images']} images, {r['report_patients']} patients"),
        ("Split", f"by patient, stratified over the findings; fit fraction {r['fit_fraction']}, seed {r['seed']} ({r['split_file']})"),
        ("Threshold policy", r["original"]["policy"] or h.DASH),
    ]
    body = h.section("summary", "Before and after, on the report part",
                     h.table(["Metric", "Run as trained", "Recalibrated"], macro)
                     + h.note("95% CIs from a patient-level bootstrap. The report part never influenced the refit. "
                              "AUC does not change: a temperature keeps each finding's ranking."))
    body += h.section("findings", "Per finding", h.table(
        ["Finding", "Threshold", "Temperature", "AUC", "Sensitivity", "Specificity", "ECE", "Positives / known"], rows)
        + (h.note("Kept: one class only among the fit part's known labels, so the run's operating point stays.") if r["kept"] else ""))
    body += h.section("provenance", "Provenance", h.table(None, facts))
    if figure is not None:
        body += h.section("calibration", "Calibration", h.figures([(figure, "Reliability, every known image-finding pair of the report part")]))
    document = h.page(f"Recalibration of {r['run']}", body, subtitle=f"Model folder: {folder_name(out)}/model")
    return write_text_atomic(out / "report.html", document)
