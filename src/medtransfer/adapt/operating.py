"""A new class prior in the saved model: the posterior adjustment folded into the head, and the threshold it implies.

The prior adjustment p' ~ p * pi_t / pi_s (Saerens et al. 2002) of softmax(z / T) is
softmax((z + c) / T) with c_k = T * log(pi_t,k / pi_s,k): a constant added to each class's
logit. It is written into the last Linear layer's bias of every member, so predict, evaluate,
serve and the ONNX export all report the adjusted probabilities with no new model.json field.
The ranking of the images by positive-class probability is unchanged (a monotone map), so the
AUC is the same; only probabilities and, by the rule below, the threshold move.

The threshold (:func:`adapted_threshold`), two rules:

- ``keep`` (default): the run's threshold policy keeps its meaning. Under a pure prior shift
  sensitivity and specificity at a fixed likelihood-ratio cut do not change, so a policy defined
  by them (``youden``: the largest sensitivity + specificity; ``sensitivity:X``; ``specificity:X``)
  keeps its cut: the threshold moves with the posterior, t' = sigmoid(logit(t) + log-odds change),
  and every decision stays as it was. ``f1`` depends on the prior: it is chosen again on the
  validation images re-weighted to the new prior. ``fixed:T`` stays T (a stated cost ratio).
- ``bayes``: the same probability threshold on the adjusted posterior: a fixed ratio of the costs
  of a false positive and a false negative, so the decisions follow the prior (fewer positive
  calls where the disease is rarer). Right when the threshold stands for costs, not for a
  sensitivity/specificity trade-off.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from medtransfer.errors import ConfigError
from medtransfer.evaluation.label_shift import adjust_posteriors, logit_offset
from medtransfer.models.strategies import TransferModel

__all__ = ["RULES", "add_logit_offsets", "adapted_threshold", "fold_logit_map", "fold_prior", "last_linear"]

RULES = ("keep", "bayes")


def last_linear(head: nn.Module) -> nn.Linear:
    """The Linear layer that produces the logits (the head itself, or the last Linear inside an MLP head)."""
    layers = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not layers or layers[-1].bias is None:
        raise ConfigError("the model's classifier has no Linear layer with a bias to fold a prior into; use --method bn")
    return layers[-1]


@torch.no_grad()
def add_logit_offsets(member: TransferModel, offsets: np.ndarray | list[float]) -> list[float]:
    """Add a constant to each class's logit (in place, through the head's last bias); returns the offsets."""
    layer = last_linear(member.head)
    layer.bias.add_(torch.as_tensor(np.asarray(offsets, dtype=np.float64), dtype=layer.bias.dtype, device=layer.bias.device))
    return [float(v) for v in offsets]


def fold_prior(
    member: TransferModel, temperature: float, source_prior: np.ndarray, target_prior: np.ndarray
) -> list[float]:
    """Add T * log(pi_t / pi_s) to the member's logits (in place, through its head's bias); returns the offsets."""
    ratio = np.log(np.asarray(target_prior, dtype=np.float64)) - np.log(np.asarray(source_prior, dtype=np.float64))
    offsets = temperature * ratio
    return add_logit_offsets(member, offsets)


def fold_logit_map(
    member: TransferModel, temperature: float, alpha: float, beta: float, positive_index: int
) -> tuple[float, list[float]]:
    """Make the member's calibrated positive-class logit alpha + beta * (its current one): the new temperature T / beta,
    and alpha * T / beta added to the positive class's logit. Returns (new temperature, offsets)."""
    if not beta > 0:
        raise ValueError(f"fold_logit_map: beta must be positive (it keeps the ranking); got {beta}")
    new_temperature = temperature / beta
    offsets = np.zeros(2)
    offsets[positive_index] = alpha * new_temperature
    return new_temperature, add_logit_offsets(member, offsets)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def _weighted_f1_threshold(is_positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> float:
    """The F1-optimal threshold (predicted positive: score >= t) on weighted samples; midpoint to the next score below."""
    order = np.argsort(-scores, kind="stable")
    s, y, w = scores[order], is_positive[order], weights[order]
    tp, fp = np.cumsum(w * y), np.cumsum(w * (1 - y))
    last = np.append(s[1:] != s[:-1], True)  # cut after each block of tied scores
    f1 = np.where(last, 2 * tp / (tp + fp + (w * y).sum()), -1.0)
    best = int(np.argmax(f1))
    return float(s[best] if best + 1 == len(s) else (s[best] + s[best + 1]) / 2)


def adapted_threshold(
    threshold: float, policy: str | None, rule: str, source_prior: float, target_prior: float, *,
    val_positive_probs: np.ndarray | None = None, val_is_positive: np.ndarray | None = None,
) -> tuple[float, str]:
    """The threshold on the prior-adjusted positive-class probability, and one sentence saying why.
    ``val_*``: the validation images' calibrated positive-class probabilities and 0/1 labels (for ``f1``)."""
    if rule not in RULES:
        raise ConfigError(f"--operating-point: got {rule!r}; choose one of {', '.join(RULES)}")
    kind = (policy or "").split(":")[0]
    if rule == "bayes":
        return threshold, "bayes: the same probability threshold on the adjusted posterior (a fixed cost ratio)"
    if kind == "fixed":
        return threshold, "keep: fixed threshold policy, kept on the adjusted posterior"
    if kind == "f1" and val_positive_probs is not None and val_is_positive is not None:
        y = np.asarray(val_is_positive).astype(int)
        probs = np.column_stack([1 - val_positive_probs, val_positive_probs])
        adjusted = adjust_posteriors(probs, [1 - source_prior, source_prior], [1 - target_prior, target_prior])[:, 1]
        weights = np.where(y == 1, target_prior / source_prior, (1 - target_prior) / (1 - source_prior))
        return _weighted_f1_threshold(y, adjusted, weights), "keep: f1 chosen again on validation re-weighted to the new prior"
    moved = _sigmoid(_logit(threshold) + logit_offset(source_prior, target_prior))
    return moved, (f"keep: the {policy or 'run'}'s cut in likelihood-ratio terms kept (threshold moved with the posterior; "
                   "every decision as before)")
