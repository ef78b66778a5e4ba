"""The new site's operating point from its unlabelled scores: a shifted two-class mixture.

A prior shift (Saerens EM) assumes each class's images look as they did at training. At a new
site they often do not, and not alike: on the development half of the Kermany test split the
normal films' calibrated logits sit about 4.5 higher than on validation while the pneumonia
films' barely move (docs: guide/adapt.md). The model then calls
pneumonia too often and EM, reading the same inflated posteriors, over-estimates the prevalence.

This module models the new site's calibrated logits l as

    p(l) = pi * f1((l - a1 - m1) / s1 + m1) / s1 + (1 - pi) * f0((l - a0 - m0) / s0 + m0) / s0

where f0, f1 are the validation images' class-conditional logit densities (Gaussian kernel
estimates, Silverman's bandwidth) with class means m0, m1, each moved by its own location a_k and
stretched about its mean by its own scale s_k, and pi is the new prevalence: target and conditional
shift with a location-scale change per class (Zhang, Schölkopf, Muandet & Wang 2013, "Domain
adaptation under target and conditional shift", ICML; here in one dimension, on the model's own
score). a = 0, s = 1 is the pure prior shift. The scale matters: on the development half of the
Kermany test split the normal films' logits spread almost twice as wide as on validation, and a
shift-only fit puts the cut inside their upper tail (specificity 0.795 against 0.863 with scales).
The five numbers are fitted by maximum likelihood (L-BFGS from a grid of starts); the run's threshold policy is then
applied to the fitted class-conditional distributions (:func:`operating_cut`: Youden's cut where
sensitivity + specificity is largest under the fit), and the posterior under the fit is summarised
by a logistic map alpha + beta * l (:func:`posterior_map`, soft-label logistic regression), which
becomes the model's new temperature and classifier bias. The ranking of the images is unchanged.

What it cannot see: a change of the classes' shapes (skew, a second mode) beyond location and spread, or a shift that
depends on more than the class. :func:`goodness_of_fit` (KS of the new scores against the fitted
mixture) and the bootstrap spread of the cut are the checks; both go into the record, and
`adapt` refuses a poor fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, ndtr
from scipy.stats import chi2, kstest

__all__ = [
    "ClassDensities", "MixtureFit", "estimate_operating_point", "fit_mixture", "goodness_of_fit", "operating_cut",
    "posterior_map", "separation_auc",
]

_GRID = 4096
MAX_APPROACH = 0.75  # the classes may come closer by at most this share of their validation distance (no label swap)
MAX_LOG_SCALE = 1.5  # each class may narrow or widen by at most e^1.5 (4.5x)
_STARTS_SHIFT = (-0.1, 0.0, 0.1)  # the positive class's shift, in validation distances
_STARTS_GAP = (-0.1, 0.1, 0.3, 0.5)  # a0 - a1, in validation distances
_STARTS_LOG_SCALE = (0.0, 0.5)  # the negative class's log scale
SCALE_TEST_LEVEL = 0.01  # the scales are fitted when the likelihood ratio over shifts alone is this unlikely


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
        self.means = tuple(float(s.mean()) for s in self.samples)
        self.distance = self.means[1] - self.means[0]  # between the class means on validation
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

    def log_pdf(self, x: np.ndarray, k: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
        """log density of class k moved by `shift` and stretched by `scale` about its mean, at x (linear between the
        tabulated points; beyond the table: the edge value, far below any sample)."""
        m = self.means[k]
        return np.interp((np.asarray(x) - shift - m) / scale + m, self.grid, self.log_density[k]) - np.log(scale)

    def moved(self, k: int, shift: float, scale: float) -> np.ndarray:
        """Class k's validation logits moved and stretched as the fit says."""
        m = self.means[k]
        return (self.samples[k] - m) * scale + m + shift

    def sf(self, t: np.ndarray, k: int, shift: float, scale: float = 1.0) -> np.ndarray:
        """P(l >= t) for class k moved and stretched: the mean Gaussian tail of the (stretched) kernels."""
        s, h = self.moved(k, shift, scale), self.bandwidth[k] * scale
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        return ndtr((s[None, :] - t[:, None]) / h).mean(axis=1)  # the normal survival function, without scipy.stats' overhead


