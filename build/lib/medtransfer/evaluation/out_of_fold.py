"""Cross-validation figures: the per-fold table and its spread, the pooled out-of-fold figures, paired tests.

Two views of one K-fold cross-validation, both reported because papers quote both:

- per fold (:func:`fold_row`, :func:`fold_spread`): each fold's own validation figures, as its
  run folder's metrics.json holds them (threshold and temperature chosen on that fold), then
  the mean and standard deviation over folds (DarkCovidNet, Ozturk et al. 2020, reports
  5-fold means);
- pooled (:func:`multiclass_intervals` adds to :func:`~medtransfer.evaluation.evaluate.split_metrics`):
  every pool image's one out-of-fold prediction, scored together with patient-level bootstrap
  intervals. With three or more classes the argmax accuracy and the macro one-vs-rest AUC get
  intervals from the same patient resamples.

:func:`paired_oof_test` compares two cross-validated runs of the same folds on their
``predictions_oof.csv`` (same images, same patients, same folds), as ``compare`` does on test.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from medtransfer.errors import DataError
from medtransfer.evaluation import resampling
from medtransfer.evaluation.metrics import RankedScores
from medtransfer.evaluation.multilabel_compare import compare_multilabel
from medtransfer.evaluation.multilabel_io import is_multilabel_columns
from medtransfer.rundir import Predictions, RunDir, RunMetrics, write_csv_atomic

__all__ = ["OOF_PREDICTIONS", "add_fold_column", "fold_row", "fold_spread", "multiclass_intervals", "paired_oof_test"]

OOF_PREDICTIONS = "predictions_oof.csv"
SPLIT_NAME = "oof"  # RunDir.predictions("oof") reads predictions_oof.csv
_CHUNK = 128


# ------------------------------------------------------------------------ per fold


def fold_row(fold: int, metrics: RunMetrics) -> dict[str, Any]:
    """One fold's line of the fold table, from its run's metrics.json (its own validation block)."""
    val = metrics.val
    if val is None:
        raise DataError(f"fold {fold}: its metrics.json has no val block; train the fold again")
    row: dict[str, Any] = {
        "fold": fold, "images": val.n, "patients": val.patients, "epochs_run": metrics.epochs_run,
        "best_epoch": metrics.best_epoch, "train_seconds": metrics.train_seconds, "threshold": metrics.threshold,
        "auc": val.auc, "accuracy": val.accuracy, "sensitivity": val.sensitivity, "specificity": val.specificity,
    }
    if val.multiclass:  # three or more classes: the argmax accuracy and macro AUC the papers quote
        row["accuracy_argmax"] = val.multiclass.get("accuracy")
        row["macro_auc"] = val.multiclass.get("macro_auc")
    findings = val.extra.get("findings")
    if isinstance(findings, dict):  # multi-label: auc is the macro AUC; each finding's own AUC too
        row["macro_auc"] = val.extra.get("macro_auc")
        row["micro_auc"] = val.extra.get("micro_auc")
        row["findings"] = {f: entry.get("auc") for f, entry in findings.items() if isinstance(entry, dict)}
    return row


def fold_spread(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation (n - 1) over folds of every numeric figure of the rows; per finding too."""
    keys = [k for k in rows[0] if k not in ("fold", "findings")] if rows else []
    out: dict[str, Any] = {key: _spread([r.get(key) for r in rows]) for key in keys}
    findings = [f for f in (rows[0].get("findings") or {})] if rows else []
    if findings:
        out["findings"] = {f: _spread([(r.get("findings") or {}).get(f) for r in rows]) for f in findings}
    return out


def _spread(values: Sequence[Any]) -> dict[str, Any]:
    finite = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return {
        "n": len(finite),
        "mean": float(np.mean(finite)) if finite else None,
        "sd": float(np.std(finite, ddof=1)) if len(finite) > 1 else None,
    }


# ------------------------------------------------------------------------ pooled


