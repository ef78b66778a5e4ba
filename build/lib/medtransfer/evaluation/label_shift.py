"""Label (prior) shift without target labels: estimate the new site's class prior, adjust posteriors.

Under a pure label shift the class-conditional image distributions p(x | y) are those of the
training site and only the class prior moves, pi_s -> pi_t. A classifier whose posteriors are
calibrated on the source (the run's validation temperature) then needs no retraining:

- :func:`em_prior`: Saerens, Latinne & Decaestecker 2002 (Neural Computation 14:21-41). EM on
  the target posteriors: adjust them to the current prior estimate, p' ~ p * pi_t / pi_s, take
  their mean as the new estimate, repeat. Maximum likelihood when the source posteriors are
  calibrated (Alexandari, Kundaje & Shrikumar 2020: with bias-corrected calibration it is hard
  to beat), biased when they are not.
- :func:`bbse_prior`: black-box shift estimation, Lipton, Wang & Smola 2018. The validation
  confusion matrix C[i, j] = P(yhat = i, y = j) and the target's predicted-class shares q solve
  C w = q for the weights w_j = pi_t,j / pi_s,j. Needs only hard decisions and an invertible C;
  consistent even when the posteriors are miscalibrated, noisier than EM.
- :func:`adjust_posteriors`: p'_k ~ p_k * pi_t,k / pi_s,k (Bayes' rule with the new prior);
  for two classes a constant added to the logit, :func:`logit_offset`, so the ranking, hence
  the AUC, is unchanged.
- :func:`prior_interval`: a (patient) cluster bootstrap of either estimator over the target
  images and the validation images together.

Both estimators assume what their name says: a pure prior shift. When the images themselves
look different (another scanner, another population) the target posteriors are wrong in a way
no prior explains; :mod:`medtransfer.evaluation.shift_tests` tests for that.

    >>> import numpy as np
    >>> p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    >>> em_prior(p, np.array([0.5, 0.5])).prior.round(3).tolist()  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from medtransfer.errors import DataError

__all__ = [
    "PriorEstimate", "adjust_posteriors", "bbse_prior", "em_prior", "logit_offset", "prior_interval",
]

_FLOOR = 1e-6  # priors and posteriors are kept at least this far from 0 and 1


@dataclass(frozen=True)
class PriorEstimate:
    """An estimated target prior (one share per class, summing to 1) and how it was reached."""

    prior: np.ndarray
    iterations: int = 0
    converged: bool = True
    condition: float | None = None  # BBSE: condition number of the confusion matrix


def _posteriors(posteriors: Any) -> np.ndarray:
    p = np.asarray(posteriors, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2 or p.shape[0] == 0:
        raise DataError(f"posteriors must be a non-empty (n, classes) array; got shape {p.shape}")
    if not np.all(np.isfinite(p)) or p.min() < 0:
        raise DataError("posteriors must be finite and non-negative")
    return p / p.sum(axis=1, keepdims=True)


def _prior(prior: Any, k: int, name: str) -> np.ndarray:
    pi = np.asarray(prior, dtype=np.float64).ravel()
    if pi.shape != (k,) or not np.all(np.isfinite(pi)) or pi.min() <= 0:
        raise DataError(f"{name} must hold {k} positive shares; got {np.asarray(prior).tolist()}")
    return pi / pi.sum()


def adjust_posteriors(posteriors: Any, source_prior: Any, target_prior: Any) -> np.ndarray:
    """p'_k = p_k * w_k / sum_j p_j * w_j with w = target_prior / source_prior (Saerens et al. 2002, eq. 2.4)."""
    p = _posteriors(posteriors)
    w = _prior(target_prior, p.shape[1], "target_prior") / _prior(source_prior, p.shape[1], "source_prior")
    adjusted = p * w
    return adjusted / adjusted.sum(axis=1, keepdims=True)


def logit_offset(source_prior: float, target_prior: float) -> float:
    """Two classes: what the prior change adds to the positive class's logit, log-odds(pi_t) - log-odds(pi_s)."""
    s = float(np.clip(source_prior, _FLOOR, 1 - _FLOOR))
    t = float(np.clip(target_prior, _FLOOR, 1 - _FLOOR))
    return float(np.log(t / (1 - t)) - np.log(s / (1 - s)))


