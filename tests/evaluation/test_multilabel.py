"""Multi-label evaluation against scikit-learn: per-finding AUC with masked labels left out, macro and micro AUC."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from medtransfer.evaluation.multilabel import (
    co_occurrence,
    fit_multilabel_point,
    multilabel_split_metrics,
    write_multilabel_predictions,
)
from medtransfer.task import MULTI_LABEL, Task

FINDINGS = ("Atelectasis", "Effusion", "Hernia")


def _data(seed: int, n: int = 240):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, 3)) < [0.3, 0.2, 0.05]).astype(np.float32)
    logits = rng.normal(0, 1, (n, 3)) + 2.0 * targets * [1.0, 1.5, 0.5]
    targets[rng.random((n, 3)) < 0.1] = np.nan  # unknown labels
    patients = [f"p{i // 2}" for i in range(n)]
    return logits, targets, patients


def test_per_finding_figures_equal_scikit_learn_with_masked_labels_left_out():
    logits, targets, patients = _data(0)
    task = Task(MULTI_LABEL, FINDINGS)
    point = fit_multilabel_point(logits, targets, task, policy="youden", calibrate="temperature")
    result = multilabel_split_metrics(logits, targets, patients, point, bootstrap=200, seed=0)
    probs = point.probabilities(logits)
    aucs = []
    for k, finding in enumerate(FINDINGS):
        known = ~np.isnan(targets[:, k])
        y, p = targets[known, k], probs[known, k]
        entry = result["findings"][finding]
        assert entry["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert entry["average_precision"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
        assert entry["n_known"] == known.sum() and entry["n_positive"] == y.sum()
        called = p >= entry["threshold"]
        assert entry["sensitivity"] == pytest.approx(called[y == 1].mean())
        assert entry["specificity"] == pytest.approx(1 - called[y == 0].mean())
        assert entry["auc_ci"][0] <= entry["auc"] <= entry["auc_ci"][1]
        aucs.append(entry["auc"])
    assert result["macro_auc"] == pytest.approx(np.mean(aucs)) == pytest.approx(result["auc"])
    known = ~np.isnan(targets)
    assert result["micro_auc"] == pytest.approx(roc_auc_score(targets[known], probs[known]), abs=1e-12)
    assert result["macro_auc_ci"][0] <= result["macro_auc"] <= result["macro_auc_ci"][1]
    assert result["micro_auc_ci"][0] <= result["micro_auc"] <= result["micro_auc_ci"][1]


def test_temperatures_are_fitted_per_finding_on_known_labels():
    logits, targets, _ = _data(1)
    scaled = logits * [1.0, 4.0, 1.0]  # an over-confident second finding
    point = fit_multilabel_point(scaled, targets, Task(MULTI_LABEL, FINDINGS), policy="youden", calibrate="temperature")
    assert point.temperatures[1] > 2.0 * point.temperatures[0]
    plain = fit_multilabel_point(scaled, targets, Task(MULTI_LABEL, FINDINGS), policy="youden", calibrate="none")
    assert plain.temperatures == [1.0, 1.0, 1.0]


def test_a_finding_with_one_class_has_no_auc_and_no_nan():
    logits, targets, patients = _data(2)
    targets[:, 2] = np.where(np.isnan(targets[:, 2]), np.nan, 0.0)
    task = Task(MULTI_LABEL, FINDINGS)
    point = fit_multilabel_point(logits, targets, task, policy="f1", calibrate="temperature")
    assert point.fallback == ["Hernia"] and point.thresholds[2] == 0.5
    result = multilabel_split_metrics(logits, targets, patients, point)
    assert result["undefined"] == ["Hernia"] and "auc" not in result["findings"]["Hernia"]
    assert result["macro_auc"] == pytest.approx(np.mean([result["findings"][f]["auc"] for f in FINDINGS[:2]]))


def test_co_occurrence_counts_images_positive_for_both():
    targets = np.array([[1, 1, 0], [1, np.nan, 1], [0, 1, 0]], dtype=np.float32)
    assert co_occurrence(targets) == [[2, 1, 1], [1, 2, 0], [1, 0, 1]]


def test_predictions_csv_reproduces_the_metrics(tmp_path):
    logits, targets, patients = _data(3, n=60)
    task = Task(MULTI_LABEL, FINDINGS)
    point = fit_multilabel_point(logits, targets, task, policy="youden", calibrate="temperature")
    paths = [f"img{i}.png" for i in range(len(logits))]
    write_multilabel_predictions(paths, targets, patients, logits, point, tmp_path / "p.csv")
    with (tmp_path / "p.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    result = multilabel_split_metrics(logits, targets, patients, point)
    for finding in ("Atelectasis", "Effusion"):
        masked = [finding in r["masked"].split("|") for r in rows]
        y = [finding in r["label"].split("|") for r, m in zip(rows, masked) if not m]
        p = [float(r[f"prob_{finding}"]) for r, m in zip(rows, masked) if not m]
        assert roc_auc_score(y, p) == pytest.approx(result["findings"][finding]["auc"], abs=1e-9)
        assert all(r[f"pred_{finding}"] == str(int(float(r[f"prob_{finding}"]) >= result["findings"][finding]["threshold"]))
                   for r in rows)
