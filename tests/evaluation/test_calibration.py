"""medtransfer.evaluation.calibration: ECE, Brier, reliability bins, temperature scaling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import log_softmax
from sklearn.metrics import brier_score_loss, log_loss

from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation.calibration import (
    apply_temperature,
    brier_score,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    top_label_ece,
)


def _loop_ece(outcome, conf, n_bins):
    """Reference ECE written as the textbook loop over bins [lo, hi) (last bin closed)."""
    total = 0.0
    edges = np.linspace(0, 1, n_bins + 1)
    for i in range(n_bins):
        lo, hi = edges[i], edges[i + 1]
        inside = (conf >= lo) & ((conf < hi) if i < n_bins - 1 else (conf <= hi))
        if inside.any():
            total += inside.mean() * abs(outcome[inside].mean() - conf[inside].mean())
    return total


@pytest.mark.parametrize(
    "y, p, n_bins, expected",
    [
        # bin [0, .5): mean p .15, 1 of 2 positive -> .5 * .35; bin [.5, 1]: mean .85, 2/2 -> .5 * .15
        ([0, 1, 1, 1], [0.1, 0.2, 0.8, 0.9], 2, 0.25),
        ([1, 0], [1.0, 0.0], 15, 0.0),  # p == 1 lands in the last bin
        ([0, 1], [0.5, 0.5], 2, 0.0),  # both in the upper bin: mean .5 vs frequency .5
        ([1, 1, 1], [0.7, 0.7, 0.7], 10, 0.3),
    ],
)
def test_ece_by_hand(y, p, n_bins, expected):
    assert expected_calibration_error(y, p, n_bins=n_bins) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n_bins", [1, 5, 10, 15])
def test_ece_matches_loop_reference_and_reliability_bins(n_bins):
    rng = np.random.default_rng(n_bins)
    p = np.round(rng.random(500), 2)  # includes exact bin edges
    y = (rng.random(500) < p**2).astype(int)
    ece = expected_calibration_error(y, p, n_bins=n_bins)
    assert ece == pytest.approx(_loop_ece(y.astype(float), p, n_bins), abs=1e-12)
    bins = reliability_bins(y, p, n_bins=n_bins)
    assert len(bins["bin_edges"]) == n_bins + 1 and sum(bins["counts"]) == 500
    from_bins = sum(
        c * abs(f - m) for c, f, m in zip(bins["counts"], bins["fraction_positive"], bins["mean_predicted"]) if c
    ) / 500
    assert from_bins == pytest.approx(ece, abs=1e-12)


def test_reliability_bins_empty_bins_are_null_and_json_ready():
    bins = reliability_bins([0, 1, 1], [0.05, 0.95, 0.97], n_bins=10)
    assert bins["counts"] == [1, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins["mean_predicted"][1] is None and bins["fraction_positive"][1] is None
    assert bins["mean_predicted"][9] == pytest.approx(0.96)
    assert bins["fraction_positive"][0] == 0.0
    assert json.loads(json.dumps(bins)) == bins


def test_brier_matches_sklearn():
    rng = np.random.default_rng(0)
    p = rng.random(300)
    y = (rng.random(300) < p).astype(int)
    assert brier_score(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    assert brier_score([0, 1], [0.0, 1.0]) == 0.0


def test_top_label_ece_matches_loop_reference():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(400, 4)) * 2
    probs = apply_temperature(logits, 1.0)
    labels = rng.integers(0, 4, 400)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    assert top_label_ece(labels, probs, n_bins=15) == pytest.approx(_loop_ece(correct, conf, 15), abs=1e-12)


def _calibrated_logits(rng, n, k, scale=2.0):
    """Logits whose softmax is the true class distribution the labels are drawn from."""
    logits = rng.normal(size=(n, k)) * scale
    probs = apply_temperature(logits, 1.0)
    labels = (probs.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1)
    return logits, np.minimum(labels, k - 1)


@pytest.mark.parametrize("k", [2, 3])
def test_fit_temperature_recovers_overconfidence(k):
    rng = np.random.default_rng(10 + k)
    logits, labels = _calibrated_logits(rng, 6000, k)
    overconfident = 4.0 * logits
    t = fit_temperature(overconfident, labels)
    assert 3.4 < t < 4.7
    before, after = apply_temperature(overconfident, 1.0), apply_temperature(overconfident, t)
    assert top_label_ece(labels, after) < 0.5 * top_label_ece(labels, before)
    nll_before = negative_log_likelihood(overconfident, labels)
    nll_after = negative_log_likelihood(overconfident, labels, temperature=t)
    assert nll_after < nll_before
    assert nll_after == pytest.approx(log_loss(labels, after, labels=list(range(k))), abs=1e-9)
    # the fitted T is the minimum: nudging it either way does not lower the NLL
    for factor in (0.97, 1.03):
        assert negative_log_likelihood(overconfident, labels, temperature=t * factor) >= nll_after
    if k == 2:
        assert expected_calibration_error(labels, after[:, 1]) < expected_calibration_error(labels, before[:, 1])


def test_fit_temperature_is_about_one_when_calibrated():
    rng = np.random.default_rng(1)
    logits, labels = _calibrated_logits(rng, 6000, 3)
    assert 0.88 < fit_temperature(logits, labels) < 1.12


def test_fit_temperature_hits_bound_for_separable_data():
    logits = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    assert fit_temperature(logits, [1, 0, 1]) == pytest.approx(0.05)


def test_apply_temperature_keeps_argmax_and_normalises():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(50, 5)) * 30  # large logits: must not overflow
    for t in (0.1, 1.0, 7.5):
        probs = apply_temperature(logits, t)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
        np.testing.assert_array_equal(probs.argmax(axis=1), logits.argmax(axis=1))
    assert apply_temperature(logits, 1e6).std() < 1e-3  # very high T -> uniform


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: expected_calibration_error([0, 1], [0.2, 1.2]), DataError, "1.2"),
        (lambda: expected_calibration_error([0, 1], [0.2, 0.3], n_bins=0), ConfigError, "n_bins"),
        (lambda: brier_score([0, 2], [0.2, 0.3]), DataError, "0 and 1"),
        (lambda: brier_score([0, 1, 1], [0.2, 0.3]), DataError, "shapes"),
        (lambda: fit_temperature(np.zeros(4), [0, 1, 0, 1]), DataError, r"\(n, K\)"),
        (lambda: fit_temperature(np.zeros((2, 2)), [0, 2]), DataError, "0..1"),
        (lambda: fit_temperature(np.zeros((2, 2)), [0.5, 1]), DataError, "integer"),
        (lambda: apply_temperature(np.zeros((2, 2)), 0.0), ConfigError, "temperature"),
        (lambda: apply_temperature(np.zeros((2, 2)), float("nan")), ConfigError, "temperature"),
        (lambda: top_label_ece([0, 1], [[0.5, 0.5], [1.2, -0.2]]), DataError, "probs"),
    ],
)
def test_bad_input_raises_domain_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("seed, scale", [(0, 4.0), (1, 0.5), (2, 1.0)])
def test_fit_temperature_matches_a_dense_grid_search(seed, scale):
    rng = np.random.default_rng(seed)
    logits, labels = _calibrated_logits(rng, 800, 3)
    logits = logits * scale
    rows = np.arange(labels.shape[0])

    def nll(t):  # scipy's log-softmax as the independent reference
        return -log_softmax(logits / t, axis=1)[rows, labels].mean()

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 20001))  # steps of 0.03% in T
    coarse = grid[::50][int(np.argmin([nll(t) for t in grid[::50]]))]
    fine = grid[(grid > coarse / 1.02) & (grid < coarse * 1.02)]
    reference = fine[int(np.argmin([nll(t) for t in fine]))]
    assert fit_temperature(logits, labels) == pytest.approx(reference, rel=1e-3)