def em_prior(posteriors: Any, source_prior: Any, *, max_iter: int = 1000, tol: float = 1e-8) -> PriorEstimate:
    """Saerens et al.'s EM: the target prior that makes the adjusted posteriors' mean equal the prior itself.

    `posteriors`: (n, K) calibrated source posteriors of the target images; `source_prior`: the
    class shares those posteriors were calibrated under (the validation split's)."""
    p = _posteriors(posteriors)
    source = _prior(source_prior, p.shape[1], "source_prior")
    current = source.copy()
    for iteration in range(1, max_iter + 1):
        adjusted = p * (current / source)
        adjusted /= adjusted.sum(axis=1, keepdims=True)
        new = np.clip(adjusted.mean(axis=0), _FLOOR, None)
        new /= new.sum()
        if np.abs(new - current).max() < tol:
            return PriorEstimate(new, iteration, True)
        current = new
    return PriorEstimate(current, max_iter, False)


def bbse_prior(val_predicted: Any, val_labels: Any, target_predicted: Any, k: int) -> PriorEstimate:
    """Lipton et al.'s black-box shift estimate from hard decisions (class indices 0..k-1).

    Solves C w = q (C: validation joint of decision and label, q: target decision shares); the
    weights are clipped at 0 and the prior pi_t = w * pi_s renormalised. DataError when C is
    singular (a decision the model never makes on validation)."""
    yhat, y, t = (np.asarray(a, dtype=np.int64).ravel() for a in (val_predicted, val_labels, target_predicted))
    if yhat.shape != y.shape or yhat.size == 0 or t.size == 0:
        raise DataError(f"bbse_prior: {yhat.size} validation decisions, {y.size} labels, {t.size} target decisions")
    joint = np.zeros((k, k))
    np.add.at(joint, (yhat, y), 1.0)
    joint /= yhat.size
    source = joint.sum(axis=0)
    q = np.bincount(t, minlength=k) / t.size
    condition = float(np.linalg.cond(joint))
    if not np.isfinite(condition) or condition > 1e8 or np.any(source == 0):
        raise DataError("bbse_prior: the validation confusion matrix is singular (a class or a decision is missing "
                        "on validation); use the EM estimate")
    w = np.clip(np.linalg.solve(joint, q), 0.0, None)
    prior = np.clip(w * source, _FLOOR, None)
    return PriorEstimate(prior / prior.sum(), 0, True, condition)


def _clusters(groups: Any, n: int) -> list[np.ndarray]:
    """The image indices of each cluster (patient); one image per cluster when `groups` is None."""
    if groups is None:
        return [np.array([i]) for i in range(n)]
    ids = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)[1]
    order = np.argsort(ids, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(ids[order])) + 1)


def _draw(clusters: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Indices of one cluster bootstrap resample (every image of each drawn cluster)."""
    return np.concatenate([clusters[g] for g in rng.integers(0, len(clusters), size=len(clusters))])


def prior_interval(
    estimate: Callable[[np.ndarray, np.ndarray], float], n_target: int, n_val: int, *, target_groups: Any = None,
    val_groups: Any = None, n_resamples: int = 500, confidence: float = 0.95, seed: int = 0,
) -> dict[str, Any]:
    """Percentile interval of `estimate(target_index, val_index)` (a positive-class prior) over cluster
    bootstrap resamples of the target images and the validation images, drawn independently.
    A resample where the estimator fails (DataError: e.g. a class missing) is skipped and counted."""
    rng = np.random.default_rng(seed)
    target_clusters, val_clusters = _clusters(target_groups, n_target), _clusters(val_groups, n_val)
    values, failed = [], 0
    for _ in range(n_resamples):
        target, val = _draw(target_clusters, rng), _draw(val_clusters, rng)
        try:
            values.append(float(estimate(target, val)))
        except DataError:
            failed += 1
    if len(values) < max(10, n_resamples // 2):
        raise DataError(f"prior_interval: only {len(values)} of {n_resamples} resamples gave an estimate")
    alpha = 1.0 - confidence
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return {"ci": [float(low), float(high)], "se": float(np.std(values, ddof=1)), "n_resamples": n_resamples,
            "n_failed": failed, "confidence": confidence}
