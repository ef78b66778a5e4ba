"""Classification metrics, threshold policies and bootstrap confidence intervals.

Pure numpy functions (no scikit-learn: it is only the independent reference in the
tests). Every public function returns JSON-ready python values (``float``, ``int``,
``list``) except the curve helpers, which return numpy arrays for plotting.

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
    "ThresholdPolicy",
    "binary_metrics",
    "bootstrap_ci",
    "choose_threshold",
    "delong_test",
    "multiclass_metrics",
    "paired_bootstrap_auc_test",
    "parse_threshold_policy",
    "pr_curve_points",
    "roc_band",
    "roc_curve_points",
]

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


# --------------------------------------------------------------------------- inputs


def _binary_inputs(y_true: Any, prob_pos: Any, *, scores_name: str = "prob_pos"):
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


def _require_both_classes(y: np.ndarray, what: str) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.shape[0]:
        present = 1 if n_pos else 0
        raise DataError(
            f"{what} needs both classes in y_true (0 and 1); got only class {present} "
            f"({y.shape[0]} samples). Evaluate on a split that contains both classes."
        )


def _check_threshold(threshold: Any) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ConfigError(f"threshold must be a number; got {threshold!r}.") from None
    if not math.isfinite(t):
        raise ConfigError(f"threshold must be finite; got {threshold!r}.")
    return t


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


# ---------------------------------------------------------------- ranking machinery


@dataclass(frozen=True)
class _Ranked:
    """Samples sorted by ascending score, with blocks of tied scores.

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
    def build(cls, y: np.ndarray, s: np.ndarray) -> "_Ranked":
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
        auc = _safe_div(num, P * N)
        precision = _safe_div(tp, tp + fp)
        ap = _safe_div((pos_blk * precision).sum(axis=1), P)
        return np.where(valid, auc, 0.0), np.where(valid, ap, 0.0), valid


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
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
    y, s = _binary_inputs(y_true, prob_pos)
    t = _check_threshold(threshold)
    _require_both_classes(y, "AUC")
    ranked = _Ranked.build(y, s)
    auc, ap, _ = ranked.auc_ap(np.ones((1, y.shape[0])))
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
    y, s = _binary_inputs(y_true, prob_pos)
    _require_both_classes(y, "ROC curve")
    ranked = _Ranked.build(y, s)
    _, _, tp, fp, P, N, _ = ranked.counts_at_blocks(np.ones((1, y.shape[0])))
    tpr = np.concatenate(([0.0], tp[0, ::-1] / P[0]))
    fpr = np.concatenate(([0.0], fp[0, ::-1] / N[0]))
    thresholds = np.concatenate(([np.inf], ranked.values[::-1]))
    return fpr, tpr, thresholds


