"""From logits to the numbers a paper needs.

The order matters and is fixed here: calibrate (temperature fitted on validation), then
choose the decision threshold on validation, then report validation and test at that
threshold (and at 0.5 for comparison) with patient-level bootstrap intervals.
The test split never influences any choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.evaluation import calibration, metrics, plots, resampling, thresholds
from medtransfer.evaluation.thresholds import OperatingPoint
from medtransfer.safeio import write_csv_atomic


@dataclass
class SplitOutputs:
    """Raw model outputs for one split."""

    paths: list[str]
    labels: np.ndarray  # class indices
    patient_ids: list[str]
    logits: np.ndarray  # n x classes, before temperature scaling


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def default_positive_class(classes: list[str]) -> str:
    """PNEUMONIA when present (the reference task), else the last class."""
    return "PNEUMONIA" if "PNEUMONIA" in classes else classes[-1]


def fit_operating_point(val: SplitOutputs, *, positive_index: int, policy: str, calibrate: str) -> OperatingPoint:
    temperature = calibration.fit_temperature(val.logits, val.labels) if calibrate == "temperature" else 1.0
    probs = calibration.apply_temperature(val.logits, temperature)
    parsed = thresholds.parse_threshold_policy(policy)
    is_positive = (val.labels == positive_index).astype(int)
    threshold = thresholds.choose_threshold(is_positive, probs[:, positive_index], parsed)
    return OperatingPoint(positive_index, float(temperature), float(threshold), policy)


def split_metrics(
    outputs: SplitOutputs,
    point: OperatingPoint,
    classes: list[str],
    *,
    bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics at the chosen threshold, at 0.5, calibration before/after, and bootstrap CIs."""
    probs = point.probabilities(outputs.logits)
    raw_probs = softmax(outputs.logits)
    positive = point.positive_index
    is_positive = (outputs.labels == positive).astype(int)
    result = metrics.binary_metrics(is_positive, probs[:, positive], threshold=point.threshold)
    result["at_0.5"] = metrics.binary_metrics(is_positive, probs[:, positive], threshold=0.5)
    if len(classes) > 2:
        result["multiclass"] = metrics.multiclass_metrics(outputs.labels, probs, class_names=classes)
    result["calibration"] = {
        "temperature": point.temperature,
        "ece_before": calibration.expected_calibration_error(is_positive, raw_probs[:, positive]),
        "ece_after": calibration.expected_calibration_error(is_positive, probs[:, positive]),
        "brier_before": calibration.brier_score(is_positive, raw_probs[:, positive]),
        "brier_after": calibration.brier_score(is_positive, probs[:, positive]),
    }
    result["patients"] = len(set(outputs.patient_ids))
    if bootstrap > 0:
        intervals = resampling.bootstrap_ci(
            is_positive,
            probs[:, positive],
            threshold=point.threshold,
            groups=outputs.patient_ids,
            n_resamples=bootstrap,
            seed=seed,
        )
        result.update(intervals)
    return result


def write_predictions(outputs: SplitOutputs, point: OperatingPoint, classes: list[str], path: Path) -> None:
    """path,label,prob_<class>...,pred,patient_id (calibrated probabilities, prediction at the chosen threshold).

    The first columns follow the run-directory contract; patient_id is appended for patient-level resampling."""
    probs = point.probabilities(outputs.logits)
    predicted = point.predict(probs)
    rows = (
        [image, classes[outputs.labels[i]], *[repr(float(p)) for p in probs[i]], classes[predicted[i]], outputs.patient_ids[i]]
        for i, image in enumerate(outputs.paths)
    )
    write_csv_atomic(path, ["path", "label", *[f"prob_{c}" for c in classes], "pred", "patient_id"], rows)


def write_plots(
    outputs: SplitOutputs,
    point: OperatingPoint,
    classes: list[str],
    split_result: dict,
    plot_dir: Path,
    *,
    prefix: str,
    band_resamples: int = 200,
    seed: int = 0,
) -> dict[str, str]:
    """ROC and PR with patient-level bootstrap bands (0 resamples: none), confusion matrix and
    reliability diagram for one split."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    probs = point.probabilities(outputs.logits)
    positive = point.positive_index
    is_positive = (outputs.labels == positive).astype(int)
    cm = split_result["confusion_matrix"]
    tn, fp = cm[0]
    fn, tp = cm[1]
    fpr = fp / (fp + tn) if fp + tn else 0.0
    tpr = tp / (tp + fn) if tp + fn else 0.0
    written = {
        "roc": plots.plot_roc(
            is_positive,
            probs[:, positive],
            plot_dir / f"{prefix}_roc.png",
            auc=split_result["auc"],
            ci=split_result.get("auc_ci"),
            operating_point=(fpr, tpr),
            label=f"{classes[positive]} vs rest" if len(classes) > 2 else classes[positive],
            band=resampling.roc_band(is_positive, probs[:, positive], groups=outputs.patient_ids, n_resamples=band_resamples, seed=seed)
            if band_resamples
            else None,
        ),
        "pr": plots.plot_pr(
            is_positive,
            probs[:, positive],
            plot_dir / f"{prefix}_pr.png",
            average_precision=split_result["average_precision"],
            band=resampling.pr_band(is_positive, probs[:, positive], groups=outputs.patient_ids, n_resamples=band_resamples, seed=seed)
            if band_resamples
            else None,
        ),
        "reliability": plots.plot_reliability(
            {"before calibration": (is_positive, softmax(outputs.logits)[:, positive]), "after": (is_positive, probs[:, positive])},
            plot_dir / f"{prefix}_calibration.png",
        ),
    }
    if len(classes) > 2:
        written["confusion"] = plots.plot_confusion(
            split_result["multiclass"]["confusion_matrix"], classes, plot_dir / f"{prefix}_confusion.png", title=f"{prefix} (argmax)"
        )
        written["roc_multiclass"] = plots.plot_multiclass_roc(outputs.labels, probs, classes, plot_dir / f"{prefix}_roc_classes.png")
    else:
        negative = classes[1 - positive]
        written["confusion"] = plots.plot_confusion(
            cm, [negative, classes[positive]], plot_dir / f"{prefix}_confusion.png", title=f"{prefix}, threshold {point.threshold:.3f}"
        )
    return {k: str(Path(v)) for k, v in written.items()}
