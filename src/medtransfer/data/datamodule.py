"""Datasets over cached images and the LightningDataModule that wires them.

The DataModule only wires data: records and cached images come in ready-made, so that
bad images are all listed before training starts and the cache is shared across splits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from medtransfer.data.cache import CachedImages


def image_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 HxW or HxWx3 array -> uint8 CxHxW tensor."""
    if not array.flags.writeable:  # torch cannot wrap read-only memory without copying
        array = array.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)


class CachedImageDataset(Dataset):
    def __init__(self, images: CachedImages, labels: Sequence[int], transform: Callable):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(image_tensor(self.images[index])), self.labels[index]


def balanced_sampler(labels: Sequence[int], *, seed: int) -> WeightedRandomSampler:
    """Draw each class equally often per epoch (for --sampler balanced)."""
    counts = np.bincount(labels)
    weights = 1.0 / counts[np.asarray(labels)]
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(labels), generator=generator)


class TransferDataModule(L.LightningDataModule):
    def __init__(
        self,
        *,
        train: CachedImageDataset,
        val: CachedImageDataset,
        batch_size: int,
        num_workers: int,
        pin_memory: bool = False,
        sampler: str = "shuffle",
        seed: int = 0,
    ):
        super().__init__()
        self.train_set, self.val_set = train, val
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.sampler, self.seed = sampler, seed

    def _loader(self, dataset: Dataset, *, train: bool) -> DataLoader:
        sampler = balanced_sampler(dataset.labels, seed=self.seed) if train and self.sampler == "balanced" else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)
