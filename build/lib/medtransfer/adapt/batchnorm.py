"""Normalisation statistics re-estimated on the new site's images: AdaBN and TENT.

- :func:`reestimate_batchnorm` (AdaBN; Li, Wang, Shi, Liu & Hou 2016, "Revisiting batch
  normalization for practical domain adaptation"): every BatchNorm layer's running mean and
  variance recomputed on the target images, layer by layer as the forward pass goes (each
  layer sees the previous layers already normalised by target batches); weights, affine scales
  and shifts untouched. Batches are drawn in a seeded random order so that each one mixes the
  site's images (a batch of one class only would understate the variance), and the per-batch
  statistics are averaged with equal weight (``momentum=None``).
- :func:`tent` (Wang, Shelhamer, Liu, Olshausen & Darrell 2021, "Tent: fully test-time
  adaptation by entropy minimization"): AdaBN's statistics, then the BatchNorm affine scales and
  shifts trained to minimise the entropy of the model's predictions on the target images (Adam),
  then the statistics re-estimated once more under the new affine parameters. Nothing else moves.

Both refuse fewer than :data:`MIN_IMAGES` images: a BatchNorm variance estimated from a few
dozen images is noise, and a model normalised by it can be worse than no adaptation.

    >>> adapted = reestimate_batchnorm(model, batches(images), images=len(images))   # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn

from medtransfer.errors import DataError

__all__ = ["MIN_IMAGES", "batchnorm_layers", "changed_tensors", "reestimate_batchnorm", "tent"]

MIN_IMAGES = 64


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer (torch's and subclasses such as timm's BatchNormAct2d) that keeps running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _check(model: nn.Module, images: int, minimum: int) -> list[nn.Module]:
    layers = batchnorm_layers(model)
    if not layers:
        raise DataError("this network has no BatchNorm layer with running statistics; use --method prior")
    if images < minimum:
        raise DataError(
            f"--data: {images} images; re-estimating BatchNorm statistics needs at least {minimum} (with fewer the "
            f"variances are noise and the adapted model can be worse than the original); add images or use --method prior"
        )
    return layers


@torch.no_grad()
def _accumulate(model: nn.Module, layers: list[nn.Module], batches: Iterable[torch.Tensor]) -> int:
    """Reset the layers' running statistics and average them over `batches` (layers in train mode, the rest eval)."""
    saved_momentum = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    seen = 0
    try:
        for images in batches:
            if len(images) < 2:
                continue  # one image has no variance
            model(images)
            seen += len(images)
    finally:
        for m, momentum in zip(layers, saved_momentum):
            m.momentum = momentum
        model.eval()
    return seen


def reestimate_batchnorm(
    model: nn.Module, batches: Callable[[], Iterable[torch.Tensor]], *, images: int, minimum: int = MIN_IMAGES
) -> nn.Module:
    """A copy of `model` (eval mode) whose BatchNorm running statistics come from `batches()` (normalised model inputs)."""
    adapted = copy.deepcopy(model)
    layers = _check(adapted, images, minimum)
    if _accumulate(adapted, layers, batches()) < minimum:
        raise DataError(f"--data: fewer than {minimum} images reached the network in batches of 2 or more")
    return adapted


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def tent(
    model: nn.Module, batches: Callable[[], Iterable[torch.Tensor]], *, images: int, epochs: int = 1, lr: float = 1e-3,
    minimum: int = MIN_IMAGES,
) -> tuple[nn.Module, list[float]]:
    """A copy of `model` adapted by TENT; also the mean prediction entropy of each epoch (before its updates)."""
    adapted = reestimate_batchnorm(model, batches, images=images, minimum=minimum)
    layers = batchnorm_layers(adapted)
    for p in adapted.parameters():
        p.requires_grad_(False)
    affine = [p for m in layers for p in (m.weight, m.bias) if p is not None]
    for p in affine:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(affine, lr=lr)
    history = []
    for _ in range(epochs):
        total, count = 0.0, 0
        adapted.eval()
        for m in layers:
            m.train()  # TENT normalises with the batch's statistics while it learns
        for batch in batches():
            if len(batch) < 2:
                continue
            loss = _entropy(adapted(batch))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total, count = total + float(loss.detach()) * len(batch), count + len(batch)
        history.append(total / max(count, 1))
    for p in adapted.parameters():
        p.requires_grad_(False)
    _accumulate(adapted, layers, batches())  # running statistics under the learnt affine parameters
    return adapted, history


def changed_tensors(before: nn.Module, after: nn.Module, *, atol: float = 0.0) -> list[str]:
    """Names of the state-dict tensors (parameters and buffers) that differ between two copies of a network."""
    b, a = before.state_dict(), after.state_dict()
    return sorted(name for name in b if not torch.allclose(b[name].float(), a[name].float(), atol=atol, rtol=0.0))
