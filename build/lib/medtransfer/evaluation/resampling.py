"""Resampling statistics: cluster (patient) bootstrap intervals, paired AUC comparison,
pointwise ROC / precision-recall bands, and DeLong's test.

One calling convention: the data come first and positionally (labels, then one or two
score vectors); every resampling setting is keyword-only, in the same order and with
the same meaning everywhere: ``groups`` (patient id per sample, ``None`` = each sample is
its own cluster), ``n_resamples``, ``confidence``, ``seed``. Patients are resampled with
replacement and every image of a drawn patient is kept, so correlated images of one
patient do not shrink an interval.

All resampled statistics are computed for whole chunks of resamples at once from
bootstrap weights on the :class:`~medtransfer.evaluation.metrics.RankedScores` of the
data (no Python loop per resample); a resample with a missing class is skipped where
the statistic needs that class.

Example
-------
>>> ci = bootstrap_ci([0, 1, 0, 1], [0.2, 0.9, 0.4, 0.6], threshold=0.5, groups=["a", "a", "b", "b"],
...                   n_resamples=200, seed=0)
>>> sorted(ci)[:2]
['accuracy_ci', 'auc_ci']
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation.metrics import RankedScores, binary_inputs, check_threshold, require_both_classes, safe_div

__all__ = ["bootstrap_ci", "delong_test", "paired_bootstrap_auc_test", "pr_band", "roc_band"]

# Resamples are drawn in chunks of this many rows, so memory stays ~ chunk * n floats.
_CHUNK = 256

_BOOTSTRAP_METRICS = (
    "auc",
    "average_precision",
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "npv",
    "f1",
)


# ------------------------------------------------------------------------ the plan


def _check_resampling(n_resamples: Any, confidence: Any) -> tuple[int, float]:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ConfigError(f"n_resamples must be a positive integer; got {n_resamples!r}.")
    try:
        c = float(confidence)
    except (TypeError, ValueError):
        c = float("nan")
    if not 0.0 < c < 1.0:
        raise ConfigError(f"confidence must be strictly between 0 and 1 (e.g. 0.95); got {confidence!r}.")
    return int(n_resamples), c


def _group_index(groups: Any, n: int) -> tuple[np.ndarray, int]:
    """Map group ids (any hashables) to 0..G-1; ``None`` gives one group per sample."""
    if groups is None:
        return np.arange(n, dtype=np.int64), n
    values = list(np.asarray(groups, dtype=object).ravel()) if not isinstance(groups, list) else groups
    if len(values) != n:
        raise DataError(f"groups must have one id per sample ({n}); got {len(values)}.")
    index: dict[Any, int] = {}
    inv = np.fromiter((index.setdefault(g, len(index)) for g in values), dtype=np.int64, count=n)
    return inv, len(index)


@dataclass(frozen=True)
class _Plan:
    """The validated resampling settings of one call and the cluster of each sample."""

    cluster: np.ndarray  # cluster number (0..n_groups-1) of each sample, input order
    n_groups: int
    n_resamples: int
    confidence: float
    seed: int

    @classmethod
    def of(cls, y: np.ndarray, *, groups: Any, n_resamples: Any, confidence: Any, seed: int, what: str) -> "_Plan":
        n_resamples, confidence = _check_resampling(n_resamples, confidence)
        cluster, n_groups = _group_index(groups, y.shape[0])
        require_both_classes(y, what)
        return cls(cluster, n_groups, n_resamples, confidence, seed)

    def weights(self, *rankings: RankedScores) -> Iterator[list[np.ndarray]]:
        """Per chunk of b resamples, the ``(b, n)`` bootstrap weights of the samples in
        the sorted order of each ranking (how often each sample's cluster was drawn);
        ``n_resamples`` rows over all chunks, the same draws for every ranking."""
        orders = [self.cluster[r.order] for r in rankings]
        rng = np.random.default_rng(self.seed)
        done = 0
        while done < self.n_resamples:
            b = min(_CHUNK, self.n_resamples - done)
            draws = rng.integers(0, self.n_groups, size=(b, self.n_groups))
            draws += (np.arange(b) * self.n_groups)[:, None]
            counts = np.bincount(draws.ravel(), minlength=b * self.n_groups).reshape(b, self.n_groups)
            yield [counts[:, order].astype(np.float64) for order in orders]
            done += b

    def interval(self, values: np.ndarray, what: str) -> np.ndarray:
        """Percentile interval ``[lo, hi]`` over resamples (axis 0); DataError when no
        resample had what ``what`` needs."""
        if values.shape[0] == 0:
            raise DataError(
                f"{what}: no resample had the classes it needs ({self.n_groups} groups, "
                f"{self.n_resamples} resamples). Use more data or more resamples."
            )
        alpha = 1.0 - self.confidence
        return np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0], axis=0)


# ------------------------------------------------------------------------ bootstrap


def bootstrap_ci(
    y_true: Any, prob_pos: Any, *, threshold: float,
    groups: Any = None, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
) -> dict:
    """Percentile confidence intervals of the metrics of
    :func:`~medtransfer.evaluation.metrics.binary_metrics` by (cluster) bootstrap.

    ``groups=None`` resamples images. Metrics use the same conventions as
    ``binary_metrics`` (precision/NPV with an empty denominator are 0.0). A resample
    that lacks a class is skipped for the metrics that need it (AUC and average
    precision: both classes; sensitivity and F1: positives; specificity: negatives);
    ``n_valid`` reports how many resamples each interval uses. Output never holds NaN.

    Returns ``{"auc_ci": [lo, hi], "average_precision_ci", "accuracy_ci",
    "sensitivity_ci", "specificity_ci", "precision_ci", "npv_ci", "f1_ci",
    "n_resamples", "n_valid": {metric: count}, "confidence", "n_groups"}``.
    """
    y, s = binary_inputs(y_true, prob_pos)
    t = check_threshold(threshold)
    plan = _Plan.of(y, groups=groups, n_resamples=n_resamples, confidence=confidence, seed=seed, what="bootstrap_ci")
    ranked = RankedScores.build(y, s)
    pred = (ranked.scores >= t).astype(np.float64)
    pos = ranked.y
    tp_vec, fp_vec = pos * pred, (1.0 - pos) * pred
    collected: dict[str, list[np.ndarray]] = {m: [] for m in _BOOTSTRAP_METRICS}
    for (W,) in plan.weights(ranked):
        auc, ap, both = ranked.auc_ap(W)
        P, total = W @ pos, W.sum(axis=1)
        N = total - P
        tp, fp = W @ tp_vec, W @ fp_vec
        fn, tn = P - tp, N - fp
        has_pos, has_neg = P > 0, N > 0
        collected["auc"].append(auc[both])
        collected["average_precision"].append(ap[both])
        collected["accuracy"].append((tp + tn) / total)
        collected["sensitivity"].append(safe_div(tp, P)[has_pos])
        collected["specificity"].append(safe_div(tn, N)[has_neg])
        collected["precision"].append(safe_div(tp, tp + fp))
        collected["npv"].append(safe_div(tn, tn + fn))
        collected["f1"].append(safe_div(2 * tp, 2 * tp + fp + fn)[has_pos])
    out: dict[str, Any] = {}
    n_valid: dict[str, int] = {}
    for m in _BOOTSTRAP_METRICS:
        values = np.concatenate(collected[m])
        out[f"{m}_ci"] = [float(v) for v in plan.interval(values, f"bootstrap_ci ({m})")]
        n_valid[m] = int(values.size)
    out.update(n_resamples=plan.n_resamples, n_valid=n_valid, confidence=plan.confidence, n_groups=plan.n_groups)
    return out


def _paired_scores(y_true: Any, prob_a: Any, prob_b: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, sa = binary_inputs(y_true, prob_a, scores_name="prob_a")
    _, sb = binary_inputs(y_true, prob_b, scores_name="prob_b")
    if sa.shape != sb.shape:
        raise DataError(f"prob_a and prob_b must have the same length; got {sa.shape[0]} and {sb.shape[0]}.")
    return y, sa, sb


def paired_bootstrap_auc_test(
    y_true: Any, prob_a: Any, prob_b: Any, *,
    groups: Any = None, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
) -> dict:
    """Compare two models' AUCs on the same samples by a paired (cluster) bootstrap.

    Both models are scored on the same resamples. ``ci`` is the percentile interval of
    ``auc_a - auc_b``; the two-sided ``p_value`` inverts that interval,
    ``min(1, 2 * (min(#diff <= 0, #diff >= 0) + 1) / (B + 1))`` over the B valid
    resamples (so it is never exactly 0). Resamples with a single class are skipped.

    Returns ``{"auc_a", "auc_b", "auc_diff", "ci": [lo, hi], "p_value", "n_resamples",
    "n_valid"}``.
    """
    y, sa, sb = _paired_scores(y_true, prob_a, prob_b)
    what = "paired_bootstrap_auc_test"
    plan = _Plan.of(y, groups=groups, n_resamples=n_resamples, confidence=confidence, seed=seed, what=what)
    ra, rb = RankedScores.build(y, sa), RankedScores.build(y, sb)
    auc_a, auc_b = float(ra.auc_ap(ra.unit_weights())[0][0]), float(rb.auc_ap(rb.unit_weights())[0][0])
    diffs = []
    for Wa, Wb in plan.weights(ra, rb):
        a, _, valid = ra.auc_ap(Wa)
        b, _, _ = rb.auc_ap(Wb)
        diffs.append((a - b)[valid])
    d = np.concatenate(diffs)
    ci = plan.interval(d, what)
    tail = min(int(np.sum(d <= 0)), int(np.sum(d >= 0)))
    p_value = min(1.0, 2.0 * (tail + 1) / (d.size + 1))
    return {
        "auc_a": auc_a,
        "auc_b": auc_b,
        "auc_diff": auc_a - auc_b,
        "ci": [float(v) for v in ci],
        "p_value": float(p_value),
        "n_resamples": plan.n_resamples,
        "n_valid": int(d.size),
    }


# ---------------------------------------------------------------------------- bands

# A curve reader gets per-resample tp, fp (weights at each distinct score, ascending, as
# RankedScores.counts_at_blocks) and totals P, N, and returns (x, y) rows with x
# non-decreasing from <= 0 to >= 1 along each row.
_CurveRows = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def roc_band(
    y_true: Any, prob_pos: Any, *,
    groups: Any = None, n_resamples: int = 200, confidence: float = 0.95, seed: int = 0, grid_size: int = 101,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise percentile band of the ROC curve by (cluster) bootstrap.

    Each resampled ROC curve is read at a fixed FPR grid ``linspace(0, 1, grid_size)``
    (linear between ROC points; at an FPR with a vertical segment, the top of it).
    Returns ``(fpr_grid, tpr_lo, tpr_hi)`` for :func:`medtransfer.evaluation.plots.plot_roc`.
    """
    return _band(y_true, prob_pos, _roc_rows, grid_size=grid_size, what="roc_band",
                 groups=groups, n_resamples=n_resamples, confidence=confidence, seed=seed)


def pr_band(
    y_true: Any, prob_pos: Any, *,
    groups: Any = None, n_resamples: int = 200, confidence: float = 0.95, seed: int = 0, grid_size: int = 101,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise percentile band of the precision-recall curve by (cluster) bootstrap.

    Each resampled curve (the points of
    :func:`~medtransfer.evaluation.metrics.pr_curve_points`) is read as interpolated
    precision, the best precision at recall >= r, on ``linspace(0, 1, grid_size)``
    (as ``np.interp`` over the points sorted by recall). Returns ``(recall_grid,
    precision_lo, precision_hi)`` for :func:`medtransfer.evaluation.plots.plot_pr`.
    """
    return _band(y_true, prob_pos, _pr_rows, grid_size=grid_size, what="pr_band",
                 groups=groups, n_resamples=n_resamples, confidence=confidence, seed=seed)


def _roc_rows(tp: np.ndarray, fp: np.ndarray, P: np.ndarray, N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) rows as roc_curve_points: from (0, 0), thresholds descending."""
    zeros = np.zeros((tp.shape[0], 1))
    fpr = np.hstack((zeros, fp[:, ::-1] / N[:, None]))
    tpr = np.hstack((zeros, tp[:, ::-1] / P[:, None]))
    return fpr, tpr


def _pr_rows(tp: np.ndarray, fp: np.ndarray, P: np.ndarray, N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, best precision at recall >= r) rows, sorted by recall (stable).

    Scores absent from a resample (zero weight) repeat the point of the next present
    score above them (or give tp = fp = 0 at recall 0 above the top one), so they change
    neither the runs of equal recall nor their end values that the grid reading uses."""
    precision = np.hstack((safe_div(tp, tp + fp), np.ones((tp.shape[0], 1))))
    recall = np.hstack((tp / P[:, None], np.zeros((tp.shape[0], 1))))
    best = np.maximum.accumulate(precision, axis=1)  # recall decreases along a row: best at recall >= r
    order = np.argsort(recall, axis=1, kind="stable")
    return np.take_along_axis(recall, order, axis=1), np.take_along_axis(best, order, axis=1)


def _band(
    y_true: Any, prob_pos: Any, curve_rows: _CurveRows, *, grid_size: Any, what: str,
    groups: Any, n_resamples: Any, confidence: Any, seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise percentile band over the resampled curves read on a common grid."""
    y, s = binary_inputs(y_true, prob_pos)
    if isinstance(grid_size, bool) or not isinstance(grid_size, (int, np.integer)) or grid_size < 2:
        raise ConfigError(f"grid_size must be an integer >= 2; got {grid_size!r}.")
    plan = _Plan.of(y, groups=groups, n_resamples=n_resamples, confidence=confidence, seed=seed, what=what)
    ranked = RankedScores.build(y, s)
    grid = np.linspace(0.0, 1.0, int(grid_size))
    rows = []
    for (W,) in plan.weights(ranked):
        _, _, tp, fp, P, N, _ = ranked.counts_at_blocks(W)
        valid = (P > 0) & (N > 0)
        x, v = curve_rows(tp[valid], fp[valid], P[valid], N[valid])
        rows.append(_read_on_grid(x, v, grid))
    lo, hi = plan.interval(np.vstack(rows), what)
    return grid, lo, hi


def _read_on_grid(x: np.ndarray, v: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Read polylines at ``grid`` (ascending), one per row: ``x`` non-decreasing along a
    row, ``x[:, 0] <= grid[0]``, ``x[:, -1] >= grid[-1]``. Linear between points; at an x
    that several points share, the value of the last of them. Shape ``(rows, grid)``."""
    b, m = x.shape
    g = grid.shape[0]
    # x[r, i] <= grid[k] exactly when k >= first[r, i]; counting per row gives the index
    # of the last point at or left of each grid value, with exact float comparisons.
    first = np.searchsorted(grid, x, side="left") + (g + 1) * np.arange(b)[:, None]
    hist = np.bincount(first.ravel(), minlength=b * (g + 1)).reshape(b, g + 1)
    j = np.cumsum(hist, axis=1)[:, :g] - 1
    nxt = np.minimum(j + 1, m - 1)
    xj, vj = np.take_along_axis(x, j, axis=1), np.take_along_axis(v, j, axis=1)
    span = np.take_along_axis(x, nxt, axis=1) - xj
    frac = safe_div(grid - xj, span)  # 0 where a grid value meets a point
    return vj + frac * (np.take_along_axis(v, nxt, axis=1) - vj)


# -------------------------------------------------------------------------- DeLong


def delong_test(y_true: Any, prob_a: Any, prob_b: Any) -> dict:
    """DeLong's test for two correlated ROC AUCs (DeLong et al. 1988, Biometrics 44:837),
    with the structural components of the fast algorithm of Sun & Xu (2014, IEEE SPL
    21:1389) read from the ranking. Image-level only (no patient grouping: use
    :func:`paired_bootstrap_auc_test` for clustered data).

    Returns ``{"auc_a", "auc_b", "auc_diff" (a - b), "z", "p_value"}`` (two-sided). When
    the two score vectors give identical placements (zero variance of the difference),
    ``z = 0`` and ``p_value = 1``.
    """
    y, sa, sb = _paired_scores(y_true, prob_a, prob_b)
    require_both_classes(y, "delong_test")
    pos = y == 1
    m, n = int(pos.sum()), int((~pos).sum())
    if m < 2 or n < 2:
        raise DataError(f"delong_test needs at least 2 samples of each class; got {m} positive and {n} negative.")
    placed = [RankedScores.build(y, s).placements() for s in (sa, sb)]
    v10 = np.vstack([p[pos] for p in placed])  # per positive: fraction of negatives below it
    v01 = np.vstack([p[~pos] for p in placed])  # per negative: fraction of positives above it
    aucs = v10.mean(axis=1)
    cov = np.cov(v10) / m + np.cov(v01) / n
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    diff = float(aucs[0] - aucs[1])
    if var <= 1e-15:
        z, p = 0.0, 1.0
    else:
        z = diff / math.sqrt(var)
        p = math.erfc(abs(z) / math.sqrt(2.0))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "auc_diff": diff, "z": float(z), "p_value": float(p)}
