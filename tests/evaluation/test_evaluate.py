"""The order of operations: temperature and threshold from validation, applied unchanged to test."""

import csv

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medtransfer.evaluation.calibration import apply_temperature
from medtransfer.evaluation.evaluate import (
    SplitOutputs,
    default_positive_class,
    fit_operating_point,
    split_metrics,
    write_predictions,
)
from medtransfer.evaluation.thresholds import OperatingPoint


def outputs(seed: int, n: int = 300, scale: float = 12.0) -> SplitOutputs:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    margin = (labels * 2 - 1) * 1.2 + rng.normal(0, 1, n)
    logits = np.stack([-margin, margin], axis=1) * scale / 2  # true log-odds are 2.4 * margin: about 5x over-confident
    return SplitOutputs([f"img{i}.png" for i in range(n)], labels, [f"p{i // 2}" for i in range(n)], logits)


@pytest.mark.parametrize("classes, expected", [(["NORMAL", "PNEUMONIA"], "PNEUMONIA"), (["a", "b", "c"], "c")])
def test_default_positive_class(classes, expected):
    assert default_positive_class(classes) == expected


def test_operating_point_comes_from_validation_only():
    val, test = outputs(0), outputs(1)
    point = fit_operating_point(val, positive_index=1, policy="youden", calibrate="temperature")
    shifted_test = SplitOutputs(test.paths, test.labels, test.patient_ids, test.logits + 5.0)
    assert fit_operating_point(val, positive_index=1, policy="youden", calibrate="temperature") == point
    assert point.temperature > 1.5  # the over-confident logits are softened
    result = split_metrics(shifted_test, point, ["NORMAL", "PNEUMONIA"])
    assert result["threshold"] == point.threshold  # nothing re-fitted on test


def test_split_metrics_reports_both_thresholds_and_calibration_gain():
    val, test = outputs(0), outputs(1)
    point = fit_operating_point(val, positive_index=1, policy="specificity:0.9", calibrate="temperature")
    result = split_metrics(test, point, ["NORMAL", "PNEUMONIA"], bootstrap=200, seed=0)
    probs = apply_temperature(test.logits, point.temperature)[:, 1]
    assert result["auc"] == pytest.approx(roc_auc_score(test.labels, probs), abs=1e-9)
    assert result["at_0.5"]["threshold"] == 0.5 and result["threshold"] == point.threshold
    assert result["calibration"]["ece_after"] < result["calibration"]["ece_before"]
    assert result["auc_ci"][0] <= result["auc"] <= result["auc_ci"][1]
    assert result["patients"] == 150


def test_predictions_csv_follows_the_contract(tmp_path):
    test = outputs(1, n=10)
    point = OperatingPoint(positive_index=1, temperature=2.0, threshold=0.7, policy="fixed:0.7")
    path = tmp_path / "predictions_test.csv"
    write_predictions(test, point, ["NORMAL", "PNEUMONIA"], path)
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "label", "prob_NORMAL", "prob_PNEUMONIA", "pred", "patient_id"]
    for row in rows:
        p = float(row["prob_PNEUMONIA"])
        assert row["pred"] == ("PNEUMONIA" if p >= 0.7 else "NORMAL")
        assert float(row["prob_NORMAL"]) + p == pytest.approx(1.0)


def test_multiclass_prediction_is_argmax():
    point = OperatingPoint(positive_index=0, temperature=1.0, threshold=0.9, policy="youden")
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    assert point.predict(probs).tolist() == [0, 2]
