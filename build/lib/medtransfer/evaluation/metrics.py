"""Point metrics of a classifier: AUC, average precision, confusion matrix, sensitivity,
specificity, precision, NPV, F1, ROC and precision-recall curve points.

Pure numpy functions (no scikit-learn: it is only the independent reference in the
tests). Every public function returns JSON-ready python values (``float``, ``int``,
``list``) except the curve helpers, which return numpy arrays for plotting. Threshold
policies live in :mod:`~medtransfer.evaluation.thresholds`, bootstrap intervals, curve
bands and DeLong's test in :mod:`~medtransfer.evaluation.resampling`; both build on the
input checks and the :class:`RankedScores` machinery defined here.

Conventions
-----------
* Binary labels are 0/1 with 1 the positive class; ``prob_pos`` is the score of the
  positive class (a probability, though any finite score works for the ranking metrics).
* A sample is *predicted positive* when ``prob_pos >= threshold``.
* AUC is the Mann-Whitney statistic: a positive/negative pair with equal scores counts
  1/2 (identical to ``sklearn.metrics.roc_auc_score``). Average precision is
  ``sum_k (R_k - R_{k-1}) P_k`` over the distinct scores (as
  ``sklearn.metrics.average_precision_score``).
* A ratio whose denominator is zero (precision with no predicted positives, NPV with no
  predicted negatives) is reported as ``0.0`` - never NaN. Metrics that need both
  classes (AUC, average precision, and therefore :func:`binary_metrics`) raise
  :class:`~medtransfer.errors.DataError` when a class is missing.

Example
-------
>>> y = [0, 0, 1, 1]
>>> p = [0.1, 0.4, 0.35, 0.8]
>>> m = binary_metrics(y, p, threshold=0.5)
>>> m["auc"], m["confusion_matrix"]
(0.75, [[2, 0], [1, 1]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from medtransfer.errors import ConfigError, DataError

__all__ = [
    "RankedScores",
    "binary_inputs",
    "binary_metrics",
    "check_threshold",
    "multiclass_metrics",
    "pr_curve_points",
    "require_both_classes",
    "roc_curve_points",
    "safe_div",
]


# --------------------------------------------------------------------------- inputs


def binary_inputs(y_true: Any, prob_pos: Any, *, scores_name: str = "prob_pos") -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (int64 labels, float64 scores), both 1-D, same length."""
    y = np.asarray(y_true)
    s = np.asarray(prob_pos, dtype=np.float64) if _is_numeric(prob_pos) else None
    if s is None:
        raise DataError(f"{scores_name} must be numeric probabilities; got {_describe(prob_pos)}.")
    if y.ndim != 1 or s.ndim != 1:
        raise DataError(
            f"y_true and {scores_name} must be 1-D; got shapes {y.shape} and {s.shape}. "
            "For multiclass probabilities use multiclass_metrics."
        )
    if y.shape[0] != s.shape[0]:
        raise DataError(
            f"y_true and {scores_name} must have the same length; got {y.shape[0]} and {s.shape[0]}."
        )
    if y.shape[0] == 0:
        raise DataError(f"y_true and {scores_name} are empty; need at least one sample.")
    if y.dtype.kind not in "biuf" or not np.isin(y, (0, 1)).all():
        bad = _first_bad(y, lambda v: v in (0, 1))
        raise DataError(
            f"y_true must contain only 0 (negative) and 1 (positive); got {bad!r}. "
            "Map class names to 0/1 first."
        )
    if not np.isfinite(s).all():
        bad = s[~np.isfinite(s)][0]
        raise DataError(f"{scores_name} must be finite; got {bad!r} at index {int(np.argmax(~np.isfinite(s)))}.")
    return y.astype(np.int64), s


def _is_numeric(x: Any) -> bool:
    try:
        arr = np.asarray(x)
    except Exception:  # pragma: no cover - exotic inputs
        return False
    return arr.dtype.kind in "biuf"


def _describe(x: Any) -> str:
    arr = np.asarray(x)
    return f"dtype {arr.dtype} with shape {arr.shape}"


def _first_bad(arr: np.ndarray, ok) -> Any:
    for v in arr.ravel().tolist():
        try:
            if not ok(v):
                return v
        except Exception:
            return v
    return arr.ravel()[0].item() if arr.size else None


def require_both_classes(y: np.ndarray, what: str) -> None:
    """DataError naming ``what`` unless the 0/1 labels ``y`` hold both classes."""
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.shape[0]:
        present = 1 if n_pos else 0
        raise DataError(
            f"{what} needs both classes in y_true (0 and 1); got only class {present} "
            f"({y.shape[0]} samples). Evaluate on a split that contains both classes."
        )


