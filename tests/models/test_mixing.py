"""MixUp and CutMix (medtransfer.models.mixing) and their loss in the LightningModule."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from medtransfer.models.backbones import create_backbone
from medtransfer.models.mixing import mix_batch, soft_targets
from medtransfer.models.module import ClassifierModule
from medtransfer.models.strategies import Strategy, build_transfer_model


def _batch(n: int = 8, size: int = 16):
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def test_mixup_blends_each_image_with_its_partner_at_lam():
    images, labels = _batch()
    torch.manual_seed(1)
    mixed = mix_batch(images, labels, mixup=0.4, cutmix=0.0)
    torch.manual_seed(1)
    torch.distributions.Beta(0.4, 0.4).sample()
    order = torch.randperm(len(images))
    assert torch.allclose(mixed.images, mixed.lam * images + (1 - mixed.lam) * images[order])
    assert torch.equal(mixed.partners, labels[order]) and 0 < mixed.lam < 1


def test_cutmix_pastes_one_box_whose_area_is_one_minus_lam():
    images, labels = _batch(size=32)
    torch.manual_seed(3)
    mixed = mix_batch(images, labels, mixup=0.0, cutmix=1.0)
    changed = (mixed.images != images).any(dim=1)  # pixels taken from the partner (where it differs)
    pasted = changed.float().mean(dim=(1, 2))
    moved = pasted[pasted > 0]
    assert torch.allclose(moved, torch.full_like(moved, 1 - mixed.lam), atol=0.02)


def test_soft_target_cross_entropy_equals_the_mixture_of_the_two_hard_losses():
    images, labels = _batch()
    torch.manual_seed(0)
    mixed = mix_batch(images, labels, mixup=0.2, cutmix=0.0)
    logits = torch.randn(len(labels), 3, generator=torch.Generator().manual_seed(5))
    soft = F.cross_entropy(logits, soft_targets(mixed, 3))
    mixture = mixed.lam * F.cross_entropy(logits, labels) + (1 - mixed.lam) * F.cross_entropy(logits, mixed.partners)
    assert soft.item() == pytest.approx(mixture.item(), rel=1e-6)


class _Capture(ClassifierModule):
    def log(self, name, value, **kwargs):
        self.logged = getattr(self, "logged", {}) | {name: value}


def _module(**kwargs) -> ClassifierModule:
    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=3, weights="none")
    return _Capture(build_transfer_model(net, spec, Strategy("finetune")), lr=1e-3, weight_decay=0.0,
                    channels_last=False, **kwargs)


@pytest.mark.parametrize("options", [
    dict(mixup=0.2),
    dict(cutmix=1.0, class_weights=[0.5, 1.0, 2.0], label_smoothing=0.1),
    dict(mixup=0.2, cutmix=1.0, focal_gamma=2.0, class_weights=[1.0, 2.0, 3.0]),
])
def test_training_step_loss_is_the_mixed_loss_computed_independently(options):
    module = _module(**options).eval()  # eval: BatchNorm gives the same logits for the same images twice
    images, labels = _batch()
    torch.manual_seed(11)
    loss = module.training_step((images, labels), 0)
    torch.manual_seed(11)
    mixed = mix_batch(images, labels, mixup=options.get("mixup", 0.0), cutmix=options.get("cutmix", 0.0))
    with torch.no_grad():
        logits = module.model(mixed.images).float()
    weight = torch.tensor(options["class_weights"]) if "class_weights" in options else None
    smoothing = options.get("label_smoothing", 0.0)

    def hard(targets):
        if "focal_gamma" in options:
            log_p = torch.log_softmax(logits, 1).gather(1, targets[:, None]).squeeze(1)
            per_image = -((1 - log_p.exp()) ** options["focal_gamma"]) * log_p * weight[targets]
            return per_image.sum() / weight[targets].sum()
        return F.cross_entropy(logits, targets, weight=weight, label_smoothing=smoothing)

    expected = mixed.lam * hard(labels) + (1 - mixed.lam) * hard(mixed.partners)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert module.logged["train/loss"] is loss


def test_without_mixing_the_training_step_uses_the_batch_as_it_is():
    module = _module().eval()
    images, labels = _batch()
    loss = module.training_step((images, labels), 0)
    with torch.no_grad():
        expected = F.cross_entropy(module.model(images).float(), labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
