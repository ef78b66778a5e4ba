"""Where a feature map's cells look on the input, and upsampling that puts them there.

Upsampling puts each cell where the network looks, not at the middle of its block: with
odd kernels and symmetric padding (ResNet, EfficientNet), cell i of a stride-32 map is
centred on input pixel 32 i, while the usual resize (``align_corners=False``, as in
OpenCV) draws it at 32 i + 15.5 - half a cell down and right, which on a 160 px chest film
is a lesion's width. :func:`feature_grid` measures the stride and offset of a layer (the
effective receptive field of a randomly initialised copy), so DenseNet's average-pool
transitions (+14 px at stride 32) are placed right as well.

The measurement is kept with the model object it was made on (a weak reference: it goes
when the model goes), so a loaded model pays it once and nothing has to be cleared by hand.

>>> import torch
>>> cells = torch.zeros(1, 3, 3)
>>> cells[0, 1, 1] = 1.0
>>> maps = upsample(cells, (30, 30), FeatureGrid(stride=10.0, offset_y=0.0, offset_x=0.0))
>>> float(maps[0, 10, 10])  # cell (1, 1) is centred on pixel (10, 10)
1.0
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatureGrid", "feature_grid", "input_channels", "upsample"]

_GRID_PROBE_SIZE = 256  # divisible by every power-of-two stride up to 256, so the stride is exact
_GRID_PROBE_BATCHES = (1, 8)

# model -> {layer name -> grid}; weak keys, so a model that is dropped takes its grids along.
_MEASURED: weakref.WeakKeyDictionary[nn.Module, dict[str, FeatureGrid | None]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class FeatureGrid:
    """Where a layer's cells sit on the input: cell (i, j) is centred on input pixel
    (offset_y + stride * i, offset_x + stride * j), pixel centres at integer coordinates."""

    stride: float
    offset_y: float
    offset_x: float


def feature_grid(model: nn.Module, layer_name: str) -> FeatureGrid | None:
    """Stride and offset of ``layer_name``'s cells on the input of ``model`` (measured once per model object).

    A randomly initialised copy of the model sees a batch of noise images of
    ``_GRID_PROBE_SIZE`` px; the stride is the probe size over the layer's size, and the
    offset is where the gradient of the central cell with respect to the input (its
    effective receptive field) has its centroid, less ``stride * index``. Random weights
    keep the receptive field symmetric about its geometric centre, which trained weights
    need not be. ``None`` (the caller then resizes as usual) when the model does not take a
    probe of that size or the layer has fewer than two cells per side there.

    The geometry of ``model`` is taken as fixed once measured: a model whose layers are
    replaced afterwards should be a new object.
    """
    grids = _MEASURED.setdefault(model, {})
    if layer_name not in grids:
        # Callers may sit in inference mode (predict, serve): the copy and the probe need autograd.
        with torch.inference_mode(False), torch.enable_grad():
            grids[layer_name] = _probe_grid(model, layer_name)
    return grids[layer_name]


def _probe_grid(model: nn.Module, layer_name: str) -> FeatureGrid | None:
    probe = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for module in probe.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    captured: list[torch.Tensor] = []
    handle = probe.get_submodule(layer_name).register_forward_hook(lambda m, a, output: captured.append(output))
    try:
        # One noise image places the cells to about 1 px; a narrow net whose central cell is
        # dead (ReLU) for that image gets a larger batch.
        for batch in _GRID_PROBE_BATCHES:
            x = torch.randn(batch, input_channels(probe), _GRID_PROBE_SIZE, _GRID_PROBE_SIZE, generator=generator)
            x.requires_grad_(True)
            captured.clear()
            probe(x)
            feature = captured[-1] if captured else None
            if not isinstance(feature, torch.Tensor) or feature.ndim != 4 or min(feature.shape[-2:]) < 2:
                return None
            rows, cols = feature.shape[-2:]
            row, col = rows // 2, cols // 2
            (grad,) = torch.autograd.grad(feature[:, :, row, col].sum(), x)
            weight = grad.abs().sum(dim=(0, 1)).double()
            if torch.isfinite(weight).all() and weight.sum() > 0:
                break
        else:
            return None
    except Exception:  # a model that only takes its own input size: keep the usual resize
        return None
    finally:
        handle.remove()
    index = torch.arange(_GRID_PROBE_SIZE, dtype=torch.float64)
    centre_y = float((weight.sum(1) * index).sum() / weight.sum())
    centre_x = float((weight.sum(0) * index).sum() / weight.sum())
    stride = _GRID_PROBE_SIZE / cols
    return FeatureGrid(stride=stride, offset_y=centre_y - stride * row, offset_x=centre_x - stride * col)


def upsample(cells: torch.Tensor, size: tuple[int, int], grid: FeatureGrid | None) -> torch.Tensor:
    """N x h x w cell map -> N x H x W, bilinear, each cell at its :class:`FeatureGrid` centre.

    Beyond the outermost cell centres the border value is held. Without a grid this is the
    usual ``align_corners=False`` resize (cells at the middle of equal blocks).
    """
    if grid is None:
        return F.interpolate(cells[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    n, h, w = cells.shape
    height, width = size

    def axis(length: int, cells_along: int, offset: float) -> torch.Tensor:
        position = (torch.arange(length, dtype=torch.float32, device=cells.device) - offset) / grid.stride
        position = position.clamp(0, cells_along - 1)
        return position / (cells_along - 1) * 2 - 1 if cells_along > 1 else torch.zeros_like(position)

    gy, gx = torch.meshgrid(axis(height, h, grid.offset_y), axis(width, w, grid.offset_x), indexing="ij")
    sample_at = torch.stack([gx, gy], dim=-1)[None].expand(n, -1, -1, -1)
    return F.grid_sample(cells[:, None].float(), sample_at, mode="bilinear", align_corners=True)[:, 0]


def input_channels(model: nn.Module) -> int:
    """Input channels of the first convolution (3 when there is none): the channels a probe image needs."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3
