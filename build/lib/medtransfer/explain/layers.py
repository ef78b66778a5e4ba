"""Which layers of a network hold a spatial feature map, and which one to explain.

A dry forward pass of one blank 224 px image lists every module whose output is an
N x C x H x W map with more than one position, in the order their forward ends (its
temporary hooks are removed, also on error). :func:`stride_layer` picks the last *stage*
at a given stride from that list: the layer LayerCAM reads by default, because its
element-wise weights keep a shallower, finer map meaningful where Grad-CAM's channel mean
does not (the demo's 160 px EfficientNet-Lite0: the stride-32 map is 5 x 5, the stride-16
map of ``blocks.4`` 10 x 10).

>>> import torchvision
>>> net = torchvision.models.resnet18(weights=None)
>>> spatial_layers(net)[-1], stride_layer(net, 16), stride_layer(net, 32)
('layer4', 'layer3', 'layer4')
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from medtransfer.errors import ConfigError
from medtransfer.explain.grid import input_channels

__all__ = ["PROBE_SIZE", "candidate_layers", "eval_mode", "spatial_layers", "stride_layer"]

PROBE_SIZE = 224  # input side of the dry forward pass; divisible by 32, so strides up to 32 are exact
_MAX_CANDIDATES = 10


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode, then give every module back the train/eval mode it had."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def _layer_sides(root: nn.Module, name: str | None = None) -> dict[str, int]:
    """Spatial modules -> their output's width at :data:`PROBE_SIZE` px, in the order their forward ends."""
    order: dict[str, int] = {}

    def hook(layer: str) -> Callable:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[-1] * output.shape[-2] > 1:
                order.pop(layer, None)  # a module run twice counts where it last ran
                order[layer] = int(output.shape[-1])

        return record

    handles = [module.register_forward_hook(hook(layer)) for layer, module in root.named_modules() if layer]
    try:
        parameter = next(root.parameters(), None)
        probe = torch.zeros(
            1,
            input_channels(root),
            PROBE_SIZE,
            PROBE_SIZE,
            device=parameter.device if parameter is not None else None,
            dtype=parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32,
        )
        with eval_mode(root), torch.no_grad():
            root(probe)
    except Exception as exc:
        raise ConfigError(
            f"{name or type(root).__name__}: could not list its spatial layers with a {PROBE_SIZE} px dry run "
            f"({exc.__class__.__name__}: {str(exc)[:120]}); pass --target-layer"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    return order


def spatial_layers(root: nn.Module, name: str | None = None) -> list[str]:
    """Modules whose output is N x C x H x W with H*W > 1, in the order their forward ends.

    Raises:
        ConfigError: the dry run failed (``name`` names the model in the message).
    """
    return list(_layer_sides(root, name))


def candidate_layers(root: nn.Module, name: str | None = None) -> list[str]:
    """Spatial layers, most useful first: shallow names before their sub-layers, deepest (last) first."""
    spatial = spatial_layers(root, name)
    ranked = sorted(range(len(spatial)), key=lambda i: (spatial[i].count("."), -i))
    return [spatial[i] for i in ranked[:_MAX_CANDIDATES]]


def stride_layer(root: nn.Module, stride: int, name: str | None = None) -> str | None:
    """The last stage whose map is ``stride`` times smaller than the input; None when no layer is.

    Among the modules at that stride the one with the shortest dotted name (a stage, not a
    convolution inside the next stage's first block) that ends last is taken: ``layer3``
    for ResNet, ``blocks.4`` for EfficientNet, ``features.denseblock3`` for DenseNet; a
    backbone built with ``output_stride=16`` gives its last layer.
    """
    if stride not in (1, 2, 4, 8, 16, 32):
        raise ConfigError(f"stride: got {stride}; expected a power of two from 1 to 32, e.g. 16")
    sides = _layer_sides(root, name)
    at_stride = [layer for layer, side in sides.items() if side == PROBE_SIZE // stride]
    if not at_stride:
        return None
    shallowest = min(layer.count(".") for layer in at_stride)
    return [layer for layer in at_stride if layer.count(".") == shallowest][-1]
