"""Calibration: ECE, Brier score, reliability bins and temperature scaling.

Numpy, plus scipy's bounded scalar minimiser for the temperature. Bins are equal-width
on [0, 1]: bin i holds ``edges[i] <= p < edges[i+1]``, the last bin also holds
``p == 1``. Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural
Networks", ICML) divides the logits by one scalar T > 0 fitted on validation data by
minimising the negative log-likelihood; it changes confidence but never the argmax.

Example
-------
>>> import numpy as np
>>> logits = np.array([[0.0, 8.0], [8.0, 0.0], [0.0, 8.0], [0.0, 8.0]])
>>> labels = np.array([1, 0, 0, 1])
>>> t = fit_temperature(logits, labels)  # > 1: the logits were over-confident
>>> probs = apply_temperature(logits, t)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from medtransfer.errors import ConfigError, DataError

__all__ = [
    "apply_temperature",
    "brier_score",
    "expected_calibration_error",
    "fit_temperature",
    "negative_log_likelihood",
    "reliability_bins",
    "top_label_ece",
]


# --------------------------------------------------------------------------- inputs


def _check_n_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ConfigError(f"n_bins must be a positive integer (e.g. 15); got {n_bins!r}.")
    return int(n_bins)


def _binary_probs(y_true: Any, prob_pos: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(prob_pos)
    if p.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
        raise DataError(f"y_true and prob_pos must be numeric; got dtypes {y.dtype} and {p.dtype}.")
    p = p.astype(np.float64)
    if y.ndim != 1 or p.ndim != 1 or y.shape != p.shape or y.size == 0:
        raise DataError(
            f"y_true and prob_pos must be non-empty 1-D arrays of one length; got shapes {y.shape} and {p.shape}."
        )
    if not np.isin(y, (0, 1)).all():
        raise DataError(f"y_true must contain only 0 and 1; got values {np.unique(y)[:5].tolist()}.")
    _check_unit_interval(p, "prob_pos")
    return y.astype(np.float64), p


def _check_unit_interval(p: np.ndarray, name: str) -> None:
    bad = ~(np.isfinite(p) & (p >= 0.0) & (p <= 1.0))
    if bad.any():
        i = int(np.argmax(bad.ravel()))
        raise DataError(f"{name} must be probabilities in [0, 1]; got {p.ravel()[i]!r} at flat index {i}.")


def _logits_labels(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits)
    if z.dtype.kind not in "biuf":
        raise DataError(f"logits must be numeric; got dtype {z.dtype}.")
    z = z.astype(np.float64)
    if z.ndim != 2 or z.shape[1] < 2 or z.shape[0] == 0:
        raise DataError(
            f"logits must have shape (n, K) with n >= 1 and K >= 2; got {z.shape}. "
            "For a single binary logit l use np.stack([np.zeros_like(l), l], axis=1)."
        )
    if not np.isfinite(z).all():
        raise DataError("logits must be finite; got NaN or inf.")
    y = np.asarray(labels)
    k = z.shape[1]
    integral = y.dtype.kind in "biu" or (y.dtype.kind == "f" and bool(np.all(y == np.round(y))))
    if y.shape != (z.shape[0],) or not integral:
        raise DataError(
            f"labels must be integer class indices of shape ({z.shape[0]},); got shape {y.shape}, dtype {y.dtype}."
        )
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= k:
        raise DataError(f"labels must be in 0..{k - 1} (logits have {k} columns); got {int(y.min())}..{int(y.max())}.")
    return z, y


def _check_temperature(temperature: Any) -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        t = float("nan")
    if not (math.isfinite(t) and t > 0.0):
        raise ConfigError(f"temperature must be a finite number > 0; got {temperature!r}.")
    return t


# ---------------------------------------------------------------------- binning


def _bin_index(conf: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], conf, side="right"), edges


def _binned_gap(conf: np.ndarray, outcome: np.ndarray, n_bins: int) -> float:
    idx, _ = _bin_index(conf, n_bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_out = np.bincount(idx, weights=outcome, minlength=n_bins)
    # sum_b (n_b / n) |mean_out_b - mean_conf_b| = sum_b |sum_out_b - sum_conf_b| / n
    return float(np.abs(sum_out - sum_conf).sum() / conf.shape[0])


def expected_calibration_error(y_true: Any, prob_pos: Any, *, n_bins: int = 15) -> float:
    """Binary ECE: ``sum_b (n_b / n) * |frac_positive_b - mean_prob_pos_b|`` over
    ``n_bins`` equal-width bins of the positive-class probability."""
    n_bins = _check_n_bins(n_bins)
    y, p = _binary_probs(y_true, prob_pos)
    return _binned_gap(p, y, n_bins)


def top_label_ece(labels: Any, probs: Any, *, n_bins: int = 15) -> float:
    """Multiclass (top-label) ECE of Guo et al. 2017: bins of the max probability,
    ``sum_b (n_b / n) * |accuracy_b - confidence_b|``."""
    n_bins = _check_n_bins(n_bins)
    p = np.asarray(probs)
    if p.dtype.kind not in "biuf" or p.ndim != 2 or p.shape[1] < 2:
        raise DataError(f"probs must be a numeric (n, K) array with K >= 2; got shape {p.shape}, dtype {p.dtype}.")
    p = p.astype(np.float64)
    _check_unit_interval(p, "probs")
    _, y = _logits_labels(p, labels)
    conf = p.max(axis=1)
    correct = (np.argmax(p, axis=1) == y).astype(np.float64)
    return _binned_gap(conf, correct, n_bins)


def brier_score(y_true: Any, prob_pos: Any) -> float:
    """Mean squared difference between ``prob_pos`` and the 0/1 outcome."""
    y, p = _binary_probs(y_true, prob_pos)
    return float(np.mean((p - y) ** 2))


def reliability_bins(y_true: Any, prob_pos: Any, *, n_bins: int = 15) -> dict:
    """Per-bin statistics for a reliability diagram (JSON-ready).

    Returns ``{"bin_edges": [n_bins + 1 floats], "mean_predicted": [...],
    "fraction_positive": [...], "counts": [ints]}``; for an empty bin
    ``mean_predicted`` and ``fraction_positive`` are ``None`` (never NaN).
    """
    n_bins = _check_n_bins(n_bins)
    y, p = _binary_probs(y_true, prob_pos)
    idx, edges = _bin_index(p, n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y, minlength=n_bins)
    mean_pred = [float(s / c) if c else None for s, c in zip(sum_p, counts)]
    frac_pos = [float(s / c) if c else None for s, c in zip(sum_y, counts)]
    return {
        "bin_edges": edges.tolist(),
        "mean_predicted": mean_pred,
        "fraction_positive": frac_pos,
        "counts": counts.astype(int).tolist(),
    }


# ------------------------------------------------------------- temperature scaling


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def negative_log_likelihood(logits: Any, labels: Any, *, temperature: float = 1.0) -> float:
    """Mean NLL of ``softmax(logits / temperature)`` at the true labels."""
    z, y = _logits_labels(logits, labels)
    t = _check_temperature(temperature)
    return float(-_log_softmax(z / t)[np.arange(y.shape[0]), y].mean())


def fit_temperature(
    logits: Any,
    labels: Any,
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    bounds: tuple[float, float] = (0.05, 20.0),
) -> float:
    """Fit the temperature T > 0 minimising the NLL of ``softmax(logits / T)``.

    Bounded scalar minimisation (scipy's Brent method) over ``log T`` within ``bounds``:
    the NLL is convex in 1/T, hence unimodal in log T, so the search finds the global
    minimum inside the bounds (a bound is returned when the optimum lies beyond it, e.g.
    T -> 0 for perfectly separated data). ``tol`` is the absolute tolerance in log T and
    ``max_iter`` caps the iterations. Fit on validation logits only.
    """
    z, y = _logits_labels(logits, labels)
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ConfigError(f"max_iter must be a positive integer; got {max_iter!r}.")
    lo_t, hi_t = (float(v) for v in bounds)
    if not (0.0 < lo_t < hi_t and math.isfinite(hi_t)):
        raise ConfigError(f"bounds must be (low, high) with 0 < low < high; got {bounds!r}.")
    rows = np.arange(y.shape[0])

    def nll(log_t: float) -> float:
        return float(-_log_softmax(z * math.exp(-log_t))[rows, y].mean())

    lo, hi = math.log(lo_t), math.log(hi_t)
    found = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": tol, "maxiter": int(max_iter)})
    # The bounded method never evaluates the bounds themselves: compare with them (optimum at an edge).
    best = min((float(found.fun), float(found.x)), (nll(lo), lo), (nll(hi), hi))
    return float(math.exp(best[1]))


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """``softmax(logits / temperature)`` row-wise (numerically stable), shape (n, K)."""
    z = np.asarray(logits)
    if z.dtype.kind not in "biuf" or z.ndim != 2 or z.shape[1] < 2:
        raise DataError(f"logits must be a numeric (n, K) array with K >= 2; got shape {z.shape}, dtype {z.dtype}.")
    t = _check_temperature(temperature)
    return np.exp(_log_softmax(z.astype(np.float64) / t))
