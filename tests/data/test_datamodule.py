"""Samplers, class weights and the uint8 -> tensor path."""

from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch.utils.data import Dataset

from medtransfer.data.datamodule import EpochSampler, SeededItems, TransferDataModule, balanced_sampler, image_tensor
from medtransfer.train.pipeline import class_weights


def test_balanced_sampler_draws_each_class_about_equally():
    labels = [0] * 900 + [1] * 100
    drawn = Counter(labels[i] for i, _ in balanced_sampler(labels, seed=0))
    assert sum(drawn.values()) == 1000
    assert abs(drawn[0] - drawn[1]) < 100


def test_balanced_sampler_is_seeded():
    labels = [0] * 50 + [1] * 10
    assert list(balanced_sampler(labels, seed=1)) == list(balanced_sampler(labels, seed=1))


def test_epoch_sampler_is_a_shuffle_that_depends_on_seed_and_epoch_only():
    sampler = EpochSampler(20, seed=3)
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(20))  # each item once
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    fresh = EpochSampler(20, seed=3)  # a new process resuming at epoch 1 draws the same
    fresh.set_epoch(1)
    assert list(fresh) == second
    assert list(EpochSampler(20, seed=4)) != first


class RandomItems(Dataset):
    """Each item is a random draw, as an augmented image is."""

    labels = [0, 1, 0, 1]

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.rand(3), self.labels[index]


def test_seeded_items_repeat_their_augmentation_and_leave_the_callers_random_state_alone():
    items = SeededItems(RandomItems())
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    first = items[(2, 123)][0]
    assert torch.equal(torch.rand(1), expected_next)
    assert torch.equal(items[(2, 123)][0], first) and not torch.equal(items[(2, 124)][0], first)


@pytest.mark.parametrize("workers", [0, 2])
def test_training_batches_are_the_same_for_any_number_of_workers(workers):
    module = TransferDataModule(train=RandomItems(), val=RandomItems(), batch_size=2, num_workers=workers, seed=5)
    reference = TransferDataModule(train=RandomItems(), val=RandomItems(), batch_size=2, num_workers=0, seed=5)
    for epoch in (0, 1):
        loaders = [m.train_dataloader() for m in (module, reference)]
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
        for (x, y), (x_ref, y_ref) in zip(*loaders):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_balanced_class_weights_equal_scikit_learn():
    labels = [0] * 30 + [1] * 90 + [2] * 5
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=np.array(labels))
    assert class_weights(labels, 3) == pytest.approx(expected.tolist())


@pytest.mark.parametrize("shape, expected", [((5, 7), (1, 5, 7)), ((5, 7, 3), (3, 5, 7))])
def test_image_tensor_shapes_and_read_only_arrays(shape, expected):
    array = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    array.flags.writeable = False
    tensor = image_tensor(array)
    assert tuple(tensor.shape) == expected
    channels_first = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    assert np.array_equal(tensor.numpy(), channels_first)


# ----------------------------------------------------------------- samplers under DDP


def test_the_epoch_sampler_shards_one_shared_weighted_draw_that_changes_each_epoch():
    from medtransfer.data.datamodule import balanced_weights

    labels = [0] * 90 + [1] * 10
    weights = balanced_weights(labels).tolist()
    ranks = [EpochSampler(100, seed=7, weights=weights, num_replicas=3, rank=r) for r in range(3)]
    first = [list(s) for s in ranks]
    assert [len(s) for s in first] == [34, 34, 34] and all(len(s) == 34 for s in ranks)
    # Each rank computes the same draw from (seed, epoch) alone, so a rank built again agrees with itself.
    assert [list(EpochSampler(100, seed=7, weights=weights, num_replicas=3, rank=r)) for r in range(3)] == first
    assert len({seed for shard in first for _, seed in shard}) == 102  # one draw, split: no item seed repeats
    minority = sum(labels[i] for shard in first for i, _ in shard) / 102
    assert 0.35 < minority < 0.65  # balanced, while the data is 10% class 1
    for sampler in ranks:
        sampler.set_epoch(1)
    assert [list(s) for s in ranks] != first


def test_the_epoch_sampler_shards_a_shuffle_so_each_image_is_seen_once_per_epoch():
    ranks = [EpochSampler(10, seed=3, num_replicas=2, rank=r) for r in range(2)]
    indices = sorted(i for sampler in ranks for i, _ in sampler)
    assert indices == list(range(10))
    single = [i for i, _ in EpochSampler(10, seed=3)]
    assert [i for i, _ in ranks[0]] == single[0::2] and [i for i, _ in ranks[1]] == single[1::2]


def test_the_shard_sampler_gives_every_validation_index_to_exactly_one_rank():
    from medtransfer.data.datamodule import ShardSampler

    shards = [list(ShardSampler(5, num_replicas=2, rank=r)) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3]] and sorted(shards[0] + shards[1]) == list(range(5))
