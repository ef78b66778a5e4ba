"""The scores' arithmetic: fitting in numpy (float64), scoring in torch ops only (so ONNX exports them).

- :func:`fit_gaussian` / :func:`mahalanobis` (Lee et al. 2018): the smallest Mahalanobis distance
  to a class mean under one shared covariance, shrunk towards its diagonal scale so that d > n
  still inverts, divided by sqrt(d) so that values are of order 1;
- :func:`knn_bank` / :func:`knn_distance` (Sun et al. 2022): the Euclidean distance of the
  L2-normalised feature to its k-th nearest row of the bank, where each row is the normalised mean
  of KNN_GROUP nearby training features (a coreset: no single training image's features are stored);
- :func:`channel_statistics` (Lee et al. 2018's feature ensemble; the per-channel mean and
  standard deviation of a feature map, as in Gram-matrix / style statistics): what an early
  layer says about intensity, contrast and texture, which the class-discriminative penultimate
  features can ignore (an inverted radiograph keeps its anatomy, not its grey levels).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "KNN_GROUP", "SHRINKAGE", "centred_mahalanobis", "channel_statistics", "fit_gaussian", "knn_bank", "knn_distance",
    "mahalanobis",
]

SHRINKAGE = 0.1  # covariance shrinkage towards (trace / d) * I
KNN_GROUP = 8  # training images averaged into each kNN bank row


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


def knn_bank(x: np.ndarray, limit: int, seed: int, group: int = KNN_GROUP) -> torch.Tensor:
    """What kNN compares with, without keeping any one image's features: at most `limit` rows, each the
    L2-normalised mean of `group` mutually near L2-normalised training features (fewer only when the
    training set itself has fewer), from a seeded subsample of at most `limit` x `group` images.

    Greedy grouping: a seeded random image that is still free takes its `group` - 1 nearest free
    neighbours; the last few images (fewer than `group`) join the nearest group. On the checks in
    tests/ood/test_knn_coreset.py it costs kNN and the multilayer score no measurable AUROC.
    """
    z = np.asarray(x, dtype=np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    if len(z) > limit * group:
        z = z[np.sort(rng.choice(len(z), limit * group, replace=False))]
    single = z.astype(np.float32)  # grouping only; the means are taken in float64
    free = np.ones(len(z), dtype=bool)
    groups: list[np.ndarray] = []
    order = rng.permutation(len(z))
    for chunk in np.array_split(order, max(1, len(order) // 256)):  # similarities to 256 seeds at a time (one GEMM)
        chunk = chunk[free[chunk]]
        columns = single @ single[chunk].T  # unit vectors: nearest = most similar
        for j, start in enumerate(chunk):
            if free.sum() < group:
                break
            if free[start]:
                members = np.argpartition(-np.where(free, columns[:, j], -np.inf), group - 1)[:group]
                free[members] = False
                groups.append(members)
    if not groups:  # fewer images than one group: their one mean
        groups, free = [np.arange(len(z))], np.zeros(len(z), dtype=bool)
    if free.any():  # the rest joins the nearest group
        means = np.stack([z[m].mean(axis=0) for m in groups])
        nearest = (z[free] @ means.T).argmax(axis=1)
        groups = [np.concatenate([m, np.flatnonzero(free)[nearest == i]]) for i, m in enumerate(groups)]
    means = np.stack([z[m].mean(axis=0) for m in groups])
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    return torch.from_numpy(means).float().contiguous()


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
