"""Models shared by the explain tests: backbones with random weights and a model with a known answer.

`transfer_model(name)` is a 2-class TransferModel of a registered backbone (seeded, built
once per name). `mean_of_feature()` is a model whose class-1 logit is the image mean (a
4x4 box filter, pooled) and whose class-0 logit is its negation. `hooks_left(model)` lists
the hooks still registered anywhere in a model.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import TransferModel


@functools.cache
def _transfer_model(name: str) -> TransferModel:
    torch.manual_seed(0)
    net, spec = create_backbone(name, num_classes=2, weights="none")
    return TransferModel(net, spec)


def _hooks_left(model: nn.Module) -> list[str]:
    kinds = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
    )
    return [f"{name}.{kind}" for name, module in model.named_modules() for kind in kinds if getattr(module, kind, None)]


class MeanOfFeature(nn.Module):
    """Logit of class 1 = mean of a fixed 4x4 box filter of the image; class 0 = its negation."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 4, stride=4, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 16)
            self.fc.weight.copy_(torch.tensor([[-1.0], [1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).flatten(1))


@pytest.fixture
def transfer_model():
    return _transfer_model


@pytest.fixture
def hooks_left():
    return _hooks_left


@pytest.fixture
def mean_of_feature():
    return MeanOfFeature
