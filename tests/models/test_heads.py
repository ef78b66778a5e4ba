"""Heads: parameter counts against hand computation, identity start of the dwconv block, reload, refusals.

Random initialisation only (weights="none"): nothing is downloaded.
"""

from __future__ import annotations

import copy

import pytest
import torch

from medtransfer.errors import ConfigError
from medtransfer.models.backbones import create_backbone
from medtransfer.models.heads import HEAD_BLOCK, MLP_HIDDEN, apply_head
from medtransfer.models.strategies import Strategy, TransferModel, build_transfer_model

RESNET18_BACKBONE = 11_177_538 - 1_026  # published total minus the 512 x 2 head


def resnet18(head: str, strategy: str = "finetune") -> TransferModel:
    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    return build_transfer_model(net, spec, Strategy(strategy), head)


def dwconv_block(channels: int) -> int:
    """depthwise 3x3 (no bias) + BN (scale, shift) + pointwise 1x1 (no bias) + BN."""
    return channels * 9 + 2 * channels + channels * channels + 2 * channels


@pytest.mark.parametrize(
    ("head", "head_parameters"),
    [
        ("linear", 512 * 2 + 2),
        ("mlp", 512 * MLP_HIDDEN + MLP_HIDDEN + MLP_HIDDEN * 2 + 2),  # 131,842 with 256 hidden units
        ("dwconv", dwconv_block(512) + 512 * 2 + 2),  # 268,800 + 1,026 on layer4's 512 channels
    ],
)
def test_head_parameter_counts_match_a_hand_computation(head, head_parameters):
    counts = resnet18(head).parameter_counts()
    assert counts["head"] == head_parameters
    assert counts["total"] == RESNET18_BACKBONE + head_parameters
    assert counts["trainable"] == counts["total"]


def test_linear_probe_trains_the_whole_head_including_the_dwconv_block():
    model = resnet18("dwconv", "linear-probe")
    counts = model.parameter_counts()
    assert counts["trainable"] == counts["head"] == dwconv_block(512) + 1_026
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {HEAD_BLOCK, "fc"}
    model.train()
    assert getattr(model.net, HEAD_BLOCK).training and not model.net.layer4.training


def test_dwconv_block_starts_as_the_identity_and_then_changes_the_output():
    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    plain = copy.deepcopy(net).eval()
    apply_head(net, spec, "dwconv")
    net.eval()
    images = torch.rand(2, 3, 64, 64)
    assert torch.allclose(net(images), plain(images), atol=1e-5)
    with torch.no_grad():
        getattr(net, HEAD_BLOCK).bn2.weight.fill_(1.0)
    assert not torch.allclose(net(images), plain(images), atol=1e-3)


def test_a_deep_copy_runs_its_own_block():
    """Weight averaging deep-copies the network: the copy's hook must use the copy's block."""
    model = resnet18("dwconv").eval()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        getattr(twin.net, HEAD_BLOCK).bn2.weight.fill_(1.0)
    images = torch.rand(1, 3, 64, 64)
    assert not torch.allclose(model(images), twin(images), atol=1e-3)


def test_efficientnet_dwconv_block_sits_on_its_1280_channel_map():
    net, spec = create_backbone("efficientnet_lite0", num_classes=2, weights="none")
    model = build_transfer_model(net, spec, Strategy("finetune"), "dwconv")
    assert model.parameter_counts()["head"] == dwconv_block(1280) + 1280 * 2 + 2
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 2)


def test_unknown_head_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"^--head: got 'conv'; choose one of linear, mlp, dwconv$"):
        resnet18("conv")