def pr_curve_points(y_true: Any, prob_pos: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve as ``sklearn.metrics.precision_recall_curve``: thresholds
    are the distinct scores ascending; precision and recall have one extra final point
    (1.0, 0.0). Raises DataError when there is no positive sample."""
    y, s = _binary_inputs(y_true, prob_pos)
    if int(y.sum()) == 0:
        raise DataError("PR curve needs at least one positive sample (label 1) in y_true; got none.")
    ranked = _Ranked.build(y, s)
    _, _, tp, fp, P, _, _ = ranked.counts_at_blocks(np.ones((1, y.shape[0])))
    precision = np.append(_safe_div(tp[0], tp[0] + fp[0]), 1.0)
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
        auc, _, _ = _Ranked.build(yc, p[:, c]).auc_ap(np.ones((1, y.shape[0])))
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


# ---------------------------------------------------------------- threshold policies

_POLICY_FORMS = (
    "youden, f1, sensitivity:X, specificity:X (0 < X <= 1) or fixed:T (0 <= T <= 1), "
    "e.g. 'sensitivity:0.95'"
)
_POLICY_KINDS = ("youden", "f1", "sensitivity", "specificity", "fixed")


@dataclass(frozen=True)
class ThresholdPolicy:
    """How to pick the decision threshold (on the validation split, never on test).

    ``kind`` is one of ``youden`` (max TPR - FPR), ``f1`` (max F1), ``sensitivity``
    (highest threshold with sensitivity >= value), ``specificity`` (lowest threshold with
    specificity >= value) or ``fixed`` (value is the threshold). ``str(policy)`` gives
    the text form accepted by :func:`parse_threshold_policy`.
    """

    kind: str
    value: float | None = None

    def __post_init__(self) -> None:
        text = self.kind if self.value is None else f"{self.kind}:{self.value}"
        if self.kind not in _POLICY_KINDS:
            raise ConfigError(f"--threshold: got {text!r}; expected {_POLICY_FORMS}.")
        if self.kind in ("youden", "f1"):
            if self.value is not None:
                raise ConfigError(f"--threshold: got {text!r}; {self.kind} takes no value. Expected {_POLICY_FORMS}.")
            return
        v = self.value
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if ok and self.kind == "fixed":
            ok = 0.0 <= v <= 1.0
        elif ok:
            ok = 0.0 < v <= 1.0
        if not ok:
            raise ConfigError(f"--threshold: got {text!r}; expected {_POLICY_FORMS}.")
        object.__setattr__(self, "value", float(v))

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"


def parse_threshold_policy(text: str) -> ThresholdPolicy:
    """Parse ``youden``, ``f1``, ``sensitivity:0.95``, ``specificity:0.9`` or
    ``fixed:0.5`` (case-insensitive). Raises ConfigError naming ``--threshold``."""
    if not isinstance(text, str):
        raise ConfigError(f"--threshold: got {text!r}; expected {_POLICY_FORMS}.")
    kind, sep, raw = text.strip().lower().partition(":")
    kind = kind.strip()
    if kind not in _POLICY_KINDS or (kind in ("youden", "f1") and sep):
        raise ConfigError(f"--threshold: got {text!r}; expected {_POLICY_FORMS}.")
    if kind in ("youden", "f1"):
        return ThresholdPolicy(kind)
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"--threshold: got {text!r}; expected {_POLICY_FORMS}.") from None
    try:
        return ThresholdPolicy(kind, value)
    except ConfigError:
        raise ConfigError(f"--threshold: got {text!r}; expected {_POLICY_FORMS}.") from None


def _interval_midpoint(candidates: np.ndarray, optimal: np.ndarray) -> float:
    """Midpoint of the threshold interval that reproduces the highest run of optimal candidates."""
    top = int(np.flatnonzero(optimal)[-1])
    bottom = top
    while bottom > 0 and optimal[bottom - 1]:
        bottom -= 1
    if bottom == 0:  # everything called positive: no candidate below to leave a margin to
        return float(candidates[0])
    return float((candidates[bottom - 1] + candidates[top]) / 2.0)


def choose_threshold(y_true: Any, prob_pos: Any, policy: ThresholdPolicy) -> float:
    """Pick a threshold on validation data; predicted positive means ``prob >= t``.

    Candidates are the distinct values of ``prob_pos``. For Youden's J and F1, the
    optimum is the highest run of consecutive candidates with the best value (ties go to
    the fewest positive calls); every threshold between the candidate below that run and
    its top gives the same predictions, and the midpoint of that interval is returned
    (a maximum-margin choice: on well-separated validation data the top candidate alone
    can sit at p = 1.0, which the next data set will not reach). ``sensitivity:X``
    returns the highest candidate with sensitivity >= X (always exists: the lowest
    candidate calls everything positive); ``specificity:X`` the lowest candidate with
    specificity >= X (DataError if none reaches X, which happens when many negatives
    share the top score, e.g. saturated probabilities of 1.0).
    """
    if not isinstance(policy, ThresholdPolicy):
        raise ConfigError(f"policy must be a ThresholdPolicy (see parse_threshold_policy); got {policy!r}.")
    if policy.kind == "fixed":
        return float(policy.value)  # type: ignore[arg-type]
    y, s = _binary_inputs(y_true, prob_pos)
    _require_both_classes(y, f"threshold policy {str(policy)!r}")
    ranked = _Ranked.build(y, s)
    _, _, tp, fp, P, N, _ = ranked.counts_at_blocks(np.ones((1, y.shape[0])))
    tp, fp = np.rint(tp[0]).astype(np.int64), np.rint(fp[0]).astype(np.int64)
    n_pos, n_neg = int(round(P[0])), int(round(N[0]))
    candidates = ranked.values
    if policy.kind == "youden":
        # J * P * N = tp * N - fp * P: exact integer comparison, no float ties.
        j = tp * n_neg - fp * n_pos
        return _interval_midpoint(candidates, j == j.max())
    elif policy.kind == "f1":
        f1 = 2.0 * tp / (tp + fp + n_pos)
        return _interval_midpoint(candidates, f1 >= f1.max() - 1e-12)
    elif policy.kind == "sensitivity":
        idx = np.flatnonzero(tp / n_pos >= policy.value)[-1]
    else:  # specificity
        ok = np.flatnonzero((n_neg - fp) / n_neg >= policy.value)
        if ok.size == 0:
            best = (n_neg - fp[-1]) / n_neg
            raise DataError(
                f"threshold policy {str(policy)!r}: no threshold reaches specificity {policy.value:g} "
                f"on these {y.shape[0]} samples (best {best:.3f}: {int(fp[-1])} negatives share the "
                f"top score {candidates[-1]:g}). Use a lower target, another policy, or calibrated probabilities."
            )
        idx = ok[0]
    return float(candidates[idx])


# ------------------------------------------------------------------------ bootstrap


def _resample_counts(rng: np.random.Generator, b: int, n_groups: int) -> np.ndarray:
    """(b, G) counts of each group in b resamples of G groups drawn with replacement."""
    draws = rng.integers(0, n_groups, size=(b, n_groups))
    draws += (np.arange(b) * n_groups)[:, None]
    return np.bincount(draws.ravel(), minlength=b * n_groups).reshape(b, n_groups)


def _chunks(n_resamples: int):
    done = 0
    while done < n_resamples:
        b = min(_CHUNK, n_resamples - done)
        yield b
        done += b


def _percentile_ci(values: np.ndarray, confidence: float) -> list[float]:
    alpha = 1.0 - confidence
    lo, hi = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return [float(lo), float(hi)]


def bootstrap_ci(
    y_true: Any,
    prob_pos: Any,
    *,
    threshold: float,
    groups: Any = None,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Percentile confidence intervals by (cluster) bootstrap.

    Groups (patient ids) are resampled with replacement and every image of a drawn
    patient is kept, so correlated images of one patient do not shrink the interval;
    ``groups=None`` resamples images. Metrics use the same conventions as
    :func:`binary_metrics` (precision/NPV with an empty denominator are 0.0). A resample
    that lacks a class is skipped for the metrics that need it (AUC and average
    precision: both classes; sensitivity and F1: positives; specificity: negatives);
    ``n_valid`` reports how many resamples each interval uses. Output never holds NaN.

    Returns ``{"auc_ci": [lo, hi], "average_precision_ci", "accuracy_ci",
    "sensitivity_ci", "specificity_ci", "precision_ci", "npv_ci", "f1_ci",
    "n_resamples", "n_valid": {metric: count}, "confidence", "n_groups"}``.
    """
    y, s = _binary_inputs(y_true, prob_pos)
    t = _check_threshold(threshold)
    n_resamples, confidence = _check_resampling(n_resamples, confidence)
    inv, n_groups = _group_index(groups, y.shape[0])
    _require_both_classes(y, "bootstrap_ci")
    ranked = _Ranked.build(y, s)
    inv_sorted = inv[ranked.order]
    pred = (ranked.scores >= t).astype(np.float64)
    pos = ranked.y
    tp_vec, fp_vec = pos * pred, (1.0 - pos) * pred
    rng = np.random.default_rng(seed)
    collected: dict[str, list[np.ndarray]] = {m: [] for m in _BOOTSTRAP_METRICS}
    for b in _chunks(n_resamples):
        W = _resample_counts(rng, b, n_groups)[:, inv_sorted].astype(np.float64)
        auc, ap, both = ranked.auc_ap(W)
        P, total = W @ pos, W.sum(axis=1)
        N = total - P
        tp, fp = W @ tp_vec, W @ fp_vec
        fn, tn = P - tp, N - fp
        has_pos, has_neg = P > 0, N > 0
        collected["auc"].append(auc[both])
        collected["average_precision"].append(ap[both])
        collected["accuracy"].append((tp + tn) / total)
        collected["sensitivity"].append(_safe_div(tp, P)[has_pos])
        collected["specificity"].append(_safe_div(tn, N)[has_neg])
        collected["precision"].append(_safe_div(tp, tp + fp))
        collected["npv"].append(_safe_div(tn, tn + fn))
        collected["f1"].append(_safe_div(2 * tp, 2 * tp + fp + fn)[has_pos])
    out: dict[str, Any] = {}
    n_valid: dict[str, int] = {}
    for m in _BOOTSTRAP_METRICS:
        values = np.concatenate(collected[m])
        if values.size == 0:
            raise DataError(
                f"bootstrap_ci: no resample had the classes needed for {m} "
                f"({n_groups} groups, {n_resamples} resamples). Use more data or more resamples."
            )
        out[f"{m}_ci"] = _percentile_ci(values, confidence)
        n_valid[m] = int(values.size)
    out.update(n_resamples=n_resamples, n_valid=n_valid, confidence=confidence, n_groups=n_groups)
    return out


def paired_bootstrap_auc_test(
    y_true: Any,
    prob_a: Any,
    prob_b: Any,
    *,
    groups: Any = None,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Compare two models' AUCs on the same samples by a paired (cluster) bootstrap.

    Both models are scored on the same resamples. ``ci`` is the percentile interval of
    ``auc_a - auc_b``; the two-sided ``p_value`` inverts that interval,
    ``min(1, 2 * (min(#diff <= 0, #diff >= 0) + 1) / (B + 1))`` over the B valid
    resamples (so it is never exactly 0). Resamples with a single class are skipped.

    Returns ``{"auc_a", "auc_b", "auc_diff", "ci": [lo, hi], "p_value", "n_resamples",
    "n_valid"}``.
    """
    y, sa = _binary_inputs(y_true, prob_a, scores_name="prob_a")
    _, sb = _binary_inputs(y_true, prob_b, scores_name="prob_b")
    if sa.shape != sb.shape:
        raise DataError(f"prob_a and prob_b must have the same length; got {sa.shape[0]} and {sb.shape[0]}.")
    n_resamples, confidence = _check_resampling(n_resamples, confidence)
    inv, n_groups = _group_index(groups, y.shape[0])
    _require_both_classes(y, "paired_bootstrap_auc_test")
    ra, rb = _Ranked.build(y, sa), _Ranked.build(y, sb)
    ones = np.ones((1, y.shape[0]))
    auc_a, auc_b = float(ra.auc_ap(ones)[0][0]), float(rb.auc_ap(ones)[0][0])
    inv_a, inv_b = inv[ra.order], inv[rb.order]
    rng = np.random.default_rng(seed)
    diffs = []
    for b in _chunks(n_resamples):
        counts = _resample_counts(rng, b, n_groups).astype(np.float64)
        a, _, valid = ra.auc_ap(counts[:, inv_a])
        bb, _, _ = rb.auc_ap(counts[:, inv_b])
        diffs.append((a - bb)[valid])
    d = np.concatenate(diffs)
    if d.size == 0:
        raise DataError(
            f"paired_bootstrap_auc_test: no resample contained both classes ({n_groups} groups). Use more data."
        )
    tail = min(int(np.sum(d <= 0)), int(np.sum(d >= 0)))
    p_value = min(1.0, 2.0 * (tail + 1) / (d.size + 1))
    return {
        "auc_a": auc_a,
        "auc_b": auc_b,
        "auc_diff": auc_a - auc_b,
        "ci": _percentile_ci(d, confidence),
        "p_value": float(p_value),
        "n_resamples": n_resamples,
        "n_valid": int(d.size),
    }


def roc_band(
    y_true: Any,
    prob_pos: Any,
    groups: Any = None,
    n_resamples: int = 200,
    seed: int = 0,
    *,
    confidence: float = 0.95,
    grid_size: int = 101,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise percentile band of the ROC curve by (cluster) bootstrap.

    Each resampled ROC curve is read at a fixed FPR grid ``linspace(0, 1, grid_size)``
    (linear between ROC points; at an FPR with a vertical segment, the top of it).
    Returns ``(fpr_grid, tpr_lo, tpr_hi)`` for :func:`medtransfer.evaluation.plots.plot_roc`.
    """
    y, s = _binary_inputs(y_true, prob_pos)
    n_resamples, confidence = _check_resampling(n_resamples, confidence)
    _check_grid(grid_size)
    inv, n_groups = _group_index(groups, y.shape[0])
    _require_both_classes(y, "roc_band")
    ranked = _Ranked.build(y, s)
    inv_sorted = inv[ranked.order]
    grid = np.linspace(0.0, 1.0, int(grid_size))
    rng = np.random.default_rng(seed)
    rows = []
    for b in _chunks(n_resamples):
        W = _resample_counts(rng, b, n_groups)[:, inv_sorted].astype(np.float64)
        _, _, tp, fp, P, N, _ = ranked.counts_at_blocks(W)
        valid = (P > 0) & (N > 0)
        for i in np.flatnonzero(valid):
            tpr = np.concatenate(([0.0], tp[i, ::-1] / P[i]))
            fpr = np.concatenate(([0.0], fp[i, ::-1] / N[i]))
            rows.append(_tpr_on_grid(fpr, tpr, grid))
    return _pointwise_band(grid, rows, confidence, what="roc_band", n_groups=n_groups)


def pr_band(
    y_true: Any,
    prob_pos: Any,
    groups: Any = None,
    n_resamples: int = 200,
    seed: int = 0,
    *,
    confidence: float = 0.95,
    grid_size: int = 101,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise percentile band of the precision-recall curve by (cluster) bootstrap.

    Each resampled curve is read as interpolated precision (the best precision at recall
    >= r) on ``linspace(0, 1, grid_size)``. Returns ``(recall_grid, precision_lo,
    precision_hi)`` for :func:`medtransfer.evaluation.plots.plot_pr`.
    """
    y, s = _binary_inputs(y_true, prob_pos)
    n_resamples, confidence = _check_resampling(n_resamples, confidence)
    _check_grid(grid_size)
    inv, n_groups = _group_index(groups, y.shape[0])
    _require_both_classes(y, "pr_band")
    members = [np.flatnonzero(inv == g) for g in range(n_groups)]
    grid = np.linspace(0.0, 1.0, int(grid_size))
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_resamples):
        drawn = np.concatenate([members[g] for g in rng.integers(0, n_groups, n_groups)])
        if y[drawn].min() == y[drawn].max():
            continue  # a single class: no curve
        precision, recall, _ = pr_curve_points(y[drawn], s[drawn])
        best = np.maximum.accumulate(precision)  # recall decreases along the arrays: best at recall >= r
        order = np.argsort(recall, kind="stable")
        rows.append(np.interp(grid, recall[order], best[order]))
    return _pointwise_band(grid, rows, confidence, what="pr_band", n_groups=n_groups)


def _check_grid(grid_size: Any) -> None:
    if isinstance(grid_size, bool) or not isinstance(grid_size, (int, np.integer)) or grid_size < 2:
        raise ConfigError(f"grid_size must be an integer >= 2; got {grid_size!r}.")


def _pointwise_band(
    grid: np.ndarray, rows: list[np.ndarray], confidence: float, *, what: str, n_groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Percentile band over resampled curves read on a common grid."""
    if not rows:
        raise DataError(f"{what}: no resample contained both classes ({n_groups} groups). Use more data.")
    alpha = 1.0 - confidence
    lo, hi = np.quantile(np.vstack(rows), [alpha / 2.0, 1.0 - alpha / 2.0], axis=0)
    return grid, lo, hi


def _tpr_on_grid(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Read a ROC polyline (fpr, tpr non-decreasing) at ``grid``; top of vertical jumps."""
    j = np.searchsorted(fpr, grid, side="right") - 1
    exact = fpr[j] == grid
    nxt = np.minimum(j + 1, fpr.shape[0] - 1)
    span = fpr[nxt] - fpr[j]
    frac = _safe_div(grid - fpr[j], span)
    interp = tpr[j] + frac * (tpr[nxt] - tpr[j])
    return np.where(exact, tpr[j], interp)


# -------------------------------------------------------------------------- DeLong


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.empty(xs.shape[0], dtype=bool)
    new[0] = True
    np.not_equal(xs[1:], xs[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], xs.shape[0])
    block = np.cumsum(new) - 1
    ranks = np.empty(xs.shape[0])
    ranks[order] = ((starts + 1 + ends) / 2.0)[block]
    return ranks


def delong_test(y_true: Any, prob_a: Any, prob_b: Any) -> dict:
    """DeLong's test for two correlated ROC AUCs (DeLong et al. 1988, Biometrics 44:837),
    fast midrank algorithm of Sun & Xu (2014, IEEE SPL 21:1389). Image-level only (no
    patient grouping: use :func:`paired_bootstrap_auc_test` for clustered data).

    Returns ``{"auc_a", "auc_b", "auc_diff" (a - b), "z", "p_value"}`` (two-sided). When
    the two score vectors give identical placements (zero variance of the difference),
    ``z = 0`` and ``p_value = 1``.
    """
    y, sa = _binary_inputs(y_true, prob_a, scores_name="prob_a")
    _, sb = _binary_inputs(y_true, prob_b, scores_name="prob_b")
    if sa.shape != sb.shape:
        raise DataError(f"prob_a and prob_b must have the same length; got {sa.shape[0]} and {sb.shape[0]}.")
    _require_both_classes(y, "delong_test")
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m < 2 or n < 2:
        raise DataError(f"delong_test needs at least 2 samples of each class; got {m} positive and {n} negative.")
    aucs, v10, v01 = [], [], []
    for s in (sa, sb):
        x, z = s[pos], s[neg]
        tx, tz, txz = _midranks(x), _midranks(z), _midranks(np.concatenate((x, z)))
        aucs.append((txz[:m].sum() - m * (m + 1) / 2.0) / (m * n))
        v10.append((txz[:m] - tx) / n)  # per positive: fraction of negatives below it
        v01.append(1.0 - (txz[m:] - tz) / m)  # per negative: fraction of positives above it
    s10 = np.cov(np.vstack(v10))
    s01 = np.cov(np.vstack(v01))
    cov = s10 / m + s01 / n
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    diff = float(aucs[0] - aucs[1])
    if var <= 1e-15:
        z, p = 0.0, 1.0
    else:
        z = diff / math.sqrt(var)
        p = math.erfc(abs(z) / math.sqrt(2.0))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "auc_diff": diff, "z": float(z), "p_value": float(p)}
