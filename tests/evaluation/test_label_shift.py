"""Prior shift without labels: EM (Saerens et al. 2002) and BBSE (Lipton et al. 2018) against a known synthetic shift."""

from __future__ import annotations

import numpy as np
import pytest

from medtransfer.errors import DataError
from medtransfer.evaluation.label_shift import (
    adjust_posteriors, bbse_prior, em_prior, logit_offset, prior_interval,
)


def gaussian_site(prior: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and a score x with x | y ~ N(+-1, 1): p(x | y) fixed, only the prior moves."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prior).astype(int)
    return y, rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)


def posteriors(x: np.ndarray, prior: float) -> np.ndarray:
    """The exact Bayes posteriors [p(0|x), p(1|x)] under `prior`."""
    p1 = 1 / (1 + np.exp(-(2 * x + np.log(prior / (1 - prior)))))
    return np.column_stack([1 - p1, p1])


def test_em_recovers_a_prior_of_0_3_from_posteriors_calibrated_under_0_6():
    _, x = gaussian_site(0.3, 4000, seed=0)
    estimate = em_prior(posteriors(x, 0.6), [0.4, 0.6])
    assert estimate.converged
    assert estimate.prior[1] == pytest.approx(0.3, abs=0.03)


@pytest.mark.parametrize("target", [0.1, 0.5, 0.6, 0.9])
def test_em_tracks_the_prior_across_the_range(target):
    _, x = gaussian_site(target, 4000, seed=1)
    assert em_prior(posteriors(x, 0.6), [0.4, 0.6]).prior[1] == pytest.approx(target, abs=0.04)


def test_bbse_recovers_the_prior_from_hard_decisions_and_the_validation_confusion_matrix():
    val_y, val_x = gaussian_site(0.6, 4000, seed=2)
    _, target_x = gaussian_site(0.3, 4000, seed=3)
    estimate = bbse_prior((val_x > 0).astype(int), val_y, (target_x > 0).astype(int), 2)
    assert estimate.prior[1] == pytest.approx(0.3, abs=0.04)
    assert estimate.condition is not None and estimate.condition < 10


def test_bbse_refuses_a_singular_confusion_matrix():
    with pytest.raises(DataError, match="singular"):
        bbse_prior([1, 1, 1, 1], [0, 1, 0, 1], [1, 0], 2)


def test_adjusted_posteriors_are_the_bayes_posteriors_under_the_new_prior():
    _, x = gaussian_site(0.3, 50, seed=4)
    adjusted = adjust_posteriors(posteriors(x, 0.6), [0.4, 0.6], [0.7, 0.3])
    np.testing.assert_allclose(adjusted, posteriors(x, 0.3), atol=1e-12)


def test_the_binary_adjustment_is_a_constant_on_the_logit():
    _, x = gaussian_site(0.3, 20, seed=5)
    before, after = posteriors(x, 0.6)[:, 1], adjust_posteriors(posteriors(x, 0.6), [0.4, 0.6], [0.7, 0.3])[:, 1]
    shift = np.log(after / (1 - after)) - np.log(before / (1 - before))
    np.testing.assert_allclose(shift, logit_offset(0.6, 0.3), atol=1e-9)
    assert np.array_equal(np.argsort(before), np.argsort(after))  # the ranking, hence the AUC, is unchanged


def test_the_bootstrap_interval_covers_the_true_prior_and_skips_failing_resamples():
    _, x = gaussian_site(0.3, 600, seed=6)
    p = posteriors(x, 0.6)
    calls = []

    def estimate(target_rows, val_rows):
        calls.append(1)
        if len(calls) % 10 == 0:
            raise DataError("a class is missing")
        return em_prior(p[target_rows], [0.4, 0.6]).prior[1]

    result = prior_interval(estimate, len(x), 100, n_resamples=200, seed=0)
    low, high = result["ci"]
    assert low < 0.3 < high and high - low < 0.15
    assert result["n_failed"] == 20


def test_the_bootstrap_resamples_whole_patients():
    groups = ["a"] * 50 + ["b"] * 50
    drawn = []
    prior_interval(lambda t, v: drawn.append(np.bincount(np.asarray(t) // 50, minlength=2)) or 0.5, 100, 4,
                   target_groups=groups, n_resamples=30, seed=0)
    counts = np.array(drawn)
    assert set(counts.ravel()) <= {0, 50, 100} and (counts.sum(axis=1) == 100).all()
    assert {tuple(c) for c in counts} == {(100, 0), (50, 50), (0, 100)}  # a patient is drawn with all its images
