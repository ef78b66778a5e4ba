"""The task kind: what the network's outputs mean, how they are trained, scored and decided.

Two kinds, asked by data, models, evaluation, artifacts, predict, serve and export alike
instead of each branching on its own:

- ``single-label``: one class per image; softmax over the classes, cross-entropy, one
  temperature, a threshold on the positive class (two classes) or the argmax;
- ``multi-label``: any number of findings per image (NIH ChestX-ray14, CheXpert, MIMIC-CXR);
  one sigmoid per finding, binary cross-entropy with unknown labels masked out, one
  temperature and one threshold per finding (CheXNet, Rajpurkar et al. 2017; CheXpert,
  Irvin et al. 2019).

Multi-label targets are float arrays ``(n, findings)`` holding 1 (present), 0 (absent) or
NaN (unknown: blank in the source, or uncertain under ``--uncertain ignore``). A record's
``label`` then lists the findings present, ``|``-joined (NIH's ``Finding Labels``
convention; the empty string when none is present) and its ``masked`` the unknown ones.

    >>> task = Task("multi-label", ("Effusion", "Mass"))
    >>> task.targets(["Mass", ""], [(), ("Effusion",)]).tolist()
    [[0.0, 1.0], [nan, 0.0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np

from medtransfer.errors import ConfigError, DataError

if TYPE_CHECKING:  # torch is imported where a loss is computed: config reads the task kinds without it
    import torch

SINGLE_LABEL = "single-label"
MULTI_LABEL = "multi-label"
TASK_KINDS = (SINGLE_LABEL, MULTI_LABEL)
LABEL_SEPARATOR = "|"
NO_FINDING = "No Finding"  # NIH's label for an image with none of the findings
UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")  # CheXpert's U-Ones, U-Zeros, U-Ignore


def check_task_kind(kind: str) -> str:
    if kind not in TASK_KINDS:
        raise ConfigError(f"task: got {kind!r}; choose one of {', '.join(TASK_KINDS)}")
    return kind


def split_findings(label: str) -> list[str]:
    """The findings of a ``|``-joined label; ``No Finding`` and blanks name none.

    >>> split_findings("Effusion|Mass"), split_findings("No Finding")
    (['Effusion', 'Mass'], [])
    """
    return [part.strip() for part in label.split(LABEL_SEPARATOR) if part.strip() and part.strip() != NO_FINDING]


def join_findings(findings: Sequence[str]) -> str:
    return LABEL_SEPARATOR.join(findings)


@dataclass(frozen=True)
class Task:
    """The kind and the output names (classes, or findings for multi-label), in output order."""

    kind: str
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        check_task_kind(self.kind)
        object.__setattr__(self, "classes", tuple(self.classes))
        minimum = 1 if self.multilabel else 2
        if len(self.classes) < minimum or len(set(self.classes)) != len(self.classes):
            what = "finding" if self.multilabel else "classes"
            raise DataError(f"a {self.kind} task needs at least {minimum} distinct {what}; got {list(self.classes)}")

    @property
    def multilabel(self) -> bool:
        return self.kind == MULTI_LABEL

    @property
    def num_outputs(self) -> int:
        return len(self.classes)

    # ------------------------------------------------------------------ targets

    def targets(self, labels: Sequence[str], masked: Sequence[Sequence[str]] | None = None) -> np.ndarray:
        """Class indices (n,) for single-label; 1 / 0 / NaN (n, findings) float32 for multi-label."""
        if not self.multilabel:
            index = {c: i for i, c in enumerate(self.classes)}
            unknown = sorted({label for label in labels if label not in index})
            if unknown:
                raise DataError(f"labels {unknown[:5]} are not among the classes {list(self.classes)}")
            return np.asarray([index[label] for label in labels], dtype=np.int64)
        masked = masked if masked is not None else [()] * len(labels)
        out = np.zeros((len(labels), self.num_outputs), dtype=np.float32)
        column = {c: i for i, c in enumerate(self.classes)}
        for row, (label, masked_here) in enumerate(zip(labels, masked)):
            for finding in split_findings(label):
                if finding in column:
                    out[row, column[finding]] = 1.0
            for finding in masked_here:
                if finding in column:
                    out[row, column[finding]] = np.nan
        return out

    def label_of(self, target: np.ndarray) -> str:
        """A target row back to its label text (multi-label: the findings present, ``|``-joined)."""
        if not self.multilabel:
            return self.classes[int(target)]
        return join_findings([c for c, v in zip(self.classes, np.asarray(target)) if v == 1])

    # ------------------------------------------------------------------ outputs

    def probabilities(self, logits: np.ndarray, temperature: float | Sequence[float] = 1.0) -> np.ndarray:
        """softmax(logits / T) per row, or sigmoid(logits_k / T_k) per finding, in float64."""
        z = np.asarray(logits, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] != self.num_outputs:
            raise DataError(f"logits must be (n, {self.num_outputs}) for {list(self.classes)}; got shape {z.shape}")
        t = np.asarray(temperature, dtype=np.float64)
        if self.multilabel:
            return _sigmoid(z / (t if t.ndim else np.full(self.num_outputs, float(t))))
        if t.ndim:
            raise DataError(f"a single-label task has one temperature; got {t.tolist()}")
        z = z / float(t)
        z = z - z.max(axis=1, keepdims=True)
        return np.exp(z - np.log(np.exp(z).sum(axis=1, keepdims=True)))

    def decide(self, probabilities: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
        """Multi-label: 1 where a finding's probability reaches its threshold, (n, findings) int."""
        if not self.multilabel:
            raise DataError("decide() with per-output thresholds is for multi-label tasks")
        return (np.asarray(probabilities) >= np.asarray(thresholds, dtype=np.float64)[None, :]).astype(np.int64)

    # ------------------------------------------------------------------ training

    def loss(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        *,
        weight: torch.Tensor | None = None,
        focal_gamma: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Cross-entropy (or focal) for single-label; masked binary cross-entropy (or focal) for multi-label.

        Multi-label ``weight`` is each finding's positive weight (negatives / positives under
        ``--class-weights balanced``); unknown targets (NaN) add nothing and count for nothing.
        """
        import torch
        from torch import nn

        logits = logits.float()
        if not self.multilabel:
            return _single_label_loss(logits, targets, weight, focal_gamma, label_smoothing)
        targets = targets.float()
        known = ~torch.isnan(targets)
        clean = torch.where(known, targets, torch.zeros_like(targets))
        if label_smoothing > 0:
            clean = clean * (1 - label_smoothing) + 0.5 * label_smoothing
        per_item = nn.functional.binary_cross_entropy_with_logits(logits, clean, pos_weight=weight, reduction="none")
        if focal_gamma > 0:
            # Focal loss (Lin et al. 2017) per finding: p_t of the true side of each sigmoid.
            p = torch.sigmoid(logits)
            p_true = torch.where(clean > 0.5, p, 1 - p)
            per_item = per_item * (1 - p_true) ** focal_gamma
        per_item = torch.where(known, per_item, torch.zeros_like(per_item))
        return per_item.sum() / known.sum().clamp(min=1)

    def hits(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(correct decisions, decisions) at argmax, or at 0.5 per known finding for multi-label."""
        import torch

        if not self.multilabel:
            return (logits.argmax(dim=1) == targets).sum(), targets.new_tensor(len(targets))
        known = ~torch.isnan(targets.float())
        correct = ((logits.float() >= 0) == (targets > 0.5)) & known
        return correct.sum(), known.sum()


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    exp = np.exp(z[~positive])
    out[~positive] = exp / (1.0 + exp)
    return out


def _single_label_loss(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None, focal_gamma: float, label_smoothing: float
) -> torch.Tensor:
    import torch
    from torch import nn

    if focal_gamma > 0:
        # Focal loss (Lin et al. 2017): down-weights easy examples; class weights act as alpha.
        log_p = torch.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
        loss = -((1 - log_p.exp()) ** focal_gamma) * log_p
        if weight is not None:
            return (loss * weight[labels]).sum() / weight[labels].sum()
        return loss.mean()
    return nn.functional.cross_entropy(logits, labels, weight=weight, label_smoothing=label_smoothing)


def positive_weights(targets: np.ndarray) -> list[float]:
    """Per-finding BCE positive weights negatives / positives over the known labels ('balanced')."""
    known = ~np.isnan(targets)
    positives = np.where(known, targets == 1, False).sum(axis=0).astype(float)
    negatives = np.where(known, targets == 0, False).sum(axis=0).astype(float)
    return (negatives / np.maximum(positives, 1.0)).tolist()
