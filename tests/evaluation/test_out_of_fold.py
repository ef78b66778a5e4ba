"""Cross-validation figures (evaluation/out_of_fold.py): the fold table, its spread, multiclass intervals, fold column."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medtransfer.errors import DataError
from medtransfer.evaluation.out_of_fold import (
    add_fold_column,
    fold_row,
    fold_spread,
    multiclass_intervals,
)
from medtransfer.rundir import RunMetrics


@pytest.mark.parametrize("values,mean,sd", [
    ([0.8, 0.9, 1.0], 0.9, 0.1),
    ([0.7], 0.7, None),  # one fold: no standard deviation
    ([0.6, None, 0.8], 0.7, np.std([0.6, 0.8], ddof=1)),  # a fold without the figure is left out
])
def test_the_spread_over_folds_is_the_mean_and_the_sample_sd(values, mean, sd):
    spread = fold_spread([{"fold": k, "auc": v} for k, v in enumerate(values, start=1)])["auc"]
    assert spread["mean"] == pytest.approx(mean)
    assert spread["sd"] == (None if sd is None else pytest.approx(sd))
    assert spread["n"] == sum(v is not None for v in values)


def test_a_fold_row_takes_the_folds_own_validation_block():
    metrics = RunMetrics.from_dict({
        "epochs_run": 4, "best_epoch": 2, "threshold": 0.4, "train_seconds": 3.0,
        "val": {"n": 9, "patients": 6, "auc": 0.8, "accuracy": 0.7, "sensitivity": 0.6, "specificity": 0.9,
                "multiclass": {"accuracy": 0.55, "macro_auc": 0.75}},
    })
    row = fold_row(2, metrics)
    assert row["fold"] == 2 and row["best_epoch"] == 2 and row["auc"] == 0.8
    assert row["accuracy_argmax"] == 0.55 and row["macro_auc"] == 0.75
    with pytest.raises(DataError, match="fold 3: its metrics.json has no val block"):
        fold_row(3, RunMetrics.from_dict({"epochs_run": 1}))


def test_multiclass_intervals_bracket_the_pooled_accuracy_and_macro_auc():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=300)
    logits = rng.normal(size=(300, 3)) + 1.5 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    groups = [f"p{i // 2}" for i in range(300)]  # two images per patient
    out = multiclass_intervals(labels, probs, groups, n_resamples=300, seed=1)
    accuracy = np.mean(probs.argmax(1) == labels)
    macro = roc_auc_score(labels, probs, multi_class="ovr")
    assert out["accuracy_ci"][0] < accuracy < out["accuracy_ci"][1]
    assert out["macro_auc_ci"][0] < macro < out["macro_auc_ci"][1]
    assert out["n_groups"] == 150 and out["n_resamples"] == 300
    assert multiclass_intervals(labels, probs, groups, n_resamples=300, seed=1) == out  # seeded


def test_the_fold_column_is_appended_row_by_row(tmp_path):
    path = tmp_path / "predictions_oof.csv"
    path.write_text("path,label,prob_A,prob_B,pred,patient_id\n/b.png,B,0.2,0.8,B,p2\n/a.png,A,0.9,0.1,A,p1\n")
    add_fold_column(path, {"/a.png": 1, "/b.png": 3})
    with path.open(newline="") as handle:
        assert [(r["path"], r["fold"]) for r in csv.DictReader(handle)] == [("/b.png", "3"), ("/a.png", "1")]
