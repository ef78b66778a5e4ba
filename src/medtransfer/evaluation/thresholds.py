"""Threshold policies and the operating point fitted on validation.

A policy (``youden``, ``f1``, ``sensitivity:X``, ``specificity:X``, ``fixed:T``) says how
the decision threshold is chosen on the validation split, never on test; the
:class:`OperatingPoint` (temperature and threshold) is then applied unchanged to every
other split and to new images.

Example
-------
>>> policy = parse_threshold_policy("youden")
>>> choose_threshold([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], policy)
0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation.calibration import apply_temperature
from medtransfer.artifacts import ModelInfo, predicted_classes
from medtransfer.evaluation.metrics import RankedScores, binary_inputs, require_both_classes

__all__ = ["OperatingPoint", "ThresholdPolicy", "choose_threshold", "parse_threshold_policy"]


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
        if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                or not (0.0 <= v <= 1.0 if self.kind == "fixed" else 0.0 < v <= 1.0)):
            raise ConfigError(f"--threshold: got {text!r}; expected {_POLICY_FORMS}.")
        object.__setattr__(self, "value", float(v))

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"

    @property
    def target(self) -> float:
        """The value of ``fixed``, ``sensitivity`` and ``specificity`` (the threshold, or the rate to reach)."""
        if self.value is None:
            raise ConfigError(f"--threshold: {self.kind} takes no value; expected {_POLICY_FORMS}.")
        return self.value


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
        return float(policy.target)
    y, s = binary_inputs(y_true, prob_pos)
    require_both_classes(y, f"threshold policy {str(policy)!r}")
    ranked = RankedScores.build(y, s)
    _, _, tp, fp, P, N, _ = ranked.counts_at_blocks(ranked.unit_weights())
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


@dataclass
class OperatingPoint:
    """What is fitted on validation and applied everywhere else."""

    positive_index: int
    temperature: float
    threshold: float
    policy: str

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return apply_temperature(logits, self.temperature)

    @classmethod
    def from_info(cls, info: ModelInfo) -> OperatingPoint:
        """The operating point a saved model carries in its model.json."""
        positive_index = info.positive_index  # a ConfigError for a multi-label model
        assert info.threshold is not None, "a single-label model.json has a threshold (checked on load)"
        return cls(positive_index, info.temperature, info.threshold, info.threshold_policy or "")

    def predict(self, probs: np.ndarray) -> np.ndarray:
        """Binary: positive when p >= threshold. N classes: argmax (threshold applies to positive-vs-rest metrics)."""
        return predicted_classes(probs, self.positive_index, self.threshold)  # the saved model's own rule