def multiclass_intervals(
    labels: np.ndarray, probs: np.ndarray, groups: Sequence[Any], *, n_resamples: int, seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Patient-bootstrap intervals of the argmax accuracy and the macro one-vs-rest AUC (3+ classes).

    One set of patient draws serves both; a resample counts for the macro AUC when every class
    has images in it and outside it. Returns ``accuracy_ci``, ``macro_auc_ci`` (absent when no
    resample was valid), ``n_resamples`` and ``n_groups``."""
    labels, probs = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    index: dict[Any, int] = {}
    cluster = np.asarray([index.setdefault(g, len(index)) for g in groups], dtype=np.int64)
    n_groups = len(index)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    rankings = []
    for c in range(probs.shape[1]):
        ranked = RankedScores.build((labels == c).astype(np.int64), probs[:, c])
        rankings.append((ranked, cluster[ranked.order]))
    rng = np.random.default_rng(seed)
    accuracy, macro, done = [], [], 0
    while done < n_resamples:
        b = min(_CHUNK, n_resamples - done)
        draws = rng.integers(0, n_groups, size=(b, n_groups)) + (np.arange(b) * n_groups)[:, None]
        counts = np.bincount(draws.ravel(), minlength=b * n_groups).reshape(b, n_groups).astype(np.float64)
        weights = counts[:, cluster]
        accuracy.append((weights * correct).sum(axis=1) / weights.sum(axis=1))
        aucs, valid = zip(*[(auc, ok) for auc, _, ok in (r.auc_ap(counts[:, order]) for r, order in rankings)])
        every = np.stack(valid, axis=1).all(axis=1)
        macro.append(np.stack(aucs, axis=1)[every].mean(axis=1))
        done += b
    alpha = (1.0 - confidence) / 2
    out: dict[str, Any] = {"n_resamples": int(n_resamples), "n_groups": n_groups}
    for name, values in (("accuracy_ci", accuracy), ("macro_auc_ci", macro)):
        joined = np.concatenate(values)
        if joined.size:
            out[name] = [float(v) for v in np.quantile(joined, [alpha, 1 - alpha])]
    return out


def add_fold_column(path: Path, folds_by_path: dict[str, int]) -> None:
    """Append a ``fold`` column to a predictions CSV written by the project's writers (rows matched by path)."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = list(reader)
    at = header.index("path")
    write_csv_atomic(path, [*header, "fold"], ([*row, str(folds_by_path[row[at]])] for row in rows))


# ------------------------------------------------------------------------ paired


def _oof_predictions(run: Path) -> Predictions:
    found = RunDir(run).predictions(SPLIT_NAME)
    if found is None:
        raise DataError(f"{run}: no {OOF_PREDICTIONS}; pass folders written by `medtransfer train --folds K`")
    return found


def _folds(predictions: Predictions) -> dict[str, str] | None:
    if "fold" not in predictions.columns:
        return None
    with predictions.file.open(newline="", encoding="utf-8-sig") as handle:
        return {row["path"]: row["fold"] for row in csv.DictReader(handle)}


def paired_oof_test(run_a: Path, run_b: Path, *, n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The AUC difference (a - b) of two cross-validated runs on their out-of-fold predictions.

    The runs must hold the same images with the same labels in the same folds (DataError otherwise):
    then every image was predicted by a model that never saw it, in both runs, and the patient
    bootstrap pairs them. Multi-label runs: the macro AUC difference (per finding under ``findings``)."""
    pa, pb = _oof_predictions(run_a), _oof_predictions(run_b)
    folds_a, folds_b = _folds(pa), _folds(pb)
    if folds_a is not None and folds_b is not None and folds_a != folds_b:
        moved = sum(folds_a.get(p) != folds_b.get(p) for p in set(folds_a) | set(folds_b))
        raise DataError(f"{run_a} and {run_b} used different folds ({moved} image(s) differ); paired out-of-fold "
                        "tests need the same folds: train both from one split.csv with its fold column")
    if is_multilabel_columns(pa.columns):
        folders = [SimpleNamespace(path=Path(r), name=Path(r).name, predictions=p) for r, p in ((run_a, pa), (run_b, pb))]
        tests, _ = compare_multilabel(folders, [(0, 1)], n_resamples=n_resamples, seed=seed)
        return tests[0]
    positive = RunDir(run_a).metrics().positive_class
    if not positive:
        raise DataError(f"{run_a}/metrics.json: no positive_class; cannot tell which AUC to compare")
    row_b = {path: i for i, path in enumerate(pb.paths)}
    if set(row_b) != set(pa.paths):
        raise DataError(f"{run_a} and {run_b} hold different out-of-fold images; a paired test needs the same pool")
    order = np.asarray([row_b[p] for p in pa.paths], dtype=np.int64)
    if any(pa.labels[i] != pb.labels[j] for i, j in enumerate(order)):
        raise DataError(f"{run_a} and {run_b} give different labels to some out-of-fold images")
    y = np.asarray([label == positive for label in pa.labels], dtype=np.int64)
    prob_a, prob_b = pa.probability(positive), pb.probability(positive)[order]
    groups = pa.patient_ids
    boot = resampling.paired_bootstrap_auc_test(y, prob_a, prob_b, groups=groups, n_resamples=n_resamples, seed=seed)
    delong = resampling.delong_test(y, prob_a, prob_b)
    return {
        "a": Path(run_a).name, "b": Path(run_b).name, "n_images": len(pa), "n_positive": int(y.sum()),
        "n_patients": len(set(groups)) if groups is not None else len(pa),
        "bootstrap_unit": "patient" if groups is not None else "image",
        "auc_a": boot["auc_a"], "auc_b": boot["auc_b"], "auc_diff": boot["auc_diff"], "ci": boot["ci"],
        "p_bootstrap": boot["p_value"], "p_delong": delong["p_value"], "n_resamples": boot["n_resamples"],
        "n_valid": boot["n_valid"], "seed": seed,
    }
