"""Normalisation statistics re-estimated on the new site's images: AdaBN (source-relative) and TENT.

AdaBN (Li, Wang, Shi, Liu & Hou 2016, "Revisiting batch normalization for practical domain
adaptation") replaces every BatchNorm layer's running mean and variance by the new site's, so that
each layer's output has, on the new images, the moments it had on the training images. That holds
only if the saved statistics ARE the training images' statistics. In a transferred network they
often are not: frozen layers (a linear probe, ``--strategy freeze``) keep ImageNet's statistics, so
on radiographs their outputs were never standardised, and the head learnt on those un-standardised
features. Plain AdaBN then standardises them - a change the head never saw (measured: docs
guide/adapt).

:func:`reestimate_batchnorm` therefore matches moments *relative to the source*: given each layer's
input moments on the source images (m_s, s_s: :func:`input_moments` on the run's validation images)
and the new site's (m_t, s_t), it sets

    mean' = m_t - (m_s - mean) * s_t / s_s        std' = std * s_t / s_s

so that a new image's output equals the output of the source image at the same standardised
position. Where the saved statistics are the source's (m_s = mean, s_s = std) this is AdaBN itself.
Layers are re-estimated in one pass, in forward order: each batch is normalised with its own
statistics mapped this way (a pre-hook sets the buffers before the layer runs), so every layer sees
its upstream layers already adapted; the final statistics are the population moments over all
batches. Batches are drawn in a seeded random order so each one mixes the site's images.

:func:`tent` (Wang, Shelhamer, Liu, Olshausen & Darrell 2021, "Tent: fully test-time adaptation by
entropy minimization"): the statistics above, then the BatchNorm affine scales and shifts trained
(Adam) to minimise the entropy of the predictions on the new images, the batch statistics treated as
constants; then the statistics re-estimated under the new affine parameters. Nothing else moves.

Both refuse fewer than :data:`MIN_IMAGES` images: a variance estimated from a few dozen images is
noise, and a model normalised by it can be worse than no adaptation.

    >>> source = input_moments(model, val_batches)                                    # doctest: +SKIP
    >>> adapted = reestimate_batchnorm(model, new_batches, images=300, source=source)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar, cast

import torch
from torch import nn

from medtransfer.errors import DataError

__all__ = ["MIN_IMAGES", "Moments", "batchnorm_layers", "changed_tensors", "input_moments", "reestimate_batchnorm", "tent"]

MIN_IMAGES = 64
Moments = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer name -> per-channel input mean and variance
Net = TypeVar("Net", bound=nn.Module)

if TYPE_CHECKING:
    class Tracking(nn.modules.batchnorm._BatchNorm):
        """A BatchNorm layer that keeps running statistics (what :func:`batchnorm_layers` selects): its running_mean
        and running_var are tensors, where torch types them ``Tensor | None``."""

        running_mean: torch.Tensor
        running_var: torch.Tensor


def batchnorm_layers(model: nn.Module) -> dict[str, Tracking]:
    """Every BatchNorm layer (torch's and subclasses such as timm's BatchNormAct2d) that keeps running statistics."""
    return {name: cast("Tracking", m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


def _check(model: nn.Module, images: int, minimum: int) -> dict[str, Tracking]:
    layers = batchnorm_layers(model)
    if not layers:
        raise DataError("this network has no BatchNorm layer with running statistics; use --method prior")
    if images < minimum:
        raise DataError(
            f"--data: {images} images; re-estimating BatchNorm statistics needs at least {minimum} (with fewer the "
            f"variances are noise and the adapted model can be worse than the original); add images or use --method prior"
        )
    return layers


class _Sums:
    """Per-channel sums of a layer's inputs (float64): count, sum, sum of squares."""

    def __init__(self) -> None:
        self.count = 0.0
        self.total: torch.Tensor | None = None  # None until the first add
        self.squares: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        x = x.detach().double()
        self.count += x.numel() / x.shape[1]
        self.total = x.sum(dims) if self.total is None else self.total + x.sum(dims)
        self.squares = (x * x).sum(dims) if self.squares is None else self.squares + (x * x).sum(dims)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.total is None or self.squares is None:
            raise ValueError("no inputs were added")
        mean = self.total / self.count
        return mean.float(), (self.squares / self.count - mean * mean).clamp(min=0).float()


