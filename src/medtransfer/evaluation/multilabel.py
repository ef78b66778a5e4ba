"""Multi-label evaluation, as CheXNet (Rajpurkar et al. 2017) and CheXpert (Irvin et al. 2019) report it.

Per finding: a temperature and a decision threshold chosen on validation only (the same
policies as single-label), then AUC, average precision, sensitivity, specificity and
calibration at that threshold, with patient-level bootstrap intervals; across findings:
macro AUC (the mean of the findings' AUCs, the CheXNet headline) and micro AUC (every known
image-finding pair pooled), each with an interval from one joint patient bootstrap, so the
resampled findings stay correlated as they are in the data. Unknown labels (NaN targets:
blank, or uncertain under ``--uncertain ignore``) are left out of every figure of their
finding.

A finding whose known labels hold one class only on a split has no AUC there: it is listed
under ``undefined`` with its counts and left out of the macro average, never NaN. A finding
with one class only on validation cannot have a threshold chosen: it keeps temperature 1
and threshold 0.5, and is listed under ``operating_point.fallback``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.evaluation import calibration, metrics, resampling, thresholds
from medtransfer.evaluation.metrics import RankedScores
from medtransfer.errors import DataError
from medtransfer.safeio import write_csv_atomic
from medtransfer.task import Task, join_findings

FALLBACK_THRESHOLD = 0.5


@dataclass
class MultiLabelPoint:
    """Per-finding temperatures and thresholds fitted on validation, applied unchanged elsewhere."""

    task: Task
    temperatures: list[float]
    thresholds: list[float]
    policy: str
    fallback: list[str] = field(default_factory=list)  # findings with one class on validation

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return self.task.probabilities(logits, self.temperatures)

    def predict(self, probabilities: np.ndarray) -> np.ndarray:
        return self.task.decide(probabilities, self.thresholds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "thresholds": dict(zip(self.task.classes, self.thresholds)),
            "temperatures": dict(zip(self.task.classes, self.temperatures)),
            "fallback": self.fallback,
        }


def _known(targets: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices with a known label for finding k, and those labels (0/1 int)."""
    column = targets[:, k]
    index = np.flatnonzero(~np.isnan(column))
    return index, column[index].astype(np.int64)


def _both_classes(y: np.ndarray) -> bool:
    return 0 < int(y.sum()) < len(y)


def fit_multilabel_point(logits: np.ndarray, targets: np.ndarray, task: Task, *, policy: str, calibrate: str) -> MultiLabelPoint:
    """One temperature (binary NLL on the finding's known validation labels) and one threshold per finding."""
    parsed = thresholds.parse_threshold_policy(policy)
    temperatures, chosen, fallback = [], [], []
    for k, finding in enumerate(task.classes):
        index, y = _known(targets, k)
        if not _both_classes(y):
            temperatures.append(1.0)
            chosen.append(FALLBACK_THRESHOLD if parsed.kind != "fixed" else float(parsed.target))
            fallback.append(finding)
            continue
        z = logits[index, k].astype(np.float64)
        pair = np.stack([np.zeros_like(z), z], axis=1)  # softmax([0, z] / T)[1] = sigmoid(z / T)
        t = calibration.fit_temperature(pair, y) if calibrate == "temperature" else 1.0
        temperatures.append(float(t))
        p = 1.0 / (1.0 + np.exp(-z / t))
        chosen.append(float(thresholds.choose_threshold(y, p, parsed)))
    return MultiLabelPoint(task, temperatures, chosen, policy, fallback)