def check_threshold(threshold: Any) -> float:
    """The threshold as a finite float; ConfigError otherwise."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ConfigError(f"threshold must be a number; got {threshold!r}.") from None
    if not math.isfinite(t):
        raise ConfigError(f"threshold must be finite; got {threshold!r}.")
    return t


# ---------------------------------------------------------------- ranking machinery


@dataclass(frozen=True)
class RankedScores:
    """Samples sorted by ascending score, with blocks of tied scores: the one ranking of
    the package (AUC, curves, threshold policies, bootstrap and DeLong all read it).

    Every ranking metric is computed from per-resample sample weights ``W`` (shape
    ``(b, n)`` in sorted order; all ones for the plain estimate, bootstrap counts for a
    resample), so the point estimate and the bootstrap share one code path.
    """

    order: np.ndarray  # argsort of the scores (stable)
    y: np.ndarray  # labels (float 0/1) in sorted order
    scores: np.ndarray  # sorted scores
    starts: np.ndarray  # first index of each tie block, shape (U,)
    ends: np.ndarray  # one past the last index of each tie block, shape (U,)

    @classmethod
    def build(cls, y: np.ndarray, s: np.ndarray) -> "RankedScores":
        order = np.argsort(s, kind="stable")
        ss = s[order]
        new = np.empty(ss.shape[0], dtype=bool)
        new[0] = True
        np.not_equal(ss[1:], ss[:-1], out=new[1:])
        starts = np.flatnonzero(new)
        ends = np.append(starts[1:], ss.shape[0])
        return cls(order, y[order].astype(np.float64), ss, starts, ends)

    @property
    def values(self) -> np.ndarray:
        """The distinct scores, ascending."""
        return self.scores[self.starts]

    def unit_weights(self) -> np.ndarray:
        """``W`` of the plain (not resampled) estimate: one row of ones."""
        return np.ones((1, self.scores.shape[0]))

    def cumulative(self, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative positive / negative weight below each sorted index: ``(b, n + 1)``."""
        b, n = W.shape
        c_pos = np.zeros((b, n + 1))
        c_neg = np.zeros((b, n + 1))
        np.cumsum(W * self.y, axis=1, out=c_pos[:, 1:])
        np.cumsum(W * (1.0 - self.y), axis=1, out=c_neg[:, 1:])
        return c_pos, c_neg

    def counts_at_blocks(self, W: np.ndarray):
        """For each distinct score v_k (ascending): weight of positives in the block, and
        tp/fp when predicting positive for ``score >= v_k``. Also totals P, N."""
        c_pos, c_neg = self.cumulative(W)
        P = c_pos[:, -1]
        N = c_neg[:, -1]
        pos_lo = c_pos[:, self.starts]
        neg_lo = c_neg[:, self.starts]
        pos_blk = c_pos[:, self.ends] - pos_lo
        neg_blk = c_neg[:, self.ends] - neg_lo
        tp = P[:, None] - pos_lo
        fp = N[:, None] - neg_lo
        return pos_blk, neg_blk, tp, fp, P, N, neg_lo

    def auc_ap(self, W: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Weighted AUC and average precision per row of ``W``; plus the validity mask
        (both classes have positive weight). Invalid rows hold 0.0."""
        pos_blk, neg_blk, tp, fp, P, N, neg_lo = self.counts_at_blocks(W)
        valid = (P > 0) & (N > 0)
        # Mann-Whitney: each positive beats the negatives strictly below it, ties count 1/2.
        num = (pos_blk * (neg_lo + 0.5 * neg_blk)).sum(axis=1)
        auc = safe_div(num, P * N)
        precision = safe_div(tp, tp + fp)
        ap = safe_div((pos_blk * precision).sum(axis=1), P)
        return np.where(valid, auc, 0.0), np.where(valid, ap, 0.0), valid

    def placements(self) -> np.ndarray:
        """Per sample, in input order: for a positive, the fraction of negatives scored
        below it; for a negative, the fraction of positives scored above it (ties count
        1/2 in both). The mean over the positives is the AUC; these are the structural
        components of DeLong's variance (midrank differences in Sun & Xu 2014)."""
        pos_blk, neg_blk, tp, _, P, N, neg_lo = self.counts_at_blocks(self.unit_weights())
        block = np.repeat(np.arange(self.starts.shape[0]), self.ends - self.starts)
        below = (neg_lo[0] + 0.5 * neg_blk[0]) / N[0]
        above = (tp[0] - 0.5 * pos_blk[0]) / P[0]  # tp includes the tied block: keep half of it
        out = np.empty(self.scores.shape[0])
        out[self.order] = np.where(self.y == 1.0, below[block], above[block])
        return out


def safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0.0 where den == 0 (no warnings, no NaN)."""
    num, den = np.broadcast_arrays(np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64))
    out = np.zeros(num.shape)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


# ------------------------------------------------------------------ binary metrics


def binary_metrics(y_true: Any, prob_pos: Any, *, threshold: float) -> dict:
    """Threshold-free and thresholded metrics for a binary problem.

    Returns a JSON-ready dict with keys ``n, n_positive, auc, average_precision,
    accuracy, sensitivity, specificity, precision, npv, f1, threshold,
    confusion_matrix`` where ``confusion_matrix = [[tn, fp], [fn, tp]]`` and predicted
    positive means ``prob_pos >= threshold``. Precision (PPV) with no predicted
    positives and NPV with no predicted negatives are 0.0.

    Raises:
        DataError: bad shapes/labels, non-finite scores, or only one class present
            (AUC and sensitivity/specificity need both).
        ConfigError: non-finite threshold.
    """
    y, s = binary_inputs(y_true, prob_pos)
    t = check_threshold(threshold)
    require_both_classes(y, "AUC")
    ranked = RankedScores.build(y, s)
    auc, ap, _ = ranked.auc_ap(ranked.unit_weights())
    pred = s >= t
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    n = int(y.shape[0])
    return {
        "n": n,
        "n_positive": tp + fn,
        "auc": float(auc[0]),
        "average_precision": float(ap[0]),
        "accuracy": (tp + tn) / n,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "threshold": t,
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def roc_curve_points(y_true: Any, prob_pos: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve at every distinct score, as ``sklearn.metrics.roc_curve(...,
    drop_intermediate=False)``: thresholds descend and start with ``inf`` so the curve
    starts at (0, 0). Raises DataError unless both classes are present."""
    y, s = binary_inputs(y_true, prob_pos)
    require_both_classes(y, "ROC curve")
    ranked = RankedScores.build(y, s)
    _, _, tp, fp, P, N, _ = ranked.counts_at_blocks(ranked.unit_weights())
    tpr = np.concatenate(([0.0], tp[0, ::-1] / P[0]))
    fpr = np.concatenate(([0.0], fp[0, ::-1] / N[0]))
    thresholds = np.concatenate(([np.inf], ranked.values[::-1]))
    return fpr, tpr, thresholds


def pr_curve_points(y_true: Any, prob_pos: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve as ``sklearn.metrics.precision_recall_curve``: thresholds
    are the distinct scores ascending; precision and recall have one extra final point
    (1.0, 0.0). Raises DataError when there is no positive sample."""
    y, s = binary_inputs(y_true, prob_pos)
    if int(y.sum()) == 0:
        raise DataError("PR curve needs at least one positive sample (label 1) in y_true; got none.")
    ranked = RankedScores.build(y, s)
    _, _, tp, fp, P, _, _ = ranked.counts_at_blocks(ranked.unit_weights())
    precision = np.append(safe_div(tp[0], tp[0] + fp[0]), 1.0)
    recall = np.append(tp[0] / P[0], 0.0)
    return precision, recall, ranked.values.copy()


# --------------------------------------------------------------- multiclass metrics


def multiclass_metrics(y_true: Any, probs: Any, *, class_names: Sequence[str]) -> dict:
    """Metrics for K >= 2 classes from an ``(n, K)`` probability matrix.

    ``accuracy`` uses the argmax (ties go to the lowest class index). ``macro_auc`` is
    the unweighted mean of the one-vs-rest AUCs (``roc_auc_score(multi_class="ovr",
    average="macro")``). ``per_class[name]`` holds ``auc, sensitivity`` (recall),
    ``precision, f1, support``; ``confusion_matrix[i][j]`` counts true class i
    predicted as j. Every class must occur in ``y_true`` (DataError otherwise).
    """
    names = list(class_names)
    k = len(names)
    if k < 2 or len(set(names)) != k:
        raise ConfigError(f"class_names must hold at least 2 distinct names; got {names!r}.")
    p = np.asarray(probs, dtype=np.float64) if _is_numeric(probs) else None
    if p is None or p.ndim != 2 or p.shape[1] != k:
        shape = None if p is None else p.shape
        raise DataError(f"probs must have shape (n, {k}) to match class_names {names}; got {shape}.")
    if not np.isfinite(p).all():
        raise DataError("probs must be finite; got NaN or inf.")
    y = np.asarray(y_true)
    if y.ndim != 1 or y.shape[0] != p.shape[0] or y.shape[0] == 0:
        raise DataError(f"y_true must be 1-D with one label per row of probs ({p.shape[0]}); got shape {y.shape}.")
    if y.dtype.kind not in "biuf" or not np.isin(y, np.arange(k)).all():
        bad = _first_bad(y, lambda v: v in range(k))
        raise DataError(f"y_true must hold class indices 0..{k - 1}; got {bad!r}.")
    y = y.astype(np.int64)
    pred = np.argmax(p, axis=1)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    per_class: dict[str, dict] = {}
    for c, name in enumerate(names):
        yc = (y == c).astype(np.int64)
        support = int(yc.sum())
        if support == 0 or support == y.shape[0]:
            raise DataError(
                f"one-vs-rest AUC for class {name!r} needs samples of that class and of the others; "
                f"got {support} of {y.shape[0]}. Evaluate on a split that contains every class."
            )
        ranked = RankedScores.build(yc, p[:, c])
        auc, _, _ = ranked.auc_ap(ranked.unit_weights())
        tp = int(cm[c, c])
        predicted = int(cm[:, c].sum())
        per_class[name] = {
            "auc": float(auc[0]),
            "sensitivity": _ratio(tp, support),
            "precision": _ratio(tp, predicted),
            "f1": _ratio(2 * tp, support + predicted),
            "support": support,
        }
    return {
        "n": int(y.shape[0]),
        "accuracy": float(np.trace(cm)) / y.shape[0],
        "macro_auc": float(np.mean([v["auc"] for v in per_class.values()])),
        "macro_f1": float(np.mean([v["f1"] for v in per_class.values()])),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }
