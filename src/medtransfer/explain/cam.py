"""Class activation maps: where in the image the evidence for a class lies.

Three methods on the last spatial feature map of the backbone (the "target layer"), and
one that needs no layer:

- ``"cam"``: Zhou B, Khosla A, Lapedriza A, Oliva A, Torralba A. *Learning Deep Features
  for Discriminative Localization.* CVPR 2016. The map is the feature map weighted by the
  final Linear head's weights for the class; it needs backbone -> global average pool ->
  Linear, which every registered backbone has. No gradients.
- ``"gradcam"``: Selvaraju RR, Cogswell M, Das A, Vedantam R, Parikh D, Batra D.
  *Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization.*
  ICCV 2017. Channel weights are the spatial mean of the gradient of the class score
  with respect to the feature map; the map is the ReLU of the weighted sum.
- ``"gradcam++"``: Chattopadhay A, Sarkar A, Howlader P, Balasubramanian VN.
  *Grad-CAM++: Generalized Gradient-based Visual Explanations for Deep Convolutional
  Networks.* WACV 2018. Pixel-wise weights from the closed form with the second and third
  powers of the gradients (exponential-score form, as in the paper's eq. 19).
- ``"occlusion"``: Zeiler MD, Fergus R. *Visualizing and Understanding Convolutional
  Networks.* ECCV 2014. Model-agnostic and layer-free: a square patch (1/8 of the side,
  moved by half its size) is set to the normalisation mean, and each pixel's value is the
  mean drop of the class's log-probability over the patches that cover it (negative
  drops clipped to 0). About 200 forward passes per image, so a cross-check rather than
  the default; it answers "what does the decision depend on" where the last feature map
  is too coarse or mixes the whole image.

Every map is upsampled (bilinear) to the input size and min-max normalised to [0, 1] per
image; a constant map (e.g. all zero after the ReLU) is returned as zeros, never NaN.

Upsampling puts each cell where the network looks, not at the middle of its block: with
odd kernels and symmetric padding (ResNet, EfficientNet), cell i of a stride-32 map is
centred on input pixel 32 i, while the usual resize (``align_corners=False``, as in
OpenCV) draws it at 32 i + 15.5 - half a cell down and right, which on a 160 px chest film
is a lesion's width. :func:`feature_grid` measures the stride and offset once per
architecture and layer (effective receptive field of a randomly initialised copy), so
DenseNet's average-pool transitions (+14 px at stride 32) are placed right as well.

Unlike MONAI's CAM classes, :class:`ClassActivationMap` is a context manager: its hooks
exist only inside the ``with`` block and are removed on exit, also when an exception is
raised. It neither changes ``requires_grad`` flags nor accumulates ``.grad`` on parameters
(gradients are taken with :func:`torch.autograd.grad` with respect to the feature map
only), and it restores each module's train/eval mode after every call.

Example (a grayscale image, repeated to the three channels the backbone expects):

>>> import torch, torchvision
>>> net = torchvision.models.resnet18(weights=None, num_classes=2)
>>> gray = torch.rand(1, 1, 64, 64).expand(-1, 3, -1, -1)
>>> with ClassActivationMap(net, method="gradcam") as cam:
...     result = cam(gray)
>>> cam.target_layer, tuple(result.maps.shape)
('layer4', (1, 64, 64))
>>> bool(0 <= result.maps.min() <= result.maps.max() <= 1)
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medtransfer.errors import ConfigError, DataError

__all__ = ["LAYER_FREE", "METHODS", "CamResult", "ClassActivationMap", "FeatureGrid", "explain_files", "feature_grid", "overlay", "save_overlay", "upsample"]

METHODS = ("cam", "gradcam", "gradcam++", "occlusion")
LAYER_FREE = "input"  # target_layer reported by the occlusion method, which needs none

_MAX_CANDIDATES = 10
_PROBE_SIZE = 224  # input side of the dry forward pass that lists spatial layers
_FLAT_TOLERANCE = 1e-6  # a map whose range is below this fraction of its magnitude is constant
_GRID_PROBE_SIZE = 256  # divisible by every power-of-two stride up to 256, so the stride is exact
_GRID_PROBE_BATCHES = (1, 8)
_OCCLUSION_PATCH = 1 / 8  # of the image side; moved by half a patch
_OCCLUSION_BATCH = 32  # occluded copies per forward pass

ClassChoice = int | Sequence[int] | torch.Tensor | Callable[[torch.Tensor], Any] | None


@dataclass
class CamResult:
    """What :class:`ClassActivationMap` returns for a batch of N images of H x W.

    maps: N x H x W float32 in [0, 1] (zeros where the map is constant).
    logits: N x K model outputs. probabilities: N x K softmax of the logits, or N x 2
        ``[1 - sigmoid, sigmoid]`` for a single-logit head (K = 1).
    class_index: N class indices explained (for a single-logit head 1 = positive logit,
        0 = its negation).
    map_cells: (h, w) of the target layer's map before upsampling: how fine the map really is.
    """

    maps: torch.Tensor
    logits: torch.Tensor
    probabilities: torch.Tensor
    class_index: torch.Tensor
    method: str
    target_layer: str
    map_cells: tuple[int, int] = (0, 0)


class ClassActivationMap:
    """CAM / Grad-CAM / Grad-CAM++ on one layer of a classifier, as a context manager.

    Args:
        model: a :class:`~medtransfer.models.strategies.TransferModel` or any ``nn.Module``
            mapping N x C x H x W images to N x K logits.
        target_layer: dotted module name, relative to ``model.net`` for a TransferModel
            (``"layer4"``) or to ``model`` otherwise. ``None`` picks ``spec.cam_layer`` when
            the backbone spec is known, else the last module whose output is a 4-D map with
            more than one spatial position (found by a dry forward pass whose temporary
            hooks are removed). ``"occlusion"`` reads no layer (its ``target_layer`` is
            :data:`LAYER_FREE`) and registers no hook.
        method: one of :data:`METHODS` (see the module docstring for the papers).
        spec: the :class:`~medtransfer.models.backbones.BackboneSpec`; taken from
            ``model.spec`` when omitted.

    Raises:
        ConfigError: unknown method, a target layer that does not exist (the message lists
            candidate layers, deepest first), or ``"cam"`` on a model without a Linear head.

    Example (grayscale input on a plain torchvision model):

    >>> import torch, torchvision
    >>> net = torchvision.models.resnet18(weights=None, num_classes=2)
    >>> with ClassActivationMap(net, method="cam") as cam:
    ...     result = cam(torch.rand(2, 1, 64, 64).expand(-1, 3, -1, -1), class_index=1)
    >>> tuple(result.maps.shape), result.class_index.tolist()
    ((2, 64, 64), [1, 1])
    """

    def __init__(
        self, model: nn.Module, *, target_layer: str | None = None, method: str = "gradcam", spec: Any = None
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"--method: got {method!r}; choose one of {', '.join(METHODS)}")
        self.model = model
        self.method = method
        self.spec = spec if spec is not None else getattr(model, "spec", None)
        inner = getattr(model, "net", None)
        self.root: nn.Module = inner if isinstance(inner, nn.Module) and hasattr(model, "spec") else model
        self.model_name = getattr(self.spec, "name", None) or type(self.root).__name__
        if method == "occlusion":
            if target_layer is not None:
                raise ConfigError(f"--target-layer {target_layer!r}: --method occlusion reads no layer; leave it out")
            self.target_layer, self.layer, self._layer_root = LAYER_FREE, None, None
        else:
            self.target_layer, self.layer = self._resolve_layer(target_layer)
        self.head = self._find_head() if method == "cam" else None
        self._active = False
        self._handles: list[Any] = []
        self._activation: torch.Tensor | None = None
        self.grid: FeatureGrid | None = None

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> "ClassActivationMap":
        if self._active:
            raise RuntimeError("ClassActivationMap is already active; it cannot be entered twice")
        if self.layer is not None:
            # Measured before the hook exists: the probe copies the model, and must not copy this hook.
            self.grid = feature_grid(self._layer_root, self.target_layer)
            self._handles.append(self.layer.register_forward_hook(self._capture))
        self._active = True
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._activation = None
        self._active = False

    # ------------------------------------------------------------------ the maps

    def __call__(self, images: torch.Tensor, *, class_index: ClassChoice = None) -> CamResult:
        """Maps for a batch of normalised images (N x C x H x W float).

        ``class_index``: ``None`` explains the predicted class (argmax; for a single-logit
        head class 1 when the logit is >= 0); an int explains that class for every image; a
        sequence gives one class per image; a callable receives the detached N x K logits
        and returns the N classes (how :func:`explain_files` applies the saved threshold).
        """
        if not self._active:
            raise RuntimeError(
                "ClassActivationMap is used as a context manager: `with ClassActivationMap(model) as cam: cam(images)`"
            )
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
            got = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected a float N x C x H x W tensor; got {got}")
        if self.method == "occlusion":
            return self._occlusion(images, class_index)
        needs_grad = self.method != "cam"
        try:
            with _eval_mode(self.model), torch.inference_mode(False), torch.set_grad_enabled(needs_grad):
                x = images.clone() if images.is_inference() else images
                self._activation = None
                logits = self.model(x)
                activation = self._activation
                if activation is None:
                    raise ConfigError(
                        f"--target-layer {self.target_layer!r}: the layer did not run in {self.model_name}'s forward pass"
                    )
                _check_logits(logits, x.shape[0])
                index = self._class_index(logits.detach(), class_index)
                single = logits.shape[1] == 1
                sign = (index * 2 - 1).to(logits.dtype) if single else None  # class 1: +logit, class 0: -logit
                if self.method == "cam":
                    cam = self._cam(activation.detach().float(), index, sign, logits.shape[1])
                else:
                    score = logits[:, 0] * sign if single else logits.gather(1, index[:, None])[:, 0]
                    (grads,) = torch.autograd.grad(score.sum(), activation, allow_unused=True)
                    if grads is None:
                        raise ConfigError(
                            f"--target-layer {self.target_layer!r}: the class score of {self.model_name} does not depend on it"
                        )
                    cam = _grad_weighted(activation.detach().float(), grads.detach().float(), self.method)
        finally:
            self._activation = None
        maps = upsample(cam, tuple(images.shape[-2:]), self.grid)
        return self._result(maps, logits, index, (int(cam.shape[-2]), int(cam.shape[-1])))

    def _result(
        self, maps: torch.Tensor, logits: torch.Tensor, index: torch.Tensor, cells: tuple[int, int]
    ) -> CamResult:
        """Full-size maps (before normalisation) and logits -> :class:`CamResult`."""
        if not torch.isfinite(maps).all():
            raise DataError(f"{self.method} map is not finite: the model produced NaN/inf for this input")
        logits = logits.detach()
        if logits.shape[1] == 1:
            positive = torch.sigmoid(logits[:, 0].float())
            probabilities = torch.stack([1 - positive, positive], dim=1)
        else:
            probabilities = torch.softmax(logits.float(), dim=1)
        return CamResult(
            maps=_normalize(maps.float()),
            logits=logits,
            probabilities=probabilities,
            class_index=index,
            method=self.method,
            target_layer=self.target_layer,
            map_cells=cells,
        )

    # ------------------------------------------------------------------ internals

    def _occlusion(self, images: torch.Tensor, class_index: ClassChoice) -> CamResult:
        """Occlusion sensitivity (see the module docstring), one image at a time."""
        with _eval_mode(self.model), torch.no_grad():
            logits = self.model(images)
            _check_logits(logits, images.shape[0])
            index = self._class_index(logits, class_index)
            single = logits.shape[1] == 1
            height, width = images.shape[-2:]
            patch_h, patch_w = max(1, round(height * _OCCLUSION_PATCH)), max(1, round(width * _OCCLUSION_PATCH))
            rows = _patch_starts(height, patch_h)
            cols = _patch_starts(width, patch_w)
            boxes = [(y, x) for y in rows for x in cols]
            cover = torch.zeros(height, width, device=images.device)
            for y, x in boxes:
                cover[y : y + patch_h, x : x + patch_w] += 1
            maps = torch.zeros(images.shape[0], height, width, device=images.device)
            for n in range(images.shape[0]):
                target = index[n : n + 1]
                reference = _class_score(logits[n : n + 1], target, single)
                for start in range(0, len(boxes), _OCCLUSION_BATCH):
                    chunk = boxes[start : start + _OCCLUSION_BATCH]
                    occluded = images[n].expand(len(chunk), -1, -1, -1).clone()
                    for k, (y, x) in enumerate(chunk):
                        occluded[k, :, y : y + patch_h, x : x + patch_w] = 0.0  # the normalisation mean
                    drops = reference - _class_score(self.model(occluded), target.expand(len(chunk)), single)
                    for k, (y, x) in enumerate(chunk):
                        maps[n, y : y + patch_h, x : x + patch_w] += drops[k]
        return self._result((maps / cover).clamp(min=0), logits, index, (len(rows), len(cols)))

    def _capture(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ConfigError(f"--target-layer {self.target_layer!r}: expected a N x C x H x W feature map; got {got}")
        if torch.is_grad_enabled() and not output.requires_grad:
            # Frozen layers up to here: start the graph at this map. The clone makes it a
            # non-leaf, so in-place ops downstream (DenseNet's relu_) still work.
            output = output.detach().requires_grad_(True).clone()
        # Keep the tensor the rest of the network receives: in-place ops after the layer
        # (DenseNet's relu) show in its values, and gradients are taken w.r.t. that version.
        self._activation = output
        return output

    def _class_index(self, logits: torch.Tensor, choice: ClassChoice) -> torch.Tensor:
        n, k = logits.shape
        n_classes = 2 if k == 1 else k
        if choice is None:
            index = (logits[:, 0] >= 0).long() if k == 1 else logits.argmax(dim=1)
        else:
            if callable(choice):
                choice = choice(logits)
            index = torch.as_tensor(choice, device=logits.device).long().reshape(-1)
            if index.numel() == 1:
                index = index.expand(n)
            if index.numel() != n:
                raise ValueError(f"class_index: expected one class or {n} (one per image); got {index.numel()}")
        if index.numel() and not (0 <= int(index.min()) and int(index.max()) < n_classes):
            raise ConfigError(f"class_index: got {index.tolist()}; the model has {n_classes} classes (0-{n_classes - 1})")
        return index.contiguous()

    def _cam(self, activation: torch.Tensor, index: torch.Tensor, sign: torch.Tensor | None, k: int) -> torch.Tensor:
        weight = self.head.weight.detach().float()
        if weight.shape[0] != k or weight.shape[1] != activation.shape[1]:
            raise ConfigError(
                f"--method cam: {self.model_name}'s head maps {weight.shape[1]} features to {weight.shape[0]} outputs, but "
                f"layer {self.target_layer!r} has {activation.shape[1]} channels and the model {k} outputs; CAM needs "
                "the layer to feed global average pooling straight into the Linear head. Use --method gradcam"
            )
        weights = weight[0][None] * sign.float()[:, None] if sign is not None else weight[index]
        return torch.einsum("nc,nchw->nhw", weights.to(activation.device), activation)

    def _resolve_layer(self, name: str | None) -> tuple[str, nn.Module]:
        if name is None:
            cam_layer = getattr(self.spec, "cam_layer", None)
            if cam_layer:
                name = cam_layer
            else:
                spatial = self._spatial_layers()
                if not spatial:
                    raise ConfigError(
                        f"{self.model_name}: no layer outputs a spatial feature map (N x C x H x W), so there is nothing to "
                        "localise; pass --target-layer"
                    )
                name = spatial[-1]
        for root in (self.root, self.model):
            try:
                layer = root.get_submodule(name)
            except AttributeError:
                continue
            self._layer_root = root  # the module the name is relative to
            return name, layer
        candidates = self._candidates()
        listed = ", ".join(candidates) if candidates else "none found"
        raise ConfigError(f"--target-layer {name!r}: no such layer in {self.model_name}; candidates: {listed}")

    def _spatial_layers(self) -> list[str]:
        """Modules whose output is N x C x H x W with H*W > 1, in the order their forward ends."""
        order: dict[str, None] = {}

        def hook(name: str) -> Callable:
            def record(module: nn.Module, args: Any, output: Any) -> None:
                if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[-1] * output.shape[-2] > 1:
                    order.pop(name, None)  # a module run twice counts where it last ran
                    order[name] = None

            return record

        handles = [module.register_forward_hook(hook(name)) for name, module in self.root.named_modules() if name]
        try:
            parameter = next(self.root.parameters(), None)
            probe = torch.zeros(
                1,
                _input_channels(self.root),
                _PROBE_SIZE,
                _PROBE_SIZE,
                device=parameter.device if parameter is not None else None,
                dtype=parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32,
            )
            with _eval_mode(self.root), torch.no_grad():
                self.root(probe)
        except Exception as exc:
            raise ConfigError(
                f"{self.model_name}: could not list its spatial layers with a {_PROBE_SIZE} px dry run "
                f"({exc.__class__.__name__}: {str(exc)[:120]}); pass --target-layer"
            ) from None
        finally:
            for handle in handles:
                handle.remove()
        return list(order)

    def _candidates(self) -> list[str]:
        """Spatial layers, most useful first: shallow names before their sub-layers, deepest (last) first."""
        spatial = self._spatial_layers()
        ranked = sorted(range(len(spatial)), key=lambda i: (spatial[i].count("."), -i))
        return [spatial[i] for i in ranked[:_MAX_CANDIDATES]]

    def _find_head(self) -> nn.Linear:
        head_name = getattr(self.spec, "head", None)
        if head_name:
            try:
                head = self.root.get_submodule(head_name)
            except AttributeError:
                head = None
            if isinstance(head, nn.Linear):
                return head
        linears = [module for module in self.root.modules() if isinstance(module, nn.Linear)]
        if not linears:
            raise ConfigError(
                f"--method cam: {self.model_name} has no nn.Linear head after global average pooling; use --method gradcam"
            )
        return linears[-1]


@dataclass(frozen=True)
class FeatureGrid:
    """Where a layer's cells sit on the input: cell (i, j) is centred on input pixel
    (offset_y + stride * i, offset_x + stride * j), pixel centres at integer coordinates."""

    stride: float
    offset_y: float
    offset_x: float


_GRIDS: dict[tuple, FeatureGrid | None] = {}


def feature_grid(model: nn.Module, layer_name: str) -> FeatureGrid | None:
    """Stride and offset of ``layer_name``'s cells on the input of ``model`` (cached per architecture).

    A randomly initialised copy of the model sees a batch of noise images of
    ``_GRID_PROBE_SIZE`` px; the stride is the probe size over the layer's size, and the
    offset is where the gradient of the central cell with respect to the input (its
    effective receptive field) has its centroid, less ``stride * index``. Random weights
    keep the receptive field symmetric about its geometric centre, which trained weights
    need not be. ``None`` (the caller then resizes as usual) when the model does not take a
    probe of that size or the layer has fewer than two cells per side there.
    """
    key = (type(model).__module__, type(model).__qualname__, layer_name, _signature(model))
    if key not in _GRIDS:
        _GRIDS[key] = _measure_grid(model, layer_name)
    return _GRIDS[key]


def _signature(model: nn.Module) -> tuple:
    """The module types and geometry settings that decide where cells look (not the weights)."""
    return tuple(
        (name, type(m).__name__, *(str(getattr(m, a, "")) for a in ("kernel_size", "stride", "padding", "dilation")))
        for name, m in model.named_modules()
    )


def _measure_grid(model: nn.Module, layer_name: str) -> FeatureGrid | None:
    # Callers may sit in inference mode (predict, serve): the copy and the probe need autograd.
    with torch.inference_mode(False), torch.enable_grad():
        return _probe_grid(model, layer_name)


def _probe_grid(model: nn.Module, layer_name: str) -> FeatureGrid | None:
    import copy

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
            x = torch.randn(batch, _input_channels(probe), _GRID_PROBE_SIZE, _GRID_PROBE_SIZE, generator=generator)
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


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode, then give every module back the train/eval mode it had."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def _check_logits(logits: Any, n: int) -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != n:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model output: expected N x K logits for {n} images; got {got}")


def _patch_starts(length: int, patch: int) -> list[int]:
    """Patch origins every half patch, the last one flush with the far edge."""
    stride = max(1, patch // 2)
    starts = list(range(0, max(length - patch, 0) + 1, stride))
    if starts[-1] != max(length - patch, 0):
        starts.append(length - patch)
    return starts


def _class_score(logits: torch.Tensor, index: torch.Tensor, single: bool) -> torch.Tensor:
    """Per-row evidence for the explained class: its log-probability (a single logit: signed logit)."""
    if single:
        return logits[:, 0].float() * (index * 2 - 1).float()
    return torch.log_softmax(logits.float(), dim=1).gather(1, index[:, None])[:, 0]


def _input_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3


def _grad_weighted(activation: torch.Tensor, grads: torch.Tensor, method: str) -> torch.Tensor:
    """N x h x w Grad-CAM or Grad-CAM++ map from N x C x h x w activations and gradients."""
    if method == "gradcam":
        weights = grads.mean(dim=(2, 3), keepdim=True)
    else:  # Grad-CAM++, closed form for an exponential class score
        grads2 = grads.pow(2)
        grads3 = grads2 * grads
        denominator = 2 * grads2 + activation.sum(dim=(2, 3), keepdim=True) * grads3
        nonzero = denominator != 0
        alpha = torch.where(nonzero, grads2 / torch.where(nonzero, denominator, torch.ones_like(denominator)), 0.0)
        weights = (alpha * grads.clamp(min=0)).sum(dim=(2, 3), keepdim=True)
    return (weights * activation).sum(dim=1).clamp(min=0)


def _normalize(maps: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] per map; constant maps become zeros."""
    flat = maps.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    span = high - low
    varies = span > _FLAT_TOLERANCE * torch.maximum(high.abs(), low.abs())
    scaled = (maps - low[:, None, None]) / torch.where(varies, span, torch.ones_like(span))[:, None, None]
    return torch.where(varies[:, None, None], scaled, torch.zeros_like(scaled)).clamp(0, 1).float()


# ---------------------------------------------------------------------- pictures


def overlay(image_gray: np.ndarray, cam: np.ndarray, *, alpha: float = 0.4) -> np.ndarray:
    """Blend a [0, 1] map, coloured with matplotlib's "jet", over a grayscale image.

    ``image_gray``: H x W uint8, or float (taken as [0, 1] when it lies there, else min-max
    stretched). ``cam``: H x W in [0, 1]. Returns H x W x 3 uint8.

    >>> rgb = overlay(np.full((4, 4), 128, np.uint8), np.eye(4))
    >>> rgb.shape, rgb.dtype.name
    ((4, 4, 3), 'uint8')
    """
    from matplotlib import colormaps

    image = np.asarray(image_gray)
    heat = np.asarray(cam, dtype=np.float64)
    if image.ndim != 2 or heat.shape != image.shape:
        raise ValueError(f"overlay: expected an H x W image and a map of the same shape; got {image.shape} and {heat.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay: alpha must lie in [0, 1]; got {alpha}")
    if image.dtype == np.uint8:
        gray = image / 255.0
    else:
        gray = image.astype(np.float64)
        low, high = float(gray.min()), float(gray.max())
        if low < 0 or high > 1:
            gray = (gray - low) / (high - low) if high > low else np.zeros_like(gray)
    colours = colormaps["jet"](np.clip(np.nan_to_num(heat), 0, 1))[..., :3]
    blended = (1 - alpha) * gray[..., None] + alpha * colours
    return np.clip(np.round(blended * 255), 0, 255).astype(np.uint8)


