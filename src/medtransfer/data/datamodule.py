"""Datasets over cached images and the LightningDataModule that wires them.

The DataModule only wires data: records and cached images come in ready-made, so that
bad images are all listed before training starts and the cache is shared across splits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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


class EpochSampler(Sampler):
    """The training order of one epoch as a function of (seed, epoch) only, with a seed per item.

    Yields ``(index, item_seed)``; :class:`SeededItems` applies the item's seed around its
    augmentation. So the images, their order and their random crops in epoch k are the same
    whether the run went straight through or was killed and resumed at epoch k, and whatever
    the number of loader workers. Lightning calls :meth:`set_epoch` before every epoch.
    ``weights`` (one per item) draws with replacement in proportion (``--sampler balanced``);
    without them every item is seen once per epoch, shuffled.
    """

    def __init__(self, size: int, *, seed: int, weights: Sequence[float] | None = None):
        self.size, self.seed, self.epoch = size, seed, 0
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        if self.weights is None:
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        seeds = torch.randint(0, 2**62, (self.size,), generator=generator)
        return iter(zip(order.tolist(), seeds.tolist()))


def derived_seed(*parts: int) -> int:
    """A 63-bit seed mixed from every part (seed + epoch would make (0, 1) and (1, 0) collide)."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def balanced_sampler(labels: Sequence[int], *, seed: int) -> EpochSampler:
    """Draw each class equally often per epoch (for --sampler balanced)."""
    counts = np.bincount(labels)
    return EpochSampler(len(labels), seed=seed, weights=(1.0 / counts[np.asarray(labels)]).tolist())


class SeededItems(Dataset):
    """``dataset[index]`` computed under the torch seed that :class:`EpochSampler` gave the item;
    the caller's random state is left as it was."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.labels = dataset.labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


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
        sampler = None
        if train:  # an order and augmentation that depend on (seed, epoch) only, so --resume repeats them
            balanced = self.sampler == "balanced"
            sampler = balanced_sampler(dataset.labels, seed=self.seed) if balanced else EpochSampler(len(dataset), seed=self.seed)
            dataset = SeededItems(dataset)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
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
