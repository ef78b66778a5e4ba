"""Placement of map cells: measured stride and offset per backbone, upsampling, once per model object."""

from __future__ import annotations

import copy
import doctest
import gc
import weakref

import pytest
import torch
from torch import nn

from medtransfer.explain import grid as grid_module
from medtransfer.explain.cam import ClassActivationMap
from medtransfer.explain.grid import FeatureGrid, feature_grid, input_channels, upsample


@pytest.mark.parametrize(
    ("name", "expected_offset"),
    # ResNet/EfficientNet: odd kernels with symmetric padding put cell i at 32 i. DenseNet's
    # three 2x2 average-pool transitions each add half their input stride: 2 + 4 + 8 = 14.
    [("resnet18", 0.0), ("efficientnet_lite0", 0.0), ("densenet121", 14.0)],
)
def test_feature_grid_of_registered_backbones(name, expected_offset, transfer_model):
    model = transfer_model(name)
    grid = feature_grid(model.net, model.spec.cam_layer)
    assert grid.stride == 32
    assert grid.offset_y == pytest.approx(expected_offset, abs=3)
    assert grid.offset_x == pytest.approx(expected_offset, abs=3)


def test_upsample_places_cells_at_grid_centres_and_holds_the_border():
    cells = torch.zeros(1, 3, 3)
    cells[0, 1, 2] = 1.0
    grid = FeatureGrid(stride=10.0, offset_y=2.0, offset_x=2.0)
    maps = upsample(cells, (30, 30), grid)
    assert maps[0, 12, 22] == pytest.approx(1.0)  # cell (1, 2) is centred on pixel (2 + 10, 2 + 20)
    assert maps[0, 12, 29] == pytest.approx(1.0)  # beyond the last centre the border value is held
    assert maps[0, 12, 17] == pytest.approx(0.5)  # halfway between cell centres
    assert maps[0, 0, 0] == 0.0
    plain = upsample(cells, (30, 30), None)
    assert plain[0, 12, 22] < plain[0, 14, 25] == plain.max()  # usual resize: cell (1, 2) drawn at (14.5, 24.5)


def test_cells_are_placed_the_same_inside_inference_mode(transfer_model):
    # Callers such as prediction code may run under torch.inference_mode(); the probe needs autograd.
    model = copy.deepcopy(transfer_model("resnet18"))  # a new object: its cells are placed inside the block below
    image = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), ClassActivationMap(model, method="gradcam") as cam:
        inside = cam(image, class_index=1)
    assert cam.grid is not None and cam.grid.stride == 32
    with ClassActivationMap(model, method="gradcam") as cam:
        outside = cam(image, class_index=1)
    assert torch.allclose(inside.maps, outside.maps, atol=1e-5)


def _strided(stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=stride, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1))


def test_grid_is_measured_once_per_model_object_and_goes_with_it():
    model = _strided(2)
    first = feature_grid(model, "2")
    assert first.stride == 4 and abs(first.offset_y) < 1 and abs(first.offset_x) < 1  # 3x3 kernels, symmetric padding
    assert feature_grid(model, "2") is first  # kept, not measured again
    assert feature_grid(model, "0").stride == 2  # another layer of the same model: its own measurement
    other = _strided(1)  # another object: measured for itself, nothing to clear by hand
    assert feature_grid(other, "2").stride == 2
    gone = weakref.ref(model)
    del model, first
    gc.collect()
    assert gone() is None  # the measurement does not keep the model alive


@pytest.mark.parametrize(
    ("model", "layer"),
    [
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 2)), "0"),  # only takes 32 px input
        (nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.AdaptiveAvgPool2d(1)), "1"),  # one cell: nothing to place
    ],
)
def test_no_grid_when_the_probe_cannot_place_cells(model, layer):
    assert feature_grid(model, layer) is None


@pytest.mark.parametrize(
    ("model", "channels"),
    [(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 5, 3)), 1), (nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), 3)],
)
def test_input_channels_is_that_of_the_first_convolution(model, channels):
    assert input_channels(model) == channels


def test_docstring_examples_run():
    failures, tried = doctest.testmod(grid_module)
    assert tried > 0 and failures == 0
