"""The shift summary: logistic recalibration fits and KS distance against independent references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.stats import ks_2samp
from sklearn.linear_model import LogisticRegression

from medtransfer.evaluation.shift import calibration_fit, fit_logistic, logit, shift_lines, shift_summary


def simulated(n: int, *, slope: float, intercept: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Predictions p and labels drawn from logit P(y) = intercept + slope * logit(p)."""
    rng = np.random.default_rng(seed)
    p = 1 / (1 + np.exp(-rng.normal(0, 2, n)))
    truth = 1 / (1 + np.exp(-(intercept + slope * logit(p))))
    return (rng.random(n) < truth).astype(int), p


def test_slope_and_intercept_match_sklearn_unpenalised_logistic_regression():
    y, p = simulated(3000, slope=0.6, intercept=-0.4)
    reference = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(logit(p)[:, None], y)
    fit = calibration_fit(y, p)
    assert fit["calibration_slope"] == pytest.approx(reference.coef_[0, 0], abs=1e-5)
    assert fit["calibration_intercept"] == pytest.approx(reference.intercept_[0], abs=1e-5)
    assert 0.5 < fit["calibration_slope"] < 0.7  # the simulated slope is recovered


def test_calibration_in_the_large_is_the_intercept_with_the_logit_as_offset():
    y, p = simulated(2000, slope=1.0, intercept=-0.8, seed=1)
    z = logit(p)
    nll = lambda a: np.sum(np.logaddexp(0, a[0] + z) - y * (a[0] + z))  # noqa: E731
    reference = minimize(nll, x0=[0.0], method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-10}).x[0]
    fit = calibration_fit(y, p)
    assert fit["calibration_in_the_large"] == pytest.approx(reference, abs=1e-4)
    assert fit["calibration_in_the_large"] < -0.5  # predictions overestimate the risk here


def test_well_calibrated_predictions_give_slope_one_and_zero_offset():
    y, p = simulated(20000, slope=1.0, intercept=0.0, seed=2)
    fit = calibration_fit(y, p)
    assert fit["calibration_slope"] == pytest.approx(1.0, abs=0.06)
    assert fit["calibration_in_the_large"] == pytest.approx(0.0, abs=0.06)


def test_separable_data_stays_finite():
    beta = fit_logistic(np.column_stack([np.ones(6), [-3, -2, -1, 1, 2, 3]]), np.array([0, 0, 0, 1, 1, 1]))
    assert np.all(np.isfinite(beta)) and beta[1] > 0


def test_shift_summary_states_prevalence_and_ks_distance_against_the_reference():
    y, p = simulated(500, slope=1.0, intercept=0.0, seed=3)
    ref_y, ref_p = simulated(400, slope=1.0, intercept=0.0, seed=4)
    ref_p = ref_p**0.5  # shifted scores
    summary = shift_summary(y, p, reference_y=ref_y, reference_prob=ref_p, reference="test split of RUN")
    expected = ks_2samp(p, ref_p)
    assert summary["prevalence"] == pytest.approx(y.mean())
    assert summary["reference"]["prevalence"] == pytest.approx(ref_y.mean())
    assert summary["reference"]["ks_distance"] == pytest.approx(expected.statistic)
    assert summary["reference"]["ks_pvalue"] == pytest.approx(expected.pvalue)
    lines = shift_lines(summary)
    assert "prevalence" in lines[0] and "KS distance" in lines[1]


def test_one_class_or_no_reference_is_stated_not_guessed():
    summary = shift_summary([1, 1, 1], [0.9, 0.8, 0.7], reference_y=None, reference_prob=None, reference="")
    assert summary["calibration_slope"] is None and summary["reference"] is None
    assert "no predictions" in shift_lines(summary)[1]