def multilabel_split_metrics(
    logits: np.ndarray,
    targets: np.ndarray,
    patient_ids: list[str],
    point: MultiLabelPoint,
    *,
    bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-finding figures, macro and micro AUC (with joint patient-bootstrap CIs), prevalence, co-occurrence.

    The top-level ``auc``, ``accuracy``, ``sensitivity`` and ``specificity`` are the macro
    averages over the findings with both classes, so tools that read a split's headline keep working.
    """
    task = point.task
    probs = point.probabilities(logits)
    raw = task.probabilities(logits, 1.0)
    per_finding: dict[str, Any] = {}
    undefined: list[str] = []
    for k, finding in enumerate(task.classes):
        index, y = _known(targets, k)
        entry: dict[str, Any] = {
            "n_known": int(len(index)), "n_positive": int(y.sum()), "n_masked": int(len(targets) - len(index)),
            "prevalence": float(y.mean()) if len(y) else 0.0,
            "threshold": point.thresholds[k], "temperature": point.temperatures[k],
        }
        if not _both_classes(y):
            undefined.append(finding)
            per_finding[finding] = entry
            continue
        entry.update(metrics.binary_metrics(y, probs[index, k], threshold=point.thresholds[k]))
        entry["n_masked"] = int(len(targets) - len(index))
        entry["calibration"] = {
            "ece_before": calibration.expected_calibration_error(y, raw[index, k]),
            "ece_after": calibration.expected_calibration_error(y, probs[index, k]),
            "brier_after": calibration.brier_score(y, probs[index, k]),
        }
        if bootstrap > 0:
            groups = [patient_ids[i] for i in index]
            try:
                intervals = resampling.bootstrap_ci(
                    y, probs[index, k], threshold=point.thresholds[k], groups=groups, n_resamples=bootstrap, seed=seed
                )
                entry.update({key: value for key, value in intervals.items() if key.endswith("_ci")})
            except DataError as exc:  # too few patients of a class for any valid resample
                entry["ci_note"] = str(exc)
        per_finding[finding] = entry
    defined = [f for f in task.classes if f not in undefined]
    out: dict[str, Any] = {
        "task": task.kind, "n": int(len(targets)), "patients": len(set(patient_ids)),
        "findings": per_finding, "undefined": undefined,
    }
    if defined:
        for name in ("auc", "average_precision", "accuracy", "sensitivity", "specificity", "f1"):
            out[name if name != "auc" else "macro_auc"] = float(np.mean([per_finding[f][name] for f in defined]))
        out["auc"] = out["macro_auc"]
        out["micro_auc"] = _micro_auc(probs, targets)
        if bootstrap > 0:
            out.update(_joint_bootstrap(probs, targets, patient_ids, task, defined, n_resamples=bootstrap, seed=seed))
    out["calibration"] = {
        "ece_after_mean": float(np.mean([per_finding[f]["calibration"]["ece_after"] for f in defined])) if defined else None,
        "ece_before_mean": float(np.mean([per_finding[f]["calibration"]["ece_before"] for f in defined])) if defined else None,
    }
    out["co_occurrence"] = co_occurrence(targets)
    return out


def _micro_auc(probs: np.ndarray, targets: np.ndarray) -> float:
    known = ~np.isnan(targets)
    y, s = targets[known].astype(np.int64), probs[known]
    ranked = RankedScores.build(y, s)
    auc, _, _ = ranked.auc_ap(ranked.unit_weights())
    return float(auc[0])


def _joint_bootstrap(
    probs: np.ndarray, targets: np.ndarray, patient_ids: list[str], task: Task, defined: list[str], *,
    n_resamples: int, seed: int, confidence: float = 0.95,
) -> dict[str, Any]:
    """Macro and micro AUC intervals from the same patient resamples for every finding."""
    patients: dict[str, int] = {}
    cluster = np.asarray([patients.setdefault(p, len(patients)) for p in patient_ids])
    rankings = []
    for finding in defined:
        k = task.classes.index(finding)
        index, y = _known(targets, k)
        ranked = RankedScores.build(y, probs[index, k])
        rankings.append((ranked, cluster[index][ranked.order]))
    known = ~np.isnan(targets)
    rows, cols = np.nonzero(known)
    micro = RankedScores.build(targets[known].astype(np.int64), probs[known])
    micro_cluster = cluster[rows][micro.order]
    rng = np.random.default_rng(seed)
    macro_values, micro_values, done = [], [], 0
    n_groups = len(patients)
    while done < n_resamples:
        b = min(128, n_resamples - done)
        draws = rng.integers(0, n_groups, size=(b, n_groups)) + (np.arange(b) * n_groups)[:, None]
        counts = np.bincount(draws.ravel(), minlength=b * n_groups).reshape(b, n_groups).astype(np.float64)
        aucs, valid = [], []
        for ranked, order_cluster in rankings:
            auc, _, ok = ranked.auc_ap(counts[:, order_cluster])
            aucs.append(auc)
            valid.append(ok)
        aucs_arr, valid_arr = np.stack(aucs, axis=1), np.stack(valid, axis=1)
        every = valid_arr.all(axis=1)  # a resample counts for the macro mean when every finding has both classes
        macro_values.append(aucs_arr[every].mean(axis=1))
        auc, _, ok = micro.auc_ap(counts[:, micro_cluster])
        micro_values.append(auc[ok])
        done += b
    alpha = (1 - confidence) / 2
    out: dict[str, Any] = {"n_resamples": n_resamples}
    for name, values in (("macro_auc_ci", macro_values), ("micro_auc_ci", micro_values)):
        joined = np.concatenate(values)
        if joined.size:
            out[name] = [float(v) for v in np.quantile(joined, [alpha, 1 - alpha])]
    if "macro_auc_ci" in out:
        out["auc_ci"] = out["macro_auc_ci"]
    return out


def co_occurrence(targets: np.ndarray) -> list[list[int]]:
    """Images with both findings positive (the diagonal: each finding's positives); unknown counts as not positive."""
    positive = np.nan_to_num(targets, nan=0.0) == 1
    return (positive.T.astype(np.int64) @ positive.astype(np.int64)).tolist()


def write_multilabel_predictions(
    paths: list[str], targets: np.ndarray, patient_ids: list[str], logits: np.ndarray, point: MultiLabelPoint, path: Path
) -> None:
    """path,label,prob_<finding>...,pred,pred_<finding>...,masked,patient_id.

    ``label`` and ``pred`` are the findings present and called, ``|``-joined (the run-directory
    contract's columns); ``masked`` the findings with an unknown label (left out of their metrics).
    """
    task = point.task
    probs = point.probabilities(logits)
    called = point.predict(probs)
    names = task.classes
    rows = (
        [
            image,
            task.label_of(np.nan_to_num(targets[i], nan=0.0)),
            *[repr(float(p)) for p in probs[i]],
            join_findings([f for f, c in zip(names, called[i]) if c]),
            *[str(int(c)) for c in called[i]],
            join_findings([f for f, v in zip(names, targets[i]) if np.isnan(v)]),
            patient_ids[i],
        ]
        for i, image in enumerate(paths)
    )
    header = ["path", "label", *[f"prob_{f}" for f in names], "pred", *[f"pred_{f}" for f in names], "masked", "patient_id"]
    write_csv_atomic(path, header, rows)
