"""Freezing strategies: which layers freeze, how many parameters that leaves trainable, and refusals.

Random initialisation only (weights="none"): nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch

from medtransfer.errors import ConfigError
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import (
    STRATEGIES,
    Strategy,
    TransferModel,
    backbone_children,
    build_transfer_model,
    parameter_groups,
)

RESNET18_CHILDREN = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]


def resnet18(strategy: Strategy) -> TransferModel:
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    return build_transfer_model(net, spec, strategy)


def frozen_numel(model: TransferModel) -> int:
    """Parameters of the frozen layers, counted from the layers themselves."""
    return sum(p.numel() for name in model.frozen for p in model.net.get_submodule(name).parameters())


@pytest.mark.parametrize(
    ("strategy", "frozen", "frozen_parameters"),
    [
        (Strategy("finetune"), [], 0),
        (Strategy("freeze", 0), [], 0),
        # The seed script's "fixed feature extractor": conv1 (9,408) + bn1 (128); relu and maxpool have none.
        (Strategy("freeze", 4), RESNET18_CHILDREN[:4], 9_536),
        (Strategy("freeze", 5), RESNET18_CHILDREN[:5], 9_536 + 147_968),  # + layer1: four 64x64x3x3 convs and BNs
        (Strategy("linear-probe"), RESNET18_CHILDREN, 11_177_538 - 1_026),  # all but the 512x2 head and its bias
    ],
)
def test_resnet18_two_classes_freezes_the_expected_layers_and_parameters(strategy, frozen, frozen_parameters):
    model = resnet18(strategy)
    counts = model.parameter_counts()
    assert counts["total"] == 11_177_538
    assert model.frozen == frozen
    assert frozen_numel(model) == frozen_parameters
    assert counts["trainable"] == counts["total"] - frozen_parameters


def test_linear_probe_trains_exactly_the_head():
    model = resnet18(Strategy("linear-probe"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"net.fc.weight", "net.fc.bias"}
    assert model.parameter_counts()["trainable"] == model.head.weight.numel() + model.head.bias.numel()


@pytest.mark.parametrize(
    ("name", "first"),
    [
        ("resnet18", RESNET18_CHILDREN[:3]),
        ("densenet121", ["features.conv0", "features.norm0", "features.relu0"]),  # the "features" container expanded
        ("efficientnet_lite0", ["conv_stem", "bn1", "blocks.0"]),  # the "blocks" container expanded
    ],
)
def test_children_are_layers_in_forward_order_without_the_head(name, first):
    net, spec = create_backbone(name, num_classes=2, weights="none")
    children = backbone_children(net, spec)
    assert children[:3] == first
    assert spec.head not in children and spec.head.split(".")[0] not in children


def test_frozen_layers_stay_frozen_and_in_eval_mode_through_train_and_eval_switches():
    model = resnet18(Strategy("freeze", 5))
    for _ in range(2):
        model.eval()
        model.train()
    assert not model.net.bn1.training and not model.net.layer1.training
    assert model.net.layer2.training and model.net.fc.training
    assert all(not p.requires_grad for p in model.net.layer1.parameters())
    images = torch.rand(2, 3, 32, 32)
    model(images).sum().backward()
    assert model.net.conv1.weight.grad is None and model.net.layer2[0].conv1.weight.grad is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("thaw",), r"^--strategy: got .thaw.; choose one of finetune, freeze, linear-probe, lp-ft, gradual$"),
        (("freeze", -1), r"^--freeze-children: got -1; expected 0 or more$"),
    ],
)
def test_strategy_refuses_unknown_names_and_negative_counts_on_construction(args, message):
    with pytest.raises(ConfigError, match=message):
        Strategy(*args)


def test_every_named_strategy_can_be_built():
    assert {Strategy(name).name for name in STRATEGIES} == {"finetune", "freeze", "linear-probe", "lp-ft", "gradual"}
    for name in STRATEGIES:
        assert resnet18(Strategy(name)).parameter_counts()["total"] == 11_177_538


def test_lp_ft_starts_unfrozen_and_gradual_starts_with_only_the_head():
    assert resnet18(Strategy("lp-ft")).frozen == []  # its probe phase trains the head on features first
    gradual = resnet18(Strategy("gradual"))
    assert gradual.frozen == RESNET18_CHILDREN
    assert gradual.parameter_counts()["trainable"] == 1_026
    assert gradual.child_groups() == ["layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]


def test_layer_wise_learning_rates_decay_per_child_group_from_the_head_down():
    groups = parameter_groups(resnet18(Strategy("finetune")), 1e-3, 0.5)
    assert [g["name"] for g in groups] == ["head", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 * 0.5**k for k in range(7)])
    assert sum(p.numel() for g in groups for p in g["params"]) == 11_177_538  # every parameter, once


def test_frozen_groups_are_left_out_and_keep_their_depth():
    groups = parameter_groups(resnet18(Strategy("freeze", 5)), 1.0, 0.7)  # conv1, bn1, layer1 frozen
    assert [(g["name"], round(g["lr"], 4)) for g in groups] == [
        ("head", 1.0), ("layer4", 0.7), ("layer3", 0.49), ("layer2", 0.343)
    ]