def save_overlay(path: str | Path, image_gray: np.ndarray, cam: np.ndarray, caption: str, *, alpha: float = 0.4) -> Path:
    """PNG of :func:`overlay` with a caption strip below it (PIL's default font).

    The overlay keeps its H x W pixels (centred, the canvas widened when the caption is
    wider than the image).
    """
    from PIL import Image, ImageDraw, ImageFont

    picture = Image.fromarray(overlay(image_gray, cam, alpha=alpha), mode="RGB")
    font = ImageFont.load_default()
    pad = 4
    left, top, right, bottom = ImageDraw.Draw(picture).textbbox((0, 0), caption, font=font)
    width = max(picture.width, right - left + 2 * pad)
    strip = bottom - top + 2 * pad
    canvas = Image.new("RGB", (width, picture.height + strip), (0, 0, 0))
    canvas.paste(picture, ((width - picture.width) // 2, 0))
    ImageDraw.Draw(canvas).text((pad - left, picture.height + pad - top), caption, fill=(255, 255, 255), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


# ---------------------------------------------------------------------- files


def explain_files(
    saved_model: Any,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    method: str = "gradcam",
    target_layer: str | None = None,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Explain the prediction of a saved model for each image file.

    Images are preprocessed as prediction does (``decode_image`` at the saved decode size,
    then the saved evaluation transform). The explained class is the prediction: for two
    classes the positive class when its temperature-scaled probability reaches the saved
    threshold, else the other class; for more classes the argmax. Writes, per image,
    ``out_dir/<stem>_<method>.png`` (the map over the image as the model saw it, i.e. the
    centre crop, with a caption such as ``PNEUMONIA p=0.93 (threshold 0.41)``) and
    ``out_dir/<stem>_<method>.npy`` (the float32 map in [0, 1] at the model's input size).
    Repeated stems get ``-2``, ``-3``, ... appended.

    Returns one row per image: ``path``, ``predicted`` (class name), ``probability`` (of the
    predicted class), ``probabilities`` ({class: p}), ``overlay`` and ``map`` (paths).
    """
    from medtransfer.data.decode import decode_image
    from medtransfer.data.datamodule import image_tensor

    if batch_size < 1:
        raise ConfigError(f"--batch-size: got {batch_size}; use 1 or more")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = list(saved_model.classes)
    binary = len(classes) == 2
    positive = saved_model.positive_index
    threshold = saved_model.threshold
    temperature = saved_model.temperature
    geometric, to_input = _split_transform(saved_model.transform())
    parameter = next(saved_model.model.parameters())

    def probabilities_of(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / temperature, dim=1)

    def decide(logits: torch.Tensor) -> torch.Tensor:
        probabilities = probabilities_of(logits)
        if binary:
            return torch.where(probabilities[:, positive] >= threshold, positive, 1 - positive)
        return probabilities.argmax(dim=1)

    rows: list[dict[str, Any]] = []
    used_stems: dict[str, int] = {}
    with ClassActivationMap(saved_model.model, target_layer=target_layer, method=method) as cam:
        for start in range(0, len(paths), batch_size):
            batch_paths = [Path(p) for p in paths[start : start + batch_size]]
            shown, inputs = [], []
            for path in batch_paths:
                decoded = np.array(decode_image(path, size=saved_model.info["decode_size"]))  # writable copy for torch
                pixels = geometric(image_tensor(decoded))
                model_input = to_input(pixels)
                shown.append(_gray(pixels) if geometric is not _identity else _gray_from_input(model_input))
                inputs.append(model_input)
            batch = torch.stack(inputs).to(device=parameter.device, dtype=parameter.dtype)
            result = cam(batch, class_index=decide)
            probabilities = probabilities_of(result.logits).cpu()
            maps = result.maps.cpu().numpy().astype(np.float32)
            for i, path in enumerate(batch_paths):
                index = int(result.class_index[i])
                predicted = classes[index]
                p = float(probabilities[i, index])
                if not binary:
                    caption = f"{predicted} p={p:.2f}"
                elif index == positive:
                    caption = f"{predicted} p={p:.2f} (threshold {threshold:.2f})"
                else:
                    p_pos = float(probabilities[i, positive])
                    caption = f"{predicted} p={p:.2f} ({classes[positive]} p={p_pos:.2f} < threshold {threshold:.2f})"
                stem = _unique_stem(f"{path.stem}_{method}", used_stems)
                map_path = out_dir / f"{stem}.npy"
                np.save(map_path, maps[i])
                overlay_path = save_overlay(out_dir / f"{stem}.png", shown[i], maps[i], caption)
                rows.append(
                    {
                        "path": str(path),
                        "predicted": predicted,
                        "probability": p,
                        "probabilities": {c: float(probabilities[i, j]) for j, c in enumerate(classes)},
                        "overlay": overlay_path,
                        "map": map_path,
                    }
                )
    return rows


def _identity(x: Any) -> Any:
    return x


def _split_transform(transform: Any) -> tuple[Callable, Callable]:
    """(uint8 geometric steps, the rest) of an eval transform, split before its ToDtype."""
    from torchvision.transforms import v2

    steps = list(getattr(transform, "transforms", []))
    for i, step in enumerate(steps):
        if isinstance(step, v2.ToDtype):
            return v2.Compose(steps[:i]), v2.Compose(steps[i:])
    return _identity, transform  # unknown layout: show the model input itself


def _gray(pixels: torch.Tensor) -> np.ndarray:
    """uint8 C x H x W -> uint8 H x W (channel mean)."""
    return pixels.float().mean(dim=0).round().clamp(0, 255).to(torch.uint8).numpy()


def _gray_from_input(model_input: torch.Tensor) -> np.ndarray:
    return model_input.float().mean(dim=0).numpy()  # overlay() min-max stretches floats


def _unique_stem(stem: str, used: dict[str, int]) -> str:
    count = used.get(stem, 0) + 1
    used[stem] = count
    return stem if count == 1 else f"{stem}-{count}"

