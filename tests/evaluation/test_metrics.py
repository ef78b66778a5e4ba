"""medtransfer.evaluation.metrics (point metrics), checked against scikit-learn as an independent reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation.metrics import (
    RankedScores,
    binary_metrics,
    multiclass_metrics,
    pr_curve_points,
    roc_curve_points,
)

TOL = 1e-6

DATASETS = ["continuous", "ties", "imbalanced", "tiny", "all_tied"]


def _thresholds(p: np.ndarray) -> list[float]:
    # fixed values plus thresholds that sit exactly on observed probabilities
    return [0.5, 0.0, 1.0, float(p[0]), float(np.median(p)), float(np.max(p)), float(np.min(p))]


# ------------------------------------------------------------------ binary metrics


@pytest.mark.parametrize("name", DATASETS)
def test_binary_metrics_match_sklearn(name, scored):
    y, p = scored(name)
    for t in _thresholds(p):
        m = binary_metrics(y, p, threshold=t)
        pred = (p >= t).astype(int)
        tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
        assert m["confusion_matrix"] == [[tn, fp], [fn, tp]]
        assert m["n"] == len(y) and m["n_positive"] == int(y.sum())
        assert m["threshold"] == t
        expected = {
            "auc": skm.roc_auc_score(y, p),
            "average_precision": skm.average_precision_score(y, p),
            "accuracy": skm.accuracy_score(y, pred),
            "sensitivity": skm.recall_score(y, pred, pos_label=1, zero_division=0),
            "specificity": skm.recall_score(y, pred, pos_label=0, zero_division=0),
            "precision": skm.precision_score(y, pred, pos_label=1, zero_division=0),
            "npv": skm.precision_score(y, pred, pos_label=0, zero_division=0),
            "f1": skm.f1_score(y, pred, zero_division=0),
        }
        for key, value in expected.items():
            assert m[key] == pytest.approx(value, abs=TOL), (name, t, key)


def test_binary_metrics_is_json_ready_without_numpy_types(scored):
    y, p = scored("continuous")
    m = binary_metrics(np.asarray(y, dtype=np.int32), p.astype(np.float32), threshold=np.float64(0.5))
    assert json.loads(json.dumps(m)) == m

    def walk(v):
        if isinstance(v, list):
            return all(walk(x) for x in v)
        return type(v) in (int, float)

    assert all(walk(v) for v in m.values())


def test_undefined_ratios_are_zero_not_nan():
    y = np.array([0, 1, 0, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4])
    nothing_positive = binary_metrics(y, p, threshold=0.9)
    assert nothing_positive["precision"] == 0.0 and nothing_positive["f1"] == 0.0
    everything_positive = binary_metrics(y, p, threshold=0.0)
    assert everything_positive["npv"] == 0.0 and everything_positive["specificity"] == 0.0


@pytest.mark.parametrize(
    "y, p, match",
    [
        ([1, 1, 1], [0.2, 0.5, 0.9], "only class 1"),
        ([0, 0], [0.2, 0.5], "only class 0"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "only 0"),
        ([0, 1], [0.1, 0.2, 0.3], "same length"),
        ([0, 1], [0.1, float("nan")], "finite"),
        ([], [], "empty"),
    ],
)
def test_binary_metrics_rejects_bad_input(y, p, match):
    with pytest.raises(DataError, match=match):
        binary_metrics(y, p, threshold=0.5)


def test_non_finite_threshold_is_a_config_error():
    with pytest.raises(ConfigError, match="threshold"):
        binary_metrics([0, 1], [0.1, 0.9], threshold=float("nan"))


@pytest.mark.parametrize("name", DATASETS)
def test_roc_curve_points_match_sklearn(name, scored):
    y, p = scored(name)
    fpr, tpr, thr = roc_curve_points(y, p)
    fpr2, tpr2, thr2 = skm.roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(fpr, fpr2, atol=TOL)
    np.testing.assert_allclose(tpr, tpr2, atol=TOL)
    np.testing.assert_array_equal(thr, thr2)


@pytest.mark.parametrize("name", DATASETS)
def test_pr_curve_points_match_sklearn(name, scored):
    y, p = scored(name)
    prec, rec, thr = pr_curve_points(y, p)
    prec2, rec2, thr2 = skm.precision_recall_curve(y, p)
    np.testing.assert_allclose(prec, prec2, atol=TOL)
    np.testing.assert_allclose(rec, rec2, atol=TOL)
    np.testing.assert_array_equal(thr, thr2)


# ---------------------------------------------------------------------- multiclass


@pytest.mark.parametrize("k, seed", [(2, 0), (3, 1), (4, 2)])
def test_multiclass_metrics_match_sklearn(k, seed):
    rng = np.random.default_rng(seed)
    n = 300
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    names = [f"c{i}" for i in range(k)]
    m = multiclass_metrics(y, probs, class_names=names)
    pred = probs.argmax(axis=1)
    assert m["n"] == n
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=TOL)
    if k > 2:
        ref_macro = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
    else:
        ref_macro = np.mean([skm.roc_auc_score(y == c, probs[:, c]) for c in range(k)])
    assert m["macro_auc"] == pytest.approx(ref_macro, abs=TOL)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=TOL)
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=list(range(k))).tolist()
    prec, rec, f1, support = skm.precision_recall_fscore_support(y, pred, labels=list(range(k)), zero_division=0)
    for c, name in enumerate(names):
        pc = m["per_class"][name]
        assert pc["auc"] == pytest.approx(skm.roc_auc_score(y == c, probs[:, c]), abs=TOL)
        assert pc["sensitivity"] == pytest.approx(rec[c], abs=TOL)
        assert pc["precision"] == pytest.approx(prec[c], abs=TOL)
        assert pc["f1"] == pytest.approx(f1[c], abs=TOL)
        assert pc["support"] == support[c]
    assert json.loads(json.dumps(m)) == m


def test_multiclass_metrics_errors():
    probs = np.full((4, 3), 1 / 3)
    with pytest.raises(DataError, match="'c'"):
        multiclass_metrics([0, 1, 0, 1], probs, class_names=["a", "b", "c"])
    with pytest.raises(DataError, match=r"\(n, 2\)"):
        multiclass_metrics([0, 1, 0, 1], probs, class_names=["a", "b"])
    with pytest.raises(DataError, match="0..2"):
        multiclass_metrics([0, 1, 3, 2], probs, class_names=["a", "b", "c"])
    with pytest.raises(ConfigError, match="class_names"):
        multiclass_metrics([0, 1, 0, 1], probs, class_names=["a", "a", "c"])


# ------------------------------------------------------------------ ranking


@pytest.mark.parametrize("name", DATASETS)
def test_placements_follow_the_pairwise_definition(name, scored):
    y, p = scored(name)
    pos, neg = p[y == 1], p[y == 0]
    # per pair of a positive x and a negative z: 1 if x > z, 1/2 if tied
    kernel = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    placed = RankedScores.build(y, p).placements()
    np.testing.assert_allclose(placed[y == 1], kernel.mean(axis=1), atol=1e-12)
    np.testing.assert_allclose(placed[y == 0], kernel.mean(axis=0), atol=1e-12)
    assert placed[y == 1].mean() == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)


def test_ranked_scores_weights_equal_repeated_samples(scored):
    """Integer weights (a bootstrap resample) give the metrics of the data with repeats."""
    y, p = scored("ties")
    counts = np.random.default_rng(0).integers(0, 3, y.shape[0])
    ranked = RankedScores.build(y, p)
    auc, ap, valid = ranked.auc_ap(counts[ranked.order][None, :].astype(float))
    y_rep, p_rep = np.repeat(y, counts), np.repeat(p, counts)
    assert valid[0]
    assert auc[0] == pytest.approx(skm.roc_auc_score(y_rep, p_rep), abs=1e-12)
    assert ap[0] == pytest.approx(skm.average_precision_score(y_rep, p_rep), abs=1e-12)
