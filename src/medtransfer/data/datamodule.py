"""Datasets over cached images and the LightningDataModule that wires them.

The DataModule only wires data: records and cached images come in ready-made, so that
bad images are all listed before training starts and the cache is shared across splits.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medtransfer.data.cache import CachedImages
from medtransfer.errors import DataError

if TYPE_CHECKING:
    from medtransfer.data.transforms import TrainTransform


def image_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 HxW or HxWx3 array -> uint8 CxHxW tensor."""
    if not array.flags.writeable:  # torch cannot wrap read-only memory without copying
        array = array.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)


class LabelledDataset(Protocol):
    """What the data module reads of a dataset: its length, its items and one label per item."""

    @property
    def labels(self) -> Sequence[int]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


class CachedImageDataset(Dataset):
    def __init__(self, images: CachedImages, labels: Sequence[int] | np.ndarray, transform: Callable):
        """`labels`: class indices, or (n, findings) 1 / 0 / NaN targets (multi-label)."""
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

    def __init__(
        self, size: int, *, seed: int, weights: Sequence[float] | None = None, num_replicas: int = 1, rank: int = 0
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.size, self.seed, self.epoch = size, seed, 0
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.num_replicas, self.rank = num_replicas, rank
        self.num_samples = math.ceil(size / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """Every rank draws the same epoch (padded by wrapping to a multiple of the ranks, as
        DistributedSampler pads) and keeps every ``num_replicas``-th item from its rank."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        total = self.num_samples * self.num_replicas
        if self.weights is None:
            order = torch.randperm(self.size, generator=generator)
            order = torch.cat([order, order[: total - self.size]])
        else:
            order = torch.multinomial(self.weights, total, replacement=True, generator=generator)
        seeds = torch.randint(0, 2**62, (total,), generator=generator)
        return iter(zip(order[self.rank :: self.num_replicas].tolist(), seeds[self.rank :: self.num_replicas].tolist()))


def derived_seed(*parts: int) -> int:
    """A 63-bit seed mixed from every part (seed + epoch would make (0, 1) and (1, 0) collide)."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def balanced_sampler(labels: Sequence[int], *, seed: int) -> EpochSampler:
    """Draw each class equally often per epoch (for --sampler balanced)."""
    return EpochSampler(len(labels), seed=seed, weights=balanced_weights(labels).tolist())


class SeededItems(Dataset):
    """``dataset[index]`` computed under the torch seed that :class:`EpochSampler` gave the item;
    the caller's random state is left as it was."""

    def __init__(self, dataset: LabelledDataset):
        self.dataset = dataset
        self.labels = dataset.labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def balanced_weights(labels: Sequence[int]) -> torch.Tensor:
    """Per-sample weights 1 / class count: every class drawn equally often ."""
    counts = np.bincount(labels)
    return torch.as_tensor(1.0 / counts[np.asarray(labels)], dtype=torch.double)


class ShardSampler(Sampler[int]):
    """Every ``num_replicas``-th index from ``rank``, in order, without padding (validation under DDP).

    Unlike DistributedSampler, no image is repeated to even out the shards, so metrics
    reduced over the ranks (sums of values and of counts, as Lightning's ``sync_dist``
    does for batch-weighted means) count each validation image exactly once.
    """

    def __init__(self, length: int, *, num_replicas: int, rank: int):
        self.indices = list(range(rank, length, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def split_fingerprint(*datasets: LabelledDataset) -> str:
    """A digest of the images and labels of `datasets` (the split each rank sees)."""
    digest = hashlib.sha256()
    for dataset in datasets:
        paths = getattr(getattr(dataset, "images", None), "paths", None) or range(len(dataset))
        for path, label in zip(paths, dataset.labels):
            digest.update(f"{path}\t{label}\n".encode())
        digest.update(b"--\n")
    return digest.hexdigest()


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

    def _ranks(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def setup(self, stage: str) -> None:
        """Under DDP: every rank must hold the same split (it is drawn from the seed on each)."""
        world, _ = self._ranks()
        if world > 1 and torch.distributed.is_initialized():
            prints: list[str | None] = [None] * world
            torch.distributed.all_gather_object(prints, split_fingerprint(self.train_set, self.val_set))
            if len(set(prints)) > 1:
                raise DataError("the ranks drew different splits; pass the same --data and --seed on every node")
            if len(self.val_set) < world:
                raise DataError(f"{len(self.val_set)} validation images for {world} processes; use fewer --devices")

    def _sampler(self, dataset: LabelledDataset, *, train: bool) -> Sampler | None:
        """The sampler for one rank: Lightning's sampler replacement is off (use_distributed_sampler=False).

        Training: :class:`EpochSampler` (weighted for --sampler balanced), sharded over the ranks.
        Validation and test: in order, unpadded shards under DDP.
        """
        world, rank = self._ranks()
        if train:
            weights = balanced_weights(dataset.labels).tolist() if self.sampler == "balanced" else None
            return EpochSampler(len(dataset), seed=self.seed, weights=weights, num_replicas=world, rank=rank)
        return None if world == 1 else ShardSampler(len(dataset), num_replicas=world, rank=rank)

    def _loader(self, dataset: CachedImageDataset, *, train: bool) -> DataLoader:
        sampler = self._sampler(dataset, train=train)
        # training: an order and augmentation that depend on (seed, epoch) only, so --resume repeats them
        items: Dataset = SeededItems(dataset) if train else dataset
        return DataLoader(
            items,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Training batches of uint8 images and parameter rows (TrainTransform(on_device=True)) are
        augmented and normalised here, on the device, with each image's own parameters."""
        images, labels = batch
        if isinstance(images, (list, tuple)):  # only TrainTransform(on_device=True) yields (images, params)
            images = cast("TrainTransform", self.train_set.transform).finish(*images)
        return images, labels

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)
