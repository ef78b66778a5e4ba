"""The shifted two-class mixture: per-class shifts and the prevalence recovered from unlabelled scores, the cut."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtransfer.adapt.mixture import (
    ClassDensities, estimate_operating_point, fit_mixture, goodness_of_fit, operating_cut, posterior_map,
)
from medtransfer.adapt.operating import fold_logit_map
from medtransfer.evaluation.calibration import apply_temperature, expected_calibration_error
from tests.adapt.conftest import tiny_two_class_model


def validation(n: int = 800, prior: float = 0.74, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prior).astype(int)
    return rng.normal(np.where(y == 1, 6.0, -4.0), np.where(y == 1, 2.5, 2.0)), y


def site(shift_negative: float, shift_positive: float, prior: float, n: int = 600, seed: int = 1, spread: float = 1.0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prior).astype(int)
    centre = np.where(y == 1, 6.0 + shift_positive, -4.0 + shift_negative)
    return rng.normal(centre, np.where(y == 1, 2.5, 2.0 * spread)), y


@pytest.mark.parametrize("a0,a1,prior", [(3.0, -0.5, 0.6), (0.0, 0.0, 0.3), (-1.0, 1.0, 0.8)])
def test_the_fit_recovers_per_class_shifts_and_the_prevalence(a0, a1, prior):
    densities = ClassDensities(*validation())
    x, _ = site(a0, a1, prior)
    fit = fit_mixture(densities, x)
    assert fit.converged and not fit.at_bound
    assert fit.shift_negative == pytest.approx(a0, abs=0.6) and fit.shift_positive == pytest.approx(a1, abs=0.6)
    assert fit.prior == pytest.approx(prior, abs=0.06)


def test_the_youden_cut_on_the_fit_is_close_to_the_one_labels_would_give():
    densities = ClassDensities(*validation())
    x, y = site(3.0, -0.5, 0.6)
    cut = operating_cut(fit_mixture(densities, x), densities, x, "youden")
    grid = np.sort(x)
    j = [(x[y == 1] >= t).mean() - (x[y == 0] >= t).mean() for t in grid]
    called = x >= cut["cut"]
    assert called[y == 1].mean() + (~called[y == 0]).mean() - 1 >= max(j) - 0.03
    assert cut["expected_specificity"] == pytest.approx((~called[y == 0]).mean(), abs=0.05)
    assert cut["separation_auc"] > 0.95


@pytest.mark.parametrize("policy", ["sensitivity:0.95", "specificity:0.9"])
def test_a_sensitivity_or_specificity_policy_keeps_its_target_on_the_fit(policy):
    densities = ClassDensities(*validation())
    x, y = site(2.0, 0.0, 0.5)
    cut = operating_cut(fit_mixture(densities, x), densities, x, policy)
    kind, value = policy.split(":")
    key = f"expected_{kind}"
    assert cut[key] >= float(value) - 1e-9
    measured = (x[y == 1] >= cut["cut"]).mean() if kind == "sensitivity" else (x[y == 0] < cut["cut"]).mean()
    assert measured == pytest.approx(float(value), abs=0.04)


def test_the_posterior_map_is_calibrated_on_the_new_site_and_keeps_the_order():
    densities = ClassDensities(*validation())
    x, y = site(3.0, -0.5, 0.6, n=3000)
    alpha, beta = posterior_map(fit_mixture(densities, x), densities, x)
    mapped, source = 1 / (1 + np.exp(-(alpha + beta * x))), 1 / (1 + np.exp(-x))
    assert beta > 0
    assert expected_calibration_error(y, mapped) < 0.03 < 0.5 * expected_calibration_error(y, source)


def test_a_wider_class_is_fitted_by_its_scale_and_its_cut_follows():
    densities = ClassDensities(*validation())
    x, y = site(1.0, 0.0, 0.6, spread=2.0, seed=2)  # the negatives spread twice as wide as on validation
    fit = fit_mixture(densities, x)
    assert fit.scale_negative == pytest.approx(2.0, abs=0.3) and fit.scale_positive == pytest.approx(1.0, abs=0.2)
    assert goodness_of_fit(fit, densities, x)["p_value"] > 0.05
    cut = operating_cut(fit, densities, x, "youden")
    called = x >= cut["cut"]
    best = max((x[y == 1] >= t).mean() - (x[y == 0] >= t).mean() for t in np.sort(x))  # what labels would give
    assert called[y == 1].mean() + (~called[y == 0]).mean() - 1 >= best - 0.03
    assert cut["expected_specificity"] == pytest.approx((~called[y == 0]).mean(), abs=0.05)


def test_the_scales_stay_at_one_unless_the_likelihood_ratio_calls_for_them():
    densities = ClassDensities(*validation())
    x, _ = site(-1.0, 1.0, 0.8)
    fit = fit_mixture(densities, x)
    assert (fit.scale_negative, fit.scale_positive) == (1.0, 1.0)


def test_a_change_of_shape_beyond_location_and_scale_is_rejected_by_the_goodness_of_fit():
    densities = ClassDensities(*validation())
    same, _ = site(1.0, 0.0, 0.6)
    rng = np.random.default_rng(3)  # the negatives split into two modes 10 apart: no stretch of one mode makes them
    two_modes = np.concatenate([same, rng.normal(-12.0, 0.5, 300), rng.normal(-2.0, 0.5, 300)])
    assert goodness_of_fit(fit_mixture(densities, same), densities, same)["p_value"] > 0.05
    assert goodness_of_fit(fit_mixture(densities, two_modes), densities, two_modes)["p_value"] < 0.01


def test_the_bootstrap_reports_the_cut_and_prevalence_intervals():
    x, _ = site(3.0, -0.5, 0.6, n=300)
    result = estimate_operating_point(*validation(), x, policy="youden", bootstrap=40, seed=0)
    low, high = result["cut_ci"]
    assert low <= result["cut"] <= high and 0 <= result["uncertain_share"] < 0.2
    assert result["prevalence_ci"][0] <= result["fit"]["prevalence"] <= result["prevalence_ci"][1]


def test_folding_the_posterior_map_into_the_model():
    model = tiny_two_class_model()
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        before = model(images).double().numpy()
        temperature, _ = fold_logit_map(model, 1.5, alpha=-0.7, beta=0.6, positive_index=1)
        after = model(images).double().numpy()
    calibrated = (before[:, 1] - before[:, 0]) / 1.5
    expected = 1 / (1 + np.exp(-(-0.7 + 0.6 * calibrated)))
    np.testing.assert_allclose(apply_temperature(after, temperature)[:, 1], expected, atol=1e-5)
    assert temperature == pytest.approx(2.5)
