"""The new site's operating point from its unlabelled scores: a shifted two-class mixture.

A prior shift (Saerens EM) assumes each class's images look as they did at training. At a new
site they often do not, and not alike: on the development half of the Kermany test split the
normal films' calibrated logits sit about 4.5 higher than on validation while the pneumonia
films' barely move (docs: guide/adapt.md). The model then calls
pneumonia too often and EM, reading the same inflated posteriors, over-estimates the prevalence.

This module models the new site's calibrated logits l as

    p(l) = pi * f1(l - a1) + (1 - pi) * f0(l - a0)

where f0, f1 are the validation images' class-conditional logit densities (Gaussian kernel
estimates, Silverman's bandwidth), shifted by a per-class location a0, a1, and pi is the new
prevalence: target and conditional shift with a location change per class (Zhang, Schölkopf,
Muandet & Wang 2013, "Domain adaptation under target and conditional shift", ICML; here in one
dimension, on the model's own score). a0 = a1 = 0 is the pure prior shift. The three numbers are
fitted by maximum likelihood (L-BFGS from a grid of starts); the run's threshold policy is then
applied to the fitted class-conditional distributions (:func:`operating_cut`: Youden's cut where
sensitivity + specificity is largest under the fit), and the posterior under the fit is summarised
by a logistic map alpha + beta * l (:func:`posterior_map`, soft-label logistic regression), which
becomes the model's new temperature and classifier bias. The ranking of the images is unchanged.

What it cannot see: a change of the classes' shapes (spread, skew) beyond a shift, or a shift that
depends on more than the class. :func:`goodness_of_fit` (KS of the new scores against the fitted
mixture) and the bootstrap spread of the cut are the checks; both go into the record, and
`adapt` refuses a poor fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from scipy.stats import kstest, norm

__all__ = [
    "ClassDensities", "MixtureFit", "estimate_operating_point", "fit_mixture", "goodness_of_fit", "operating_cut",
    "posterior_map", "separation_auc",
]

_GRID = 4096
MAX_APPROACH = 0.75  # the classes may come closer by at most this share of their validation distance (no label swap)
_STARTS_SHIFT = (-0.1, 0.0, 0.1)  # the positive class's shift, in validation distances
_STARTS_GAP = (-0.1, 0.1, 0.3, 0.5)  # a0 - a1, in validation distances


class ClassDensities:
    """Kernel density estimates of the validation logits of each class, tabulated for fast evaluation."""

    def __init__(self, logits: np.ndarray, is_positive: np.ndarray):
        logits, y = np.asarray(logits, dtype=np.float64), np.asarray(is_positive).astype(bool)
        if y.all() or not y.any():
            raise ValueError("ClassDensities: the validation logits must hold both classes")
        self.samples = (logits[~y], logits[y])
        self.bandwidth = tuple(max(1.06 * s.std() * len(s) ** -0.2, 1e-3) for s in self.samples)
        low = min(s.min() for s in self.samples) - 40.0
        high = max(s.max() for s in self.samples) + 40.0
        self.grid = np.linspace(low, high, _GRID)
        self.log_density = tuple(self._log_kde(self.grid, k) for k in (0, 1))
        self.distance = float(self.samples[1].mean() - self.samples[0].mean())  # between the class means on validation
        if self.distance <= 0:
            raise ValueError("ClassDensities: on validation the positive class does not score above the negative one")

    def _log_kde(self, x: np.ndarray, k: int) -> np.ndarray:
        s, h = self.samples[k], self.bandwidth[k]
        out = np.empty(len(x))
        for start in range(0, len(x), 512):
            u = (x[start : start + 512, None] - s[None, :]) / h
            top = (-0.5 * u**2).max(axis=1)
            out[start : start + 512] = top + np.log(np.exp(-0.5 * u**2 - top[:, None]).sum(axis=1))
        return out - np.log(len(s) * h * np.sqrt(2 * np.pi))

    def log_pdf(self, x: np.ndarray, k: int) -> np.ndarray:
        """log f_k(x), linear between the tabulated points (beyond the table: the edge value, far below any sample)."""
        return np.interp(x, self.grid, self.log_density[k])

    def sf(self, t: np.ndarray, k: int, shift: float) -> np.ndarray:
        """P(l >= t) for class k shifted by `shift`: the mean Gaussian tail of the kernels."""
        s, h = self.samples[k], self.bandwidth[k]
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        return norm.sf((t[:, None] - (s[None, :] + shift)) / h).mean(axis=1)


@dataclass(frozen=True)
class MixtureFit:
    """Per-class shifts of the calibrated logit, the new prevalence, and the fit's log-likelihood. ``at_bound``: the
    optimum lies on a constraint (the classes pushed together as far as allowed, or a shift at its limit)."""

    shift_negative: float
    shift_positive: float
    prior: float
    log_likelihood: float
    converged: bool
    at_bound: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"shift_negative": self.shift_negative, "shift_positive": self.shift_positive, "prevalence": self.prior,
                "log_likelihood": self.log_likelihood, "converged": self.converged, "at_bound": self.at_bound}


def _negative_log_likelihood(theta: np.ndarray, x: np.ndarray, densities: ClassDensities) -> float:
    a1, prior = theta[0], expit(theta[2])
    a0 = a1 + theta[1]
    mixed = np.logaddexp(np.log(prior) + densities.log_pdf(x - a1, 1), np.log1p(-prior) + densities.log_pdf(x - a0, 0))
    return float(-mixed.sum())


def fit_mixture(densities: ClassDensities, target_logits: np.ndarray) -> MixtureFit:
    """Maximum-likelihood shifts and prevalence for the new logits (the best of a grid of L-BFGS starts).

    Parameters: the positive class's shift a1, the gap a0 - a1 and the prevalence. Each shift stays within one
    validation distance D (between the class means) and the gap below MAX_APPROACH * D: the classes keep their order
    (without it the likelihood also has label-swapped optima)."""
    x = np.asarray(target_logits, dtype=np.float64)
    distance = densities.distance
    bounds = [(-distance, distance), (-distance, MAX_APPROACH * distance), (-9.0, 9.0)]
    best = None
    for shift in _STARTS_SHIFT:
        for gap in _STARTS_GAP:
            found = minimize(_negative_log_likelihood, np.array([shift * distance, gap * distance, 0.0]),
                             args=(x, densities), method="L-BFGS-B", bounds=bounds)
            if best is None or found.fun < best.fun:
                best = found
    assert best is not None
    a1, gap, raw = (float(v) for v in best.x)
    at_bound = any(min(abs(v - lo), abs(v - hi)) < 1e-3 * distance for v, (lo, hi) in zip((a1, gap), bounds[:2]))
    return MixtureFit(a1 + gap, a1, float(expit(raw)), float(-best.fun), bool(best.success), at_bound or abs(raw) > 8.99)


def _policy_cut(sensitivity: np.ndarray, specificity: np.ndarray, grid: np.ndarray, policy: str, prior: float) -> int:
    kind, _, value = (policy or "youden").partition(":")
    if kind == "sensitivity":
        ok = np.flatnonzero(sensitivity >= float(value))
        return int(ok[-1]) if ok.size else 0
    if kind == "specificity":
        ok = np.flatnonzero(specificity >= float(value))
        return int(ok[0]) if ok.size else len(grid) - 1
    if kind == "f1":
        tp, fp = prior * sensitivity, (1 - prior) * (1 - specificity)
        return _middle_of_best(2 * tp / np.maximum(2 * tp + fp + prior * (1 - sensitivity), 1e-12))
    j = sensitivity + specificity  # youden (and any other policy: the balanced choice)
    return _middle_of_best(j)


def _middle_of_best(values: np.ndarray) -> int:
    """The middle of the first run of grid points within 1e-6 of the maximum (a gap between separated classes)."""
    best = np.flatnonzero(values >= values.max() - 1e-6)
    run_end = best[0]
    while run_end + 1 < len(values) and values[run_end + 1] >= values.max() - 1e-6:
        run_end += 1
    return int((best[0] + run_end) // 2)


def operating_cut(fit: MixtureFit, densities: ClassDensities, target_logits: np.ndarray, policy: str) -> dict[str, float]:
    """The run's threshold policy applied to the fitted class-conditional distributions of the new site: the cut on the
    calibrated logit, and the sensitivity and specificity the fit expects there (model-based, not measured)."""
    x = np.asarray(target_logits, dtype=np.float64)
    grid = np.linspace(x.min() - 1, x.max() + 1, 2000)
    sensitivity = densities.sf(grid, 1, fit.shift_positive)
    specificity = 1 - densities.sf(grid, 0, fit.shift_negative)
    best = _policy_cut(sensitivity, specificity, grid, policy, fit.prior)
    return {"cut": float(grid[best]), "expected_sensitivity": float(sensitivity[best]),
            "expected_specificity": float(specificity[best]), "separation_auc": separation_auc(fit, densities)}


def separation_auc(fit: MixtureFit, densities: ClassDensities) -> float:
    """P(positive > negative) between the fitted class-conditional distributions (how far apart the fit put them)."""
    negatives, positives = densities.samples[0] + fit.shift_negative, densities.samples[1] + fit.shift_positive
    ordered = np.sort(negatives)
    below = np.searchsorted(ordered, positives, side="left")
    ranks = below + 0.5 * (np.searchsorted(ordered, positives, side="right") - below)
    return float(ranks.mean() / len(negatives))


def posterior_map(fit: MixtureFit, densities: ClassDensities, target_logits: np.ndarray) -> tuple[float, float]:
    """(alpha, beta): logit P(positive | l) ~ alpha + beta * l under the fit, by logistic regression of the fitted
    posteriors (soft labels) on l over the new images. beta > 0 keeps the ranking."""
    x = np.asarray(target_logits, dtype=np.float64)
    log_pos = np.log(fit.prior) + densities.log_pdf(x - fit.shift_positive, 1)
    log_neg = np.log1p(-fit.prior) + densities.log_pdf(x - fit.shift_negative, 0)
    soft = expit(log_pos - log_neg)

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        eta = theta[0] + theta[1] * x
        p = expit(eta)
        value = float(np.sum(np.logaddexp(0, eta) - soft * eta))
        return value, np.array([np.sum(p - soft), np.sum((p - soft) * x)])

    found = minimize(loss, np.array([0.0, 1.0]), jac=True, method="L-BFGS-B", bounds=[(-50, 50), (1e-3, 50)])
    return float(found.x[0]), float(found.x[1])


def goodness_of_fit(fit: MixtureFit, densities: ClassDensities, target_logits: np.ndarray) -> dict[str, float]:
    """KS distance of the new logits from the fitted mixture, and its p-value (optimistic: the fit saw the data)."""
    def cdf(t: np.ndarray) -> np.ndarray:
        return fit.prior * (1 - densities.sf(t, 1, fit.shift_positive)) + (1 - fit.prior) * (
            1 - densities.sf(t, 0, fit.shift_negative))

    result = kstest(np.asarray(target_logits, dtype=np.float64), cdf)
    return {"ks_distance": float(result.statistic), "p_value": float(result.pvalue)}


def _clusters(groups: list[str]) -> list[np.ndarray]:
    ids = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)[1]
    order = np.argsort(ids, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(ids[order])) + 1)


def estimate_operating_point(
    val_logits: np.ndarray, val_is_positive: np.ndarray, target_logits: np.ndarray, *, policy: str,
    target_groups: list[str] | None = None, bootstrap: int = 200, seed: int = 0,
) -> dict[str, Any]:
    """Everything `adapt --method mixture` needs, from calibrated logits: the fit, the policy's cut on the new site
    (with a patient-bootstrap CI of the cut and the prevalence), the posterior map (alpha, beta), the goodness of fit,
    and ``uncertain_share``: the share of the new images whose decision changes across the cut's 95% CI."""
    densities = ClassDensities(val_logits, val_is_positive)
    x = np.asarray(target_logits, dtype=np.float64)
    fit = fit_mixture(densities, x)
    cut = operating_cut(fit, densities, x, policy)
    alpha, beta = posterior_map(fit, densities, x)
    result: dict[str, Any] = {"fit": fit.to_dict(), **cut, "alpha": alpha, "beta": beta,
                              "goodness_of_fit": goodness_of_fit(fit, densities, x), "policy": policy or "youden",
                              "validation_distance": densities.distance}
    if bootstrap:
        rng = np.random.default_rng(seed)
        clusters = _clusters(target_groups) if target_groups is not None else [np.array([i]) for i in range(len(x))]
        cuts, priors = [], []
        for _ in range(bootstrap):
            rows = np.concatenate([clusters[g] for g in rng.integers(0, len(clusters), size=len(clusters))])
            refit = fit_mixture(densities, x[rows])
            cuts.append(operating_cut(refit, densities, x[rows], policy)["cut"])
            priors.append(refit.prior)
        low, high = (float(v) for v in np.quantile(cuts, [0.025, 0.975]))
        result.update(cut_ci=[low, high], prevalence_ci=[float(v) for v in np.quantile(priors, [0.025, 0.975])],
                      uncertain_share=float(np.mean((x >= low) & (x < high))), bootstrap=bootstrap)
    return result