@dataclass(frozen=True)
class MixtureFit:
    """Per-class shifts and scales of the calibrated logit, the new prevalence, and the fit's log-likelihood.
    ``at_bound``: the optimum lies on a constraint (the classes pushed together as far as allowed, or a shift or
    scale at its limit)."""

    shift_negative: float
    shift_positive: float
    prior: float
    log_likelihood: float
    converged: bool
    at_bound: bool = False
    scale_negative: float = 1.0
    scale_positive: float = 1.0

    def log_joint(self, densities: ClassDensities, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """log pi f1(x) and log (1 - pi) f0(x) under the fit."""
        return (np.log(self.prior) + densities.log_pdf(x, 1, self.shift_positive, self.scale_positive),
                np.log1p(-self.prior) + densities.log_pdf(x, 0, self.shift_negative, self.scale_negative))

    def to_dict(self) -> dict[str, Any]:
        return {"shift_negative": self.shift_negative, "shift_positive": self.shift_positive,
                "scale_negative": self.scale_negative, "scale_positive": self.scale_positive, "prevalence": self.prior,
                "log_likelihood": self.log_likelihood, "converged": self.converged, "at_bound": self.at_bound}


def _fit_of(theta: np.ndarray, log_likelihood: float = 0.0, converged: bool = True, at_bound: bool = False) -> MixtureFit:
    a1, gap, raw, log_s0, log_s1 = (float(v) for v in theta)
    return MixtureFit(a1 + gap, a1, float(expit(raw)), log_likelihood, converged, at_bound, float(np.exp(log_s0)),
                      float(np.exp(log_s1)))


def _theta_of(fit: MixtureFit) -> np.ndarray:
    """The optimiser's parameters of a fit (the inverse of _fit_of)."""
    return np.array([fit.shift_positive, fit.shift_negative - fit.shift_positive, np.log(fit.prior / (1 - fit.prior)),
                     np.log(fit.scale_negative), np.log(fit.scale_positive)])


def _negative_log_likelihood(theta: np.ndarray, x: np.ndarray, densities: ClassDensities) -> float:
    return float(-np.logaddexp(*_fit_of(theta).log_joint(densities, x)).sum())


def _best_fit(x: np.ndarray, densities: ClassDensities, starts: list[np.ndarray], bounds: list[tuple[float, float]]):
    best = None
    for start in starts:
        found = minimize(_negative_log_likelihood, start, args=(x, densities), method="L-BFGS-B", bounds=bounds)
        if best is None or found.fun < best.fun:
            best = found
    assert best is not None
    return best


def fit_mixture(densities: ClassDensities, target_logits: np.ndarray, *, near: MixtureFit | None = None) -> MixtureFit:
    """Maximum-likelihood shifts, scales and prevalence for the new logits (the best of a grid of L-BFGS starts).

    Parameters: the positive class's shift a1, the gap a0 - a1, the prevalence and each class's log scale. Each shift
    stays within one validation distance D (between the class means), the gap below MAX_APPROACH * D (the classes
    keep their order: without it the likelihood also has label-swapped optima), each scale within e^+-MAX_LOG_SCALE.
    The scales are fitted only when the new logits call for them: first shifts alone (scales 1), then shifts and
    scales, kept when the likelihood ratio passes SCALE_TEST_LEVEL (chi-squared, 2 degrees of freedom); with
    overlapping classes, shift, scale and prevalence trade off and the smaller model is the safer one.

    ``near``: a bootstrap refit, one L-BFGS run from the full sample's fit, in its model (scaled or not)."""
    x = np.asarray(target_logits, dtype=np.float64)
    distance = densities.distance
    scales = (-MAX_LOG_SCALE, MAX_LOG_SCALE)
    bounds = [(-distance, distance), (-distance, MAX_APPROACH * distance), (-9.0, 9.0), scales, scales]
    fixed = [(v, v) for v in (0.0, 0.0)]
    if near is not None:
        theta = _theta_of(near)
        used = bounds if (near.scale_negative, near.scale_positive) != (1.0, 1.0) else bounds[:3] + fixed
        found = _best_fit(x, densities, [np.clip(theta, [b[0] for b in used], [b[1] for b in used])], used)
        return _fit_of(found.x, float(-found.fun), bool(found.success))
    grid = [np.array([shift * distance, gap * distance, 0.0, 0.0, 0.0]) for shift in _STARTS_SHIFT for gap in _STARTS_GAP]
    shifted = _best_fit(x, densities, grid, bounds[:3] + fixed)
    starts = [shifted.x] + [g + np.array([0, 0, 0, log_scale, 0]) for g in grid for log_scale in _STARTS_LOG_SCALE[1:]]
    scaled = _best_fit(x, densities, starts, bounds)
    ratio = 2 * (shifted.fun - scaled.fun)
    best, used = (scaled, bounds) if ratio > chi2.ppf(1 - SCALE_TEST_LEVEL, 2) else (shifted, bounds[:3] + fixed)
    limits = [1e-3 * distance] * 2 + [0.01, 1e-3, 1e-3]
    at_bound = any(hi > lo and min(abs(v - lo), abs(v - hi)) < tol for v, (lo, hi), tol in zip(best.x, used, limits))
    return _fit_of(best.x, float(-best.fun), bool(best.success), at_bound)


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
    sensitivity = densities.sf(grid, 1, fit.shift_positive, fit.scale_positive)
    specificity = 1 - densities.sf(grid, 0, fit.shift_negative, fit.scale_negative)
    best = _policy_cut(sensitivity, specificity, grid, policy, fit.prior)
    return {"cut": float(grid[best]), "expected_sensitivity": float(sensitivity[best]),
            "expected_specificity": float(specificity[best]), "separation_auc": separation_auc(fit, densities)}


def separation_auc(fit: MixtureFit, densities: ClassDensities) -> float:
    """P(positive > negative) between the fitted class-conditional distributions (how far apart the fit put them)."""
    negatives = densities.moved(0, fit.shift_negative, fit.scale_negative)
    positives = densities.moved(1, fit.shift_positive, fit.scale_positive)
    ordered = np.sort(negatives)
    below = np.searchsorted(ordered, positives, side="left")
    ranks = below + 0.5 * (np.searchsorted(ordered, positives, side="right") - below)
    return float(ranks.mean() / len(negatives))


def posterior_map(fit: MixtureFit, densities: ClassDensities, target_logits: np.ndarray) -> tuple[float, float]:
    """(alpha, beta): logit P(positive | l) ~ alpha + beta * l under the fit, by logistic regression of the fitted
    posteriors (soft labels) on l over the new images. beta > 0 keeps the ranking."""
    x = np.asarray(target_logits, dtype=np.float64)
    log_pos, log_neg = fit.log_joint(densities, x)
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
        return fit.prior * (1 - densities.sf(t, 1, fit.shift_positive, fit.scale_positive)) + (1 - fit.prior) * (
            1 - densities.sf(t, 0, fit.shift_negative, fit.scale_negative))

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
            refit = fit_mixture(densities, x[rows], near=fit)
            cuts.append(operating_cut(refit, densities, x[rows], policy)["cut"])
            priors.append(refit.prior)
        low, high = (float(v) for v in np.quantile(cuts, [0.025, 0.975]))
        result.update(cut_ci=[low, high], prevalence_ci=[float(v) for v in np.quantile(priors, [0.025, 0.975])],
                      uncertain_share=float(np.mean((x >= low) & (x < high))), bootstrap=bootstrap)
    return result
