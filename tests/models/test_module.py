"""Loss choices and the learning-rate schedule of the LightningModule."""

import pytest
import torch

from medtransfer.models.backbones import create_backbone
from medtransfer.models.module import ClassifierModule, warmup_cosine
from medtransfer.models.strategies import Strategy, build_transfer_model


def module(**kwargs) -> ClassifierModule:
    net, spec = create_backbone("resnet18", num_classes=3, weights="none")
    return ClassifierModule(build_transfer_model(net, spec, Strategy("linear-probe")), lr=1e-3, weight_decay=0.0, **kwargs)


def test_focal_loss_with_gamma_zero_is_cross_entropy_and_down_weights_easy_examples():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 1, 2])
    cross_entropy = torch.nn.functional.cross_entropy(logits, labels)
    assert module(focal_gamma=0.0).loss(logits, labels) == pytest.approx(cross_entropy.item())
    focal = module(focal_gamma=2.0).loss(logits, labels)
    assert focal < cross_entropy
    easy_only = module(focal_gamma=2.0).loss(logits[[0]], labels[[0]])
    hard_only = module(focal_gamma=2.0).loss(logits[[1]], labels[[1]])
    assert easy_only / hard_only < torch.nn.functional.cross_entropy(logits[[0]], labels[[0]]) / torch.nn.functional.cross_entropy(
        logits[[1]], labels[[1]]
    )


def test_class_weights_match_torch_weighted_cross_entropy():
    logits = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    weights = [0.5, 1.5, 3.0]
    expected = torch.nn.functional.cross_entropy(logits, labels, weight=torch.tensor(weights))
    assert module(class_weights=weights).loss(logits, labels).item() == pytest.approx(expected.item())


def test_warmup_then_cosine_schedule():
    factors = [warmup_cosine(step, warmup_steps=10, total_steps=110) for step in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] < 0.02
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
