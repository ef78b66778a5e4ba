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
