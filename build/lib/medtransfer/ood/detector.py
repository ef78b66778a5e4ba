"""The fitted detector: which scores, their tensors and thresholds; higher is more foreign.

Three methods, all fitted at the end of training and saved together (``method`` picks the one in use):

- ``mahalanobis`` and ``knn``: on the penultimate features alone (see :mod:`medtransfer.ood.scores`);
- ``multilayer`` (default): Lee et al. 2018's feature ensemble. One Gaussian per backbone stage on
  the stage's per-channel mean and standard deviation, and kNN on the penultimate features; each
  score is standardised by its mean and spread on in-distribution validation images and the
  largest counts, so an image is foreign when any depth finds it far from the training images.
  Early stages see grey levels and texture: an inverted radiograph keeps the anatomy that the
  penultimate features encode, but not the intensity statistics of the first stages.

Every threshold accepts ACCEPT_FRACTION of the validation images. The score is torch ops only,
so the ONNX export computes it in the graph.

    >>> detector = fit_detector(train, train_labels, val, layers=["layer1"])   # doctest: +SKIP
    >>> scores = detector.score(captured)     # {PENULTIMATE: (n, d), "layer1": (n, 2c)}  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from medtransfer.ood.scores import KNN_GROUP, centred_mahalanobis, fit_gaussian, knn_bank, knn_distance, mahalanobis

__all__ = [
    "ACCEPT_FRACTION", "DEFAULT_METHOD", "KNN_BANK_MAX", "KNN_K", "METHODS", "OODDetector", "PENULTIMATE",
    "PENULTIMATE_METHODS", "fit_detector",
]

PENULTIMATE_METHODS = ("mahalanobis", "knn")
METHODS = (*PENULTIMATE_METHODS, "multilayer")
DEFAULT_METHOD = "multilayer"
PENULTIMATE = "penultimate"  # the head's input, next to the layer names in what a forward pass captures
ACCEPT_FRACTION = 0.95  # of in-distribution validation images accepted by the threshold
KNN_K = 10  # the k-th nearest training image; with bank rows of KNN_GROUP images each, the round(k / KNN_GROUP)-th row
KNN_BANK_MAX = 1000  # bank rows (means of KNN_GROUP training features each), so at most 8,000 images grouped


def _layer_key(name: str, part: str) -> str:
    return f"layer.{name}.{part}"


@dataclass
class OODDetector:
    """The fitted scores; ``method`` is the one in use, ``thresholds[method]`` its cut-off.

    ``layers``: submodules of the model's ``net`` whose channel statistics ``multilayer`` reads
    (empty for a detector saved before it existed, which then offers the penultimate methods only).
    """

    method: str
    thresholds: dict[str, float]
    tensors: dict[str, torch.Tensor]
    k: int = KNN_K
    layers: tuple[str, ...] = ()
    info: dict = field(default_factory=dict)  # fitted on: counts, feature widths, acceptance

    @property
    def threshold(self) -> float:
        return self.thresholds[self.method]

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods this detector was fitted with (in METHODS order)."""
        return tuple(m for m in METHODS if m in self.thresholds)

    @property
    def reads(self) -> tuple[str, ...]:
        """The layers whose statistics the method in use reads (none for a penultimate method)."""
        return self.layers if self.method == "multilayer" else ()

    def using(self, method: str) -> OODDetector:
        if method not in self.methods:
            raise ValueError(f"OOD method must be one of {', '.join(self.methods)}; got {method!r}")
        return replace(self, method=method)

    def components(self, captured: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """(n, 1 + layers): kNN on the penultimate features, then each layer's Mahalanobis distance."""
        captured = {PENULTIMATE: captured} if isinstance(captured, torch.Tensor) else captured
        parts = [self.score(captured, "knn")]
        for name in self.layers:
            parts.append(centred_mahalanobis(captured[name].float(), self.tensors[_layer_key(name, "whitening")],
                                             self.tensors[_layer_key(name, "centres")]))
        return torch.stack(parts, dim=1)

    def score(self, captured: Mapping[str, torch.Tensor] | torch.Tensor, method: str | None = None) -> torch.Tensor:
        """(n,) foreignness, float32, from a forward pass's capture (or, for a penultimate method, the (n, d)
        penultimate features alone)."""
        captured = {PENULTIMATE: captured} if isinstance(captured, torch.Tensor) else captured
        method = method or self.method
        if method == "multilayer":
            standardised = (self.components(captured) - self.tensors["multilayer.centre"].to(
                captured[PENULTIMATE].device)) / self.tensors["multilayer.scale"].to(captured[PENULTIMATE].device)
            return standardised.max(dim=1).values
        features = captured[PENULTIMATE].flatten(1).float()
        if method == "mahalanobis":
            return mahalanobis(features, self.tensors["mahalanobis.whitening"], self.tensors["mahalanobis.means"])
        return knn_distance(features, self.tensors["knn.bank"], self.k)

    def flags(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold


def _as_capture(features: Mapping[str, np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
    if not isinstance(features, Mapping):
        features = {PENULTIMATE: features}
    return {name: torch.as_tensor(np.asarray(value, dtype=np.float32)) for name, value in features.items()}


def fit_detector(
    train: Mapping[str, np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor,
    train_labels: np.ndarray,
    val: Mapping[str, np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor,
    *,
    layers: Sequence[str] = (),
    method: str | None = None,
    k: int = KNN_K,
    seed: int = 0,
) -> OODDetector:
    """Fit every score on training features; each threshold accepts ACCEPT_FRACTION of validation.

    `train` / `val`: what :func:`~medtransfer.ood.capture.collect_features` returns (PENULTIMATE and
    each of `layers`), or the penultimate features alone (then ``multilayer`` is not fitted).
    """
    train, val = _as_capture(train), _as_capture(val)
    x = train[PENULTIMATE].numpy()
    labels = np.asarray(train_labels)
    penultimate = fit_gaussian(x, labels)
    penultimate.pop("centres")
    bank = knn_bank(x, KNN_BANK_MAX, seed)
    tensors = {"mahalanobis.whitening": penultimate["whitening"], "mahalanobis.means": penultimate["means"],
               "knn.bank": bank}
    for name in layers:  # one class-agnostic Gaussian per layer: intensity statistics barely depend on the label
        gaussian = fit_gaussian(train[name].numpy())
        for part in ("whitening", "centres"):
            tensors[_layer_key(name, part)] = gaussian[part]
    rows = max(1, min(round(k / KNN_GROUP), len(bank)))
    detector = OODDetector(method or DEFAULT_METHOD, {}, tensors, k=rows, layers=tuple(layers))
    if layers:
        components = detector.components(val).double()
        tensors["multilayer.centre"] = components.mean(dim=0).float()
        tensors["multilayer.scale"] = components.std(dim=0).clamp(min=1e-6).float()
    for name in METHODS if layers else PENULTIMATE_METHODS:
        detector.thresholds[name] = float(np.quantile(detector.score(val, name).numpy(), ACCEPT_FRACTION))
    detector.info = {"train_images": int(len(x)), "val_images": int(len(val[PENULTIMATE])), "feature_dim": int(x.shape[1]),
                     "layer_dims": {name: int(train[name].shape[1]) for name in layers},
                     "accept_fraction": ACCEPT_FRACTION, "knn_bank": int(len(bank)), "knn_group": KNN_GROUP,
                     "knn_note": f"each kNN row is the normalised mean of {KNN_GROUP} nearby training images' features; "
                                 "no single image's features are stored"}
    chosen = method or (DEFAULT_METHOD if layers else "knn")
    return detector.using(chosen)
