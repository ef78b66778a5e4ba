"""Train and evaluation pipelines on uint8 tensors from the cache.

Training augments with a policy of :mod:`medtransfer.data.augment` (per-image parameters,
applied in the loader worker or, on a GPU, to the whole batch after the transfer). Radiographs
are acquired in a standard position, so large crops, rotations or flips would show the model
anatomy it never meets. Evaluation (torchvision.transforms.v2) is deterministic (resize +
center crop) so that the same image always gets the same score.

Normalisation is the backbone's: callers pass its ``mean`` and ``std`` (per RGB channel,
from ``BackboneSpec.normalization`` or model.json) as plain values, so that this module
and the model registry do not import each other.
"""

from __future__ import annotations

import copy

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from medtransfer.data.augment import Policy, augment_batch, draw_params


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


def normalisation(mean: Sequence[float], std: Sequence[float], channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std for a model of ``channels`` inputs (RGB statistics averaged for one channel)."""
    if len(mean) != len(std):
        raise ValueError(f"mean and std differ in length: got {len(mean)} and {len(std)} values")
    if channels == 1 and len(mean) == 3:  # the RGB statistics of a gray image seen as (x, x, x)
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return list(mean), list(std)


def _finish(mean: Sequence[float], std: Sequence[float], channels: int) -> list:
    mean, std = normalisation(mean, std, channels)
    return [MatchChannels(channels), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=mean, std=std)]


class TrainTransform(v2.Transform):
    """One training image (uint8 C x H x W) -> its augmented, normalised float tensor.

    Draws the image's parameters (:func:`~medtransfer.data.augment.draw_params`, from torch's
    global generator, which :class:`~medtransfer.data.datamodule.SeededItems` seeds per item) and
    applies them as a batch of one. With ``on_device`` it returns ``(uint8 image, parameters)``
    instead, and :meth:`finish` applies the whole batch on the GPU after the transfer: the same
    parameters, the same function, so the same image on either path.
    """

    def __init__(
        self, policy: Policy, *, image_size: int, mean: Sequence[float], std: Sequence[float], channels: int = 3,
        on_device: bool = False,
    ):
        super().__init__()
        if policy.name == "none":
            raise ValueError("policy 'none' trains on the evaluation transform; use eval_transform")
        self.policy, self.image_size, self.on_device = policy, image_size, on_device
        self.match = MatchChannels(channels)
        mean, std = normalisation(mean, std, channels)
        self.stats = torch.tensor([mean, std]).view(2, 1, -1, 1, 1)
        self._on: dict[torch.device, torch.Tensor] = {}  # stats copied once per device: no copy per batch
        self.border: torch.nn.Module | None = None  # BorderCrop set by with_border_crop (train --border-crop)

    def forward(self, image: torch.Tensor):
        image = self.match(image if self.border is None else self.border(image))
        params = draw_params(self.policy, 1)[0]
        if self.on_device:
            return image.contiguous(), params
        return self.finish(image[None], params[None])[0]

    def finish(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """A uint8 batch and its parameter rows -> the normalised float32 batch, where ``images`` are."""
        out = augment_batch(images, params, size=self.image_size, extras=self.policy.name != "light")
        if out.device not in self._on:
            self._on[out.device] = self.stats.to(out.device)
        mean, std = self._on[out.device]
        return out.sub_(mean).div_(std)


def train_transform(
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    channels: int = 3,
    policy: str = "light",
    on_device: bool = False,
    crop_scale: tuple[float, float] = (0.6, 1.0),
    rotation_degrees: float = 10.0,
    brightness: float = 0.2,
    contrast: float = 0.2,
    horizontal_flip: bool = False,
) -> TrainTransform:
    """The training transform of ``policy`` (a name of :data:`~medtransfer.data.augment.POLICIES` but none)
    with the magnitudes given; ``on_device``: finished on the GPU (:meth:`TrainTransform.finish`)."""
    low, high = crop_scale  # a list from a YAML config too (Config checks it holds two numbers)
    chosen = Policy(policy, (low, high), rotation_degrees, brightness, contrast, horizontal_flip)
    return TrainTransform(chosen, image_size=image_size, mean=mean, std=std, channels=channels, on_device=on_device)


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


def with_border_crop(transform: v2.Compose | TrainTransform, fraction: float) -> v2.Compose | TrainTransform:
    """``transform`` with :class:`BorderCrop` in front (unchanged for 0): one place for train and evaluation.
    A TrainTransform stays one (a copy cropping first), so the GPU path still finds its ``finish``."""
    if not fraction:
        return transform
    if isinstance(transform, TrainTransform):
        cropping = copy.copy(transform)
        cropping.border = BorderCrop(fraction)
        return cropping
    return v2.Compose([BorderCrop(fraction), *transform.transforms])
