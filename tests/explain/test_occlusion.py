"""Occlusion sensitivity: the patch grid, the mean drop per pixel, and the model left as it was."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

from medtransfer.errors import ConfigError
from medtransfer.explain import occlusion as occlusion_module
from medtransfer.explain.cam import LAYER_FREE, ClassActivationMap
from medtransfer.explain.occlusion import occlusion_sensitivity


def test_occlusion_needs_no_layer_and_leaves_the_model_as_it_was(transfer_model, hooks_left):
    model = transfer_model("resnet18")
    modes = {n: m.training for n, m in model.named_modules()}
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with ClassActivationMap(model, method="occlusion") as cam:
        result = cam(image, class_index=1)
        assert hooks_left(model) == []
    assert cam.target_layer == LAYER_FREE and result.target_layer == LAYER_FREE
    with pytest.raises(ConfigError, match="--target-layer 'layer4': --method occlusion reads no layer"):
        ClassActivationMap(model, method="occlusion", target_layer="layer4")
    assert result.map_cells == (15, 15)  # 8 px patches every 4 px over 64 px
    assert result.maps.shape == (1, 64, 64) and 0 <= result.maps.min() <= result.maps.max() == 1
    assert {n: m.training for n, m in model.named_modules()} == modes
    model.eval()  # the maps explain the model in eval mode, as prediction uses it
    with torch.no_grad():
        expected = model(image)
    for name, module in model.named_modules():
        module.training = modes[name]
    torch.testing.assert_close(result.logits, expected)


def test_occlusion_map_is_the_mean_drop_of_the_patches_covering_each_pixel(mean_of_feature):
    # MeanOfFeature's class-1 logit is the image mean; a 64 px image with one bright pixel:
    # occluding it lowers the logit only for patches that cover that pixel.
    image = torch.zeros(1, 1, 64, 64)
    image[0, 0, 30, 41] = 64.0 * 64.0 / 16  # the logit drops by 1/16 of this when covered
    with ClassActivationMap(mean_of_feature(), method="occlusion") as cam:
        result = cam(image, class_index=1)
    heat = result.maps[0]
    assert heat[30, 41] == 1.0
    assert heat[:, :20].max() == 0 and heat[:18].max() == 0  # no patch over those pixels covers the bright one


@pytest.mark.parametrize(
    ("height", "width", "cells"),
    # patch = round(side / 8) px, moved by half a patch, the last one flush with the far edge:
    # 64: 8 px from 0 to 56 by 4 -> 15; 30: 4 px from 0 to 26 by 2 -> 14;
    # 50: 6 px at 0, 3, ..., 42 and the flush 44 -> 16; 7: 1 px patches -> 7.
    [(64, 64, (15, 15)), (30, 50, (14, 16)), (7, 7, (7, 7))],
)
def test_patch_grid_covers_every_pixel(height, width, cells):
    model = nn.Sequential(nn.Flatten(), nn.Linear(height * width, 2))
    images = torch.randn(2, 1, height, width, generator=torch.Generator().manual_seed(0))
    maps, grid = occlusion_sensitivity(model, images, torch.tensor([0, 1]))
    assert grid == cells
    assert maps.shape == (2, height, width)
    assert torch.isfinite(maps).all() and maps.min() >= 0  # every pixel under a patch; drops clipped at 0


def test_given_logits_are_used_as_the_reference(mean_of_feature):
    model = mean_of_feature()
    images = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    index = torch.tensor([1])
    computed, _ = occlusion_sensitivity(model, images, index)
    with torch.no_grad():
        given, _ = occlusion_sensitivity(model, images, index, logits=model(images))
        shifted, _ = occlusion_sensitivity(model, images, index, logits=model(images) + torch.tensor([[-1.0, 1.0]]))
    torch.testing.assert_close(given, computed)
    assert (shifted > computed).all()  # a higher reference score: every occlusion drops it further


def test_docstring_examples_run():
    failures, tried = doctest.testmod(occlusion_module)
    assert tried > 0 and failures == 0
