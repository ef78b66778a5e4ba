"""Spatial layers of a network: the dry run, the candidates, the stage at a stride."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

from medtransfer.errors import ConfigError
from medtransfer.explain import layers as layers_module
from medtransfer.explain.layers import candidate_layers, eval_mode, spatial_layers, stride_layer
from medtransfer.models.backbones import create_backbone


@pytest.mark.parametrize(
    ("name", "output_stride", "expected"),
    [
        ("resnet18", 32, "layer3"),
        ("efficientnet_lite0", 32, "blocks.4"),  # not blocks.5.0.conv_pw, which also runs at stride 16
        ("efficientnet_lite0", 16, "bn2"),  # the last stage dilated: the last layer is at stride 16
        ("densenet121", 32, "features.denseblock3"),
    ],
)
def test_stride_16_stage_of_each_backbone(name, output_stride, expected, hooks_left):
    net, _ = create_backbone(name, num_classes=2, weights="none", output_stride=output_stride)
    assert stride_layer(net, 16) == expected
    assert hooks_left(net) == []  # the dry run's hooks are gone


def test_a_network_without_that_stride_has_no_stride_layer():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert stride_layer(net, 16) is None
    assert stride_layer(net, 2) == "1"  # the ReLU ends after the convolution: the last module at stride 2
    assert spatial_layers(net) == ["0", "1"]


def test_bad_stride_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^stride: got 12; expected a power of two from 1 to 32, e.g. 16$"):
        stride_layer(nn.Conv2d(3, 3, 1), 12)


def test_a_model_that_fails_the_dry_run_says_pass_target_layer():
    class Fixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("only 32 px")

    with pytest.raises(ConfigError, match=r"^mynet: could not list its spatial layers .*pass --target-layer$"):
        spatial_layers(Fixed(), "mynet")


def test_candidates_put_stages_before_their_sub_layers():
    import torchvision

    assert candidate_layers(torchvision.models.resnet18(weights=None))[:4] == ["layer4", "layer3", "layer2", "layer1"]


def test_eval_mode_gives_every_module_its_mode_back_also_after_an_error():
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Dropout())
    net.train()
    net[1].eval()
    with pytest.raises(RuntimeError):
        with eval_mode(net):
            assert not any(m.training for m in net.modules())
            raise RuntimeError("boom")
    assert [m.training for m in net.modules()] == [True, True, False]


def test_docstring_example():
    failures, tried = doctest.testmod(layers_module)
    assert tried > 0 and failures == 0
