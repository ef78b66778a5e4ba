"""MixUp (Zhang et al. 2018) and CutMix (Yun et al. 2019) of a training batch.

Each image is mixed with another of the same batch (a random permutation) at a fraction
``lam ~ Beta(alpha, alpha)``; its target becomes ``lam * onehot(label) + (1 - lam) *
onehot(partner's label)``. The loss of such a soft target is taken as the same mixture of
the two hard-label losses, ``lam * loss(labels) + (1 - lam) * loss(partner labels)``: for
plain cross-entropy the two are equal, and the mixture also holds for label smoothing,
class weights and focal loss, each of which is defined on hard labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Mixed", "mix_batch", "soft_targets"]


@dataclass(frozen=True)
class Mixed:
    """A mixed batch: images, the labels of each image and of its partner, and the share ``lam`` of the first."""

    images: torch.Tensor
    labels: torch.Tensor
    partners: torch.Tensor
    lam: float


def mix_batch(images: torch.Tensor, labels: torch.Tensor, *, mixup: float, cutmix: float) -> Mixed:
    """Mix with MixUp (alpha ``mixup``) or CutMix (alpha ``cutmix``); with both, one of the two per batch
    (a fair coin). Draws from torch's global generator (seeded per batch, so a resumed run repeats it)."""
    use_cutmix = cutmix > 0 and (mixup <= 0 or bool(torch.rand(()) < 0.5))
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    order = torch.randperm(len(images)).to(images.device)
    partners = labels[order]
    if not use_cutmix:
        return Mixed(images * lam + images[order] * (1 - lam), labels, partners, lam)
    height, width = images.shape[-2:]
    cut = (1 - lam) ** 0.5  # the box covers 1 - lam of the area
    box_h, box_w = int(height * cut), int(width * cut)
    top = int(torch.randint(0, height - box_h + 1, ()))
    left = int(torch.randint(0, width - box_w + 1, ()))
    mixed = images.clone()
    mixed[..., top : top + box_h, left : left + box_w] = images[order][..., top : top + box_h, left : left + box_w]
    lam = 1 - box_h * box_w / (height * width)  # the share actually kept, after rounding the box
    return Mixed(mixed, labels, partners, lam)


def soft_targets(mixed: Mixed, num_classes: int) -> torch.Tensor:
    """The soft target of each mixed image (n x classes): ``lam`` on its label, ``1 - lam`` on its partner's."""
    one_hot = torch.nn.functional.one_hot
    return mixed.lam * one_hot(mixed.labels, num_classes).float() + (1 - mixed.lam) * one_hot(
        mixed.partners, num_classes
    ).float()
