"""medtransfer.evaluation.thresholds: policies checked against a brute-force table of every
candidate threshold; the operating point against scipy's softmax."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation.metrics import binary_metrics
from medtransfer.evaluation.thresholds import (
    OperatingPoint,
    ThresholdPolicy,
    choose_threshold,
    parse_threshold_policy,
)

# --------------------------------------------------------------- threshold policies


@pytest.mark.parametrize(
    "text, kind, value, canonical",
    [
        ("youden", "youden", None, "youden"),
        ("  F1 ", "f1", None, "f1"),
        ("sensitivity:0.95", "sensitivity", 0.95, "sensitivity:0.95"),
        ("Specificity:0.9", "specificity", 0.9, "specificity:0.9"),
        ("specificity: 1", "specificity", 1.0, "specificity:1"),
        ("fixed:0.5", "fixed", 0.5, "fixed:0.5"),
        ("fixed:0", "fixed", 0.0, "fixed:0"),
    ],
)
def test_parse_threshold_policy(text, kind, value, canonical):
    policy = parse_threshold_policy(text)
    assert policy == ThresholdPolicy(kind, value)
    assert str(policy) == canonical
    assert parse_threshold_policy(str(policy)) == policy


@pytest.mark.parametrize(
    "text",
    ["", "youdens", "youden:0.5", "f1:1", "sensitivity", "sensitivity:", "sensitivity:abc",
     "sensitivity:0", "sensitivity:1.5", "specificity:-0.1", "fixed:1.2", "fixed:nan", "auc:0.9"],
)
def test_parse_threshold_policy_rejects_bad_text(text):
    with pytest.raises(ConfigError) as info:
        parse_threshold_policy(text)
    message = str(info.value)
    assert "--threshold" in message and repr(text) in message and "sensitivity:X" in message


def test_threshold_policy_validates_on_construction():
    with pytest.raises(ConfigError, match="--threshold"):
        ThresholdPolicy("sensitivity", 2.0)
    with pytest.raises(ConfigError, match="--threshold"):
        ThresholdPolicy("median")


def _brute_force_table(y, p):
    """(candidate, sensitivity, specificity, f1, youden) for every distinct probability."""
    rows = []
    for t in np.unique(p):
        pred = p >= t
        tp = np.sum(pred & (y == 1))
        fp = np.sum(pred & (y == 0))
        fn = np.sum(~pred & (y == 1))
        tn = np.sum(~pred & (y == 0))
        sens, spec = tp / (tp + fn), tn / (tn + fp)
        rows.append((float(t), sens, spec, 2 * tp / (2 * tp + fp + fn), sens + spec - 1))
    return rows


POLICY_DATASETS = ["continuous", "ties", "imbalanced", "tiny"]


@pytest.mark.parametrize("name", POLICY_DATASETS)
@pytest.mark.parametrize("objective, column", [("youden", 4), ("f1", 3)])
def test_choose_threshold_maximises_objective(name, objective, column, scored):
    y, p = scored(name)
    table = _brute_force_table(y, p)
    t = choose_threshold(y, p, parse_threshold_policy(objective))
    best = max(r[column] for r in table)
    # ties go to the highest optimal candidate; t gives exactly its predictions
    top = max(r[0] for r in table if r[column] >= best - 1e-12)
    assert np.array_equal(p >= t, p >= top)
    lower = [r[0] for r in table if r[0] < top]
    assert t == top if not lower else max(lower) < t <= top


def test_youden_and_f1_thresholds_sit_midway_in_the_optimal_interval():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.05, 0.1, 0.2, 0.8, 0.9, 1.0])
    assert choose_threshold(y, p, parse_threshold_policy("youden")) == pytest.approx(0.5)
    assert choose_threshold(y, p, parse_threshold_policy("f1")) == pytest.approx(0.5)


@pytest.mark.parametrize("name", POLICY_DATASETS)
@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_choose_threshold_sensitivity_and_specificity(name, target, scored):
    y, p = scored(name)
    table = _brute_force_table(y, p)
    t = choose_threshold(y, p, ThresholdPolicy("sensitivity", target))
    assert t == max(r[0] for r in table if r[1] >= target)
    assert binary_metrics(y, p, threshold=t)["sensitivity"] >= target
    feasible = [r[0] for r in table if r[2] >= target]
    if feasible:
        t = choose_threshold(y, p, ThresholdPolicy("specificity", target))
        assert t == min(feasible)
        assert binary_metrics(y, p, threshold=t)["specificity"] >= target
    else:
        with pytest.raises(DataError, match="specificity"):
            choose_threshold(y, p, ThresholdPolicy("specificity", target))


def test_choose_threshold_fixed_and_unreachable_specificity():
    assert choose_threshold([0, 1], [0.2, 0.7], parse_threshold_policy("fixed:0.3")) == 0.3
    y = [0, 0, 1, 1]
    p = [1.0, 1.0, 1.0, 0.2]  # saturated: both negatives share the top score
    with pytest.raises(DataError, match="no threshold reaches specificity 0.9"):
        choose_threshold(y, p, parse_threshold_policy("specificity:0.9"))
    with pytest.raises(DataError, match="only class 1"):
        choose_threshold([1, 1], [0.3, 0.4], parse_threshold_policy("youden"))


# ------------------------------------------------------------------ operating point


@pytest.mark.parametrize("positive_index", [0, 1])
def test_operating_point_binary_decision_at_the_threshold(positive_index):
    rng = np.random.default_rng(positive_index)
    logits = rng.normal(size=(40, 2)) * 3
    point = OperatingPoint(positive_index=positive_index, temperature=1.7, threshold=0.3, policy="fixed:0.3")
    probs = point.probabilities(logits)
    np.testing.assert_allclose(probs, softmax(logits / 1.7, axis=1), atol=1e-12)
    expected = np.where(probs[:, positive_index] >= 0.3, positive_index, 1 - positive_index)
    np.testing.assert_array_equal(point.predict(probs), expected)
    # a threshold below 0.5 calls positive some images whose argmax is the other class
    assert np.any((point.predict(probs) == positive_index) & (probs.argmax(axis=1) != positive_index))


def test_operating_point_keeps_fitted_values():
    point = OperatingPoint(positive_index=1, temperature=2.0, threshold=0.7, policy="youden")
    assert (point.positive_index, point.temperature, point.threshold, point.policy) == (1, 2.0, 0.7, "youden")
    assert point == OperatingPoint(1, 2.0, 0.7, "youden")