@contextlib.contextmanager
def _pre_hooks(layers: dict[str, Tracking], hook: Callable[[str, Tracking, torch.Tensor], None]) -> Iterator[None]:
    handles = [m.register_forward_pre_hook(lambda module, args, name=name: hook(name, module, args[0]))
               for name, m in layers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def input_moments(model: nn.Module, batches: Iterable[torch.Tensor]) -> Moments:
    """Each BatchNorm layer's per-channel input mean and variance over `batches`, the model in eval mode, as saved."""
    model.eval()
    layers = batchnorm_layers(model)
    sums = {name: _Sums() for name in layers}
    with _pre_hooks(layers, lambda name, _m, x: sums[name].add(x)):
        for images in batches:
            model(images)
    return {name: s.moments() for name, s in sums.items() if s.count}


def _relative(m: Tracking, saved: tuple[torch.Tensor, torch.Tensor], source: tuple[torch.Tensor, torch.Tensor],
              mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The running statistics that put input moments (mean, var) where the source's moments were."""
    mu, sigma = saved[0], torch.sqrt(saved[1] + m.eps)
    m_s, s_s = source[0], torch.sqrt(source[1] + m.eps)
    scale = torch.sqrt(var + m.eps) / s_s
    return mean - (m_s - mu) * scale, ((sigma * scale) ** 2 - m.eps).clamp(min=0)


@torch.no_grad()
def _adapt_pass(model: nn.Module, layers: dict[str, Tracking], source: Moments, batches: Iterable[torch.Tensor]) -> int:
    """One forward pass in eval mode: each layer normalises each batch by the batch's own moments mapped relative to the
    source; afterwards its buffers hold the population moments of the whole pass, mapped the same way."""
    model.eval()
    saved = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in layers.items()}
    sums = {name: _Sums() for name in layers}

    def hook(name: str, m: Tracking, x: torch.Tensor) -> None:
        sums[name].add(x)
        dims = [0, *range(2, x.dim())]
        batch = (x.float().mean(dims), x.float().var(dims, unbiased=False))
        mean, var = _relative(m, saved[name], source.get(name, saved[name]), *batch)
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)

    seen = 0
    with _pre_hooks(layers, hook):
        for images in batches:
            if len(images) < 2:
                continue  # one image has no variance
            model(images)
            seen += len(images)
    for name, m in layers.items():
        if sums[name].count:
            mean, var = _relative(m, saved[name], source.get(name, saved[name]), *sums[name].moments())
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
    return seen


def reestimate_batchnorm(
    model: Net, batches: Callable[[], Iterable[torch.Tensor]], *, images: int, minimum: int = MIN_IMAGES,
    source: Moments | None = None,
) -> Net:
    """A copy of `model` (eval mode) whose BatchNorm statistics map `batches()` (normalised model inputs) onto the
    `source` input moments (:func:`input_moments`); without `source`, onto the saved statistics (plain AdaBN)."""
    adapted = copy.deepcopy(model)
    layers = _check(adapted, images, minimum)
    if _adapt_pass(adapted, layers, source or {}, batches()) < minimum:
        raise DataError(f"--data: fewer than {minimum} images reached the network in batches of 2 or more")
    return adapted


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def tent(
    model: Net, batches: Callable[[], Iterable[torch.Tensor]], *, images: int, epochs: int = 1, lr: float = 1e-3,
    minimum: int = MIN_IMAGES, source: Moments | None = None,
) -> tuple[Net, list[float]]:
    """A copy of `model` adapted by TENT; also the mean prediction entropy of each epoch (before its updates)."""
    adapted = reestimate_batchnorm(model, batches, images=images, minimum=minimum, source=source)
    layers = batchnorm_layers(adapted)
    original = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in batchnorm_layers(model).items()}
    for p in adapted.parameters():
        p.requires_grad_(False)
    affine = [p for m in layers.values() for p in (m.weight, m.bias) if p is not None]
    for p in affine:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(affine, lr=lr)

    def hook(name: str, m: Tracking, x: torch.Tensor) -> None:  # normalise by the batch, relative to the source
        with torch.no_grad():
            dims = [0, *range(2, x.dim())]
            batch = (x.float().mean(dims), x.float().var(dims, unbiased=False))
            mean, var = _relative(m, original[name], (source or {}).get(name, original[name]), *batch)
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)

    history = []
    adapted.eval()
    with _pre_hooks(layers, hook):
        for _ in range(epochs):
            total, count = 0.0, 0
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
    for name, m in layers.items():  # start the final estimate from the saved statistics, as the first one did
        m.running_mean.copy_(original[name][0])
        m.running_var.copy_(original[name][1])
    _adapt_pass(adapted, layers, source or {}, batches())  # statistics under the learnt affine parameters
    return adapted, history


def changed_tensors(before: nn.Module, after: nn.Module, *, atol: float = 0.0) -> list[str]:
    """Names of the state-dict tensors (parameters and buffers) that differ between two copies of a network."""
    b, a = before.state_dict(), after.state_dict()
    return sorted(name for name in b if not torch.allclose(b[name].float(), a[name].float(), atol=atol, rtol=0.0))
