"""Train and evaluation pipelines (torchvision.transforms.v2) on uint8 tensors from the cache.

Training augments conservatively: radiographs are acquired in a standard position, so large
crops, rotations or flips would show the model anatomy it never meets. Evaluation is
deterministic (resize + center crop) so that the same image always gets the same score.

Normalisation is the backbone's: callers pass its ``mean`` and ``std`` (per RGB channel,
from ``BackboneSpec.normalization`` or model.json) as plain values, so that this module
and the model registry do not import each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2


class MatchChannels(torch.nn.Module):
    """Repeat a 1-channel image to the model's channel count (or average RGB down to 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        have = image.shape[-3]
        if have == self.channels:
            return image
        if have == 1:
            return image.expand(*image.shape[:-3], self.channels, *image.shape[-2:])
        if self.channels == 1:
            return image.float().mean(dim=-3, keepdim=True).round().to(image.dtype)
        raise ValueError(f"cannot map a {have}-channel image to {self.channels} channels")


def _finish(mean: Sequence[float], std: Sequence[float], channels: int) -> list:
    if len(mean) != len(std):
        raise ValueError(f"mean and std differ in length: got {len(mean)} and {len(std)} values")
    if channels == 1 and len(mean) == 3:  # the RGB statistics of a gray image seen as (x, x, x)
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return [MatchChannels(channels), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def train_transform(
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    channels: int = 3,
    crop_scale: tuple[float, float] = (0.6, 1.0),
    rotation_degrees: float = 10.0,
    brightness: float = 0.2,
    contrast: float = 0.2,
    horizontal_flip: bool = False,
) -> v2.Compose:
    """Random crop (aspect 0.9-1.1), small rotation, brightness/contrast jitter, then normalise."""
    steps: list = [
        v2.RandomResizedCrop(image_size, scale=crop_scale, ratio=(0.9, 1.1), antialias=True),
        v2.RandomRotation(rotation_degrees),
    ]
    if brightness or contrast:
        steps.append(v2.ColorJitter(brightness=brightness, contrast=contrast))
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _finish(mean, std, channels))


def eval_transform(
    *, image_size: int, mean: Sequence[float], std: Sequence[float], channels: int = 3, crop_fraction: float = 0.875
) -> v2.Compose:
    """Resize to ``image_size / crop_fraction``, center-crop ``image_size``, then normalise."""
    resize_to = int(round(image_size / crop_fraction))
    return v2.Compose([v2.Resize(resize_to, antialias=True), v2.CenterCrop(image_size)] + _finish(mean, std, channels))


# ---------------------------------------------------------------------- border crop (shortcut check)


class BorderCrop(torch.nn.Module):
    """Cut ``fraction`` of the height and of the width off each side: markers, text and collimator
    edges in the border band then never reach the model (``train --border-crop``)."""

    def __init__(self, fraction: float):
        super().__init__()
        if not 0.0 <= fraction < 0.5:
            raise ValueError(f"border crop: got {fraction}; expected a fraction in [0, 0.5)")
        self.fraction = float(fraction)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        top, left = round(height * self.fraction), round(width * self.fraction)
        return image[..., top : height - top, left : width - left]


def with_border_crop(transform: v2.Compose, fraction: float) -> v2.Compose:
    """``transform`` with :class:`BorderCrop` in front (unchanged for 0): one place for train and evaluation."""
    if not fraction:
        return transform
    return v2.Compose([BorderCrop(fraction), *transform.transforms])
