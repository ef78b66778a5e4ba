"""Out-of-distribution guard: how foreign an image looks to the model's own backbone.

At the end of training a detector is fitted on the training split's penultimate features
(the pooled backbone output the head reads) and its threshold set on validation so that
95% of in-distribution validation images are accepted. Two published scores are fitted:

- ``mahalanobis`` (Lee et al. 2018): the smallest Mahalanobis distance to a class mean under
  one shared covariance (shrunk towards its diagonal scale so that d > n still inverts),
  divided by sqrt(d) so that values are of order 1;
- ``knn`` (Sun et al. 2022): the Euclidean distance of the L2-normalised feature to its k-th
  nearest L2-normalised training feature.

Higher is more foreign for both. Both are saved (model/ood.safetensors + model/ood.json, no
pickle); ``method`` in ood.json picks the one predict, evaluate, serve and export use
(default :data:`DEFAULT_METHOD`, the better on ``benchmarks/ood.py``).

    >>> detector = fit_detector(train_x, train_y, val_x)          # doctest: +SKIP
    >>> scores = detector.score(torch.as_tensor(features))        # doctest: +SKIP
    >>> flags = scores > detector.threshold                       # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medtransfer.errors import WeightsError
from medtransfer.safeio import atomic_path, write_text_atomic

__all__ = [
    "ACCEPT_FRACTION", "DEFAULT_METHOD", "METHODS", "OOD_JSON", "OOD_WEIGHTS", "OODDetector", "ScoredModel",
    "fit_detector", "load_detector", "save_detector",
]

METHODS = ("mahalanobis", "knn")
DEFAULT_METHOD = "knn"
ACCEPT_FRACTION = 0.95  # of in-distribution validation images accepted by the threshold
OOD_WEIGHTS = "ood.safetensors"
OOD_JSON = "ood.json"
KNN_K = 10
KNN_BANK_MAX = 5000  # training features kept for kNN (a seeded subsample beyond this; Sun et al. show it suffices)
SHRINKAGE = 0.1  # covariance shrinkage towards (trace / d) * I
_FIX = "Train the model again with `medtransfer train`, or delete ood.json and ood.safetensors to run without the guard."


@dataclass
class OODDetector:
    """Both fitted scores; ``method`` is the one in use, ``thresholds[method]`` its cut-off."""

    method: str
    thresholds: dict[str, float]
    tensors: dict[str, torch.Tensor]  # mahalanobis.whitening (d x d), mahalanobis.means (classes x d), knn.bank (n x d)
    k: int = KNN_K
    info: dict = field(default_factory=dict)  # fitted on: counts, feature width, acceptance

    @property
    def threshold(self) -> float:
        return self.thresholds[self.method]

    def using(self, method: str) -> OODDetector:
        if method not in METHODS:
            raise ValueError(f"OOD method must be one of {', '.join(METHODS)}; got {method!r}")
        return replace(self, method=method)

    def score(self, features: torch.Tensor, method: str | None = None) -> torch.Tensor:
        """(n,) foreignness of (n, d) penultimate features, float32; torch ops only, so ONNX exports them."""
        features = features.flatten(1).float()
        if (method or self.method) == "mahalanobis":
            whitening = self.tensors["mahalanobis.whitening"].to(features.device)
            means = self.tensors["mahalanobis.means"].to(features.device)  # already whitened
            z = features @ whitening
            squared = (z * z).sum(1, keepdim=True) - 2 * z @ means.T + (means * means).sum(1)[None, :]
            return torch.sqrt(torch.clamp(squared.min(dim=1).values, min=0.0) / features.shape[1])
        bank = self.tensors["knn.bank"].to(features.device)
        z = features / torch.clamp(features.norm(dim=1, keepdim=True), min=1e-12)
        similarity = torch.topk(z @ bank.T, self.k, dim=1).values[:, -1]
        return torch.sqrt(torch.clamp(2.0 - 2.0 * similarity, min=0.0))

    def flags(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold


def fit_detector(
    train_features: np.ndarray | torch.Tensor,
    train_labels: np.ndarray,
    val_features: np.ndarray | torch.Tensor,
    *,
    method: str = DEFAULT_METHOD,
    k: int = KNN_K,
    seed: int = 0,
) -> OODDetector:
    """Fit both scores on training features; each threshold accepts ACCEPT_FRACTION of validation."""
    x = np.asarray(train_features, dtype=np.float64)
    y = np.asarray(train_labels)
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    covariance = centred.T @ centred / max(1, len(x) - len(classes))
    scale = np.trace(covariance) / covariance.shape[0] or 1.0
    covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * scale * np.eye(covariance.shape[0])
    whitening = np.linalg.cholesky(np.linalg.inv(covariance))  # P = W W^T, so (f-m)^T P (f-m) = |(f-m) W|^2
    normalised = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if len(normalised) > KNN_BANK_MAX:
        normalised = normalised[np.sort(np.random.default_rng(seed).choice(len(normalised), KNN_BANK_MAX, replace=False))]
    tensors = {
        "mahalanobis.whitening": torch.from_numpy(whitening).float().contiguous(),
        "mahalanobis.means": torch.from_numpy(means @ whitening).float().contiguous(),
        "knn.bank": torch.from_numpy(normalised).float().contiguous(),
    }
    detector = OODDetector(method, {}, tensors, k=min(k, len(normalised)))
    val = torch.as_tensor(np.asarray(val_features, dtype=np.float32))
    for name in METHODS:
        detector.thresholds[name] = float(np.quantile(detector.score(val, name).numpy(), ACCEPT_FRACTION))
    detector.info = {"train_images": int(len(x)), "val_images": int(len(val)), "feature_dim": int(x.shape[1]),
                     "accept_fraction": ACCEPT_FRACTION, "knn_bank": int(len(normalised))}
    return detector.using(method)


# ---------------------------------------------------------------------- files


def save_detector(detector: OODDetector, model_dir: Path) -> None:
    """ood.safetensors (tensors) and ood.json (method, thresholds, k, what it was fitted on); the JSON last."""
    model_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(model_dir / OOD_WEIGHTS) as temporary:
        save_file({k: v.contiguous() for k, v in detector.tensors.items()}, str(temporary))
    payload = {"method": detector.method, "thresholds": detector.thresholds, "k": detector.k,
               "methods": list(METHODS), **detector.info}
    write_text_atomic(model_dir / OOD_JSON, json.dumps(payload, indent=2))


def load_detector(model_dir: Path) -> OODDetector | None:
    """The saved detector, or None for a model saved before the guard existed (no ood.json)."""
    json_path = model_dir / OOD_JSON
    if not json_path.is_file():
        return None
    try:
        data = json.loads(json_path.read_text())
        method, thresholds, k = data["method"], {m: float(data["thresholds"][m]) for m in METHODS}, int(data["k"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{json_path}: not a valid OOD detector file ({type(exc).__name__}: {exc}). {_FIX}") from None
    if method not in METHODS:
        raise WeightsError(f"{json_path}: field 'method' must be one of {', '.join(METHODS)}; got {method!r}. {_FIX}")
    weights = model_dir / OOD_WEIGHTS
    if not weights.is_file():
        raise WeightsError(f"{weights}: missing (ood.json names it). {_FIX}")
    tensors = load_file(str(weights))
    expected = {"mahalanobis.whitening", "mahalanobis.means", "knn.bank"}
    if set(tensors) != expected:
        raise WeightsError(f"{weights}: holds {sorted(tensors)}; expected {sorted(expected)}. {_FIX}")
    info = {key: value for key, value in data.items() if key not in ("method", "thresholds", "k", "methods")}
    return OODDetector(method, thresholds, tensors, k=k, info=info)


# ---------------------------------------------------------------------- logits and score in one pass


class ScoredModel(nn.Module):
    """The classifier returning (logits, ood_score): the head's input is captured on the way.

    One forward pass for both, for predict, evaluate, serve and the ONNX export.
    """

    def __init__(self, model: nn.Module, detector: OODDetector):  # a models.strategies.TransferModel
        super().__init__()
        self.model = model
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        handle = self.model.head.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            logits = self.model(images)
        finally:
            handle.remove()
        return logits, self.detector.score(captured[0])


class LogitsAndScore(nn.Module):
    """ScoredModel with one output, (n, classes + 1): logits then the score, for runtime.predict_logits."""

    def __init__(self, scored: ScoredModel):
        super().__init__()
        self.scored = scored

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits, score = self.scored(images)
        return torch.cat([logits.float(), score[:, None].float()], dim=1)
