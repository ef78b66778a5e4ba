"""Samplers, class weights and the uint8 -> tensor path."""

from collections import Counter

import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from medtransfer.data.datamodule import balanced_sampler, image_tensor
from medtransfer.train.pipeline import class_weights


def test_balanced_sampler_draws_each_class_about_equally():
    labels = [0] * 900 + [1] * 100
    drawn = Counter(labels[i] for i in balanced_sampler(labels, seed=0))
    assert sum(drawn.values()) == 1000
    assert abs(drawn[0] - drawn[1]) < 100


def test_balanced_sampler_is_seeded():
    labels = [0] * 50 + [1] * 10
    assert list(balanced_sampler(labels, seed=1)) == list(balanced_sampler(labels, seed=1))


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


def test_the_distributed_weighted_sampler_shards_one_shared_draw_that_changes_each_epoch():
    import torch

    from medtransfer.data.datamodule import DistributedWeightedSampler, balanced_weights

    labels = [0] * 90 + [1] * 10
    ranks = [DistributedWeightedSampler(balanced_weights(labels), num_replicas=3, rank=r, seed=7) for r in range(3)]
    first = [list(s) for s in ranks]
    assert [len(s) for s in first] == [34, 34, 34] and all(len(s) == 34 for s in ranks)
    # The ranks hold the shards of one draw: interleaved back, it is that draw.
    drawn = torch.multinomial(balanced_weights(labels), 102, True, generator=torch.Generator().manual_seed(7)).tolist()
    assert [first[i % 3][i // 3] for i in range(102)] == drawn
    minority = sum(labels[i] for shard in first for i in shard) / 102
    assert 0.35 < minority < 0.65  # balanced, while the data is 10% class 1
    for sampler in ranks:
        sampler.set_epoch(1)
    assert [list(s) for s in ranks] != first


def test_the_shard_sampler_gives_every_validation_index_to_exactly_one_rank():
    from medtransfer.data.datamodule import ShardSampler

    shards = [list(ShardSampler(5, num_replicas=2, rank=r)) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3]] and sorted(shards[0] + shards[1]) == list(range(5))
