"""The scores' arithmetic: fitting in numpy (float64), scoring in torch ops only (so ONNX exports them).

- :func:`fit_gaussian` / :func:`mahalanobis` (Lee et al. 2018): the smallest Mahalanobis distance
  to a class mean under one shared covariance, shrunk towards its diagonal scale so that d > n
  still inverts, divided by sqrt(d) so that values are of order 1;
- :func:`knn_bank` / :func:`knn_distance` (Sun et al. 2022): the Euclidean distance of the
  L2-normalised feature to its k-th nearest L2-normalised training feature;
- :func:`channel_statistics` (Lee et al. 2018's feature ensemble; the per-channel mean and
  standard deviation of a feature map, as in Gram-matrix / style statistics): what an early
  layer says about intensity, contrast and texture, which the class-discriminative penultimate
  features can ignore (an inverted radiograph keeps its anatomy, not its grey levels).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["SHRINKAGE", "centred_mahalanobis", "channel_statistics", "fit_gaussian", "knn_bank", "knn_distance", "mahalanobis"]

SHRINKAGE = 0.1  # covariance shrinkage towards (trace / d) * I


def fit_gaussian(x: np.ndarray, labels: np.ndarray | None = None, shrinkage: float = SHRINKAGE) -> dict[str, torch.Tensor]:
    """Class means (one mean without labels) and the whitening W of their shared, shrunk covariance.

    P = W W^T is the precision, so (f - m)^T P (f - m) = |(f - m) W|^2 = |f W - m W|^2: "centres" are the
    means, "means" the whitened means (the first guard's form, kept for its files).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.zeros(len(x), dtype=int) if labels is None else np.asarray(labels)
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    covariance = centred.T @ centred / max(1, len(x) - len(classes))
    scale = np.trace(covariance) / covariance.shape[0] or 1.0
    covariance = (1 - shrinkage) * covariance + shrinkage * scale * np.eye(covariance.shape[0])
    whitening = np.linalg.cholesky(np.linalg.inv(covariance))
    return {"whitening": torch.from_numpy(whitening).float().contiguous(),
            "means": torch.from_numpy(means @ whitening).float().contiguous(),
            "centres": torch.from_numpy(means).float().contiguous()}


def mahalanobis(features: torch.Tensor, whitening: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """(n,) smallest Mahalanobis distance to a (whitened) mean, / sqrt(d)."""
    z = features @ whitening.to(features.device)
    means = means.to(features.device)
    squared = (z * z).sum(1, keepdim=True) - 2 * z @ means.T + (means * means).sum(1)[None, :]
    return torch.sqrt(torch.clamp(squared.min(dim=1).values, min=0.0) / features.shape[1])


def centred_mahalanobis(features: torch.Tensor, whitening: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """:func:`mahalanobis` from the centred difference: no cancellation of large terms, so float32 runs of
    the same score (PyTorch, onnxruntime) agree to about 1e-6 even when features sit far from the origin."""
    whitening = whitening.to(features.device)
    z = (features[:, None, :] - centres.to(features.device)[None]) @ whitening  # (n, classes, d)
    squared = (z * z).sum(dim=2)
    return torch.sqrt(squared.min(dim=1).values / features.shape[1])


def knn_bank(x: np.ndarray, limit: int, seed: int) -> torch.Tensor:
    """L2-normalised training features, a seeded subsample of `limit` rows beyond it (Sun et al. show it suffices)."""
    x = np.asarray(x, dtype=np.float64)
    normalised = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if len(normalised) > limit:
        normalised = normalised[np.sort(np.random.default_rng(seed).choice(len(normalised), limit, replace=False))]
    return torch.from_numpy(normalised).float().contiguous()


def knn_distance(features: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """(n,) distance of each L2-normalised row to its k-th nearest bank row."""
    z = features / torch.clamp(features.norm(dim=1, keepdim=True), min=1e-12)
    bank = bank.to(features.device)
    neighbour = bank[torch.topk(z @ bank.T, k, dim=1).indices[:, -1]]
    # |z - b| itself, not sqrt(2 - 2 z.b): near neighbours have z.b close to 1, where that cancels
    return (z - neighbour).norm(dim=1)


def channel_statistics(maps: torch.Tensor) -> torch.Tensor:
    """(n, 2c): per-channel spatial mean, then standard deviation, of an (n, c, h, w) feature map."""
    maps = maps.float().flatten(2)
    mean = maps.mean(dim=2)
    std = torch.sqrt(((maps - mean[:, :, None]) ** 2).mean(dim=2) + 1e-6)  # two passes: no cancellation
    return torch.cat([mean, std], dim=1)
