"""Class activation maps: where in the image the evidence for a class lies.

Four methods on a spatial feature map of the backbone (the "target layer"), and one that
needs no layer:

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
- ``"layercam"``: Jiang PT, Zhang CB, Hou Q, Cheng MM, Wei Y. *LayerCAM: Exploring
  Hierarchical Class Activation Maps for Localization.* IEEE TIP 2021. Each position's
  activations are weighted by the positive part of their own gradient (not a channel
  mean), which keeps a shallower layer's finer map on the evidence. Its default layer is
  the last stride-16 stage (:func:`~medtransfer.explain.layers.stride_layer`: ``blocks.4``
  of EfficientNet-Lite0, ``layer3`` of ResNet), the last layer when there is none.
- ``"occlusion"``: occlusion sensitivity (Zeiler and Fergus, ECCV 2014), model-agnostic
  and layer-free; see :mod:`medtransfer.explain.occlusion`.

Every map is upsampled (bilinear) to the input size and min-max normalised to [0, 1] per
image; a constant map (e.g. all zero after the ReLU) is returned as zeros, never NaN.

The cells of a layer's map are drawn where the network looks, not at the middle of their
block (see :mod:`medtransfer.explain.grid`); the placement is measured once per model object.

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medtransfer.errors import ConfigError, DataError
from medtransfer.explain.grid import FeatureGrid, feature_grid, upsample
from medtransfer.explain.layers import candidate_layers, eval_mode, spatial_layers, stride_layer
from medtransfer.explain.occlusion import occlusion_sensitivity

__all__ = ["LAYERCAM_STRIDE", "LAYER_FREE", "METHODS", "METHOD_NAMES", "CamResult", "ClassActivationMap"]

METHODS = ("cam", "gradcam", "gradcam++", "layercam", "occlusion")
METHOD_NAMES = {"cam": "CAM", "gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "layercam": "LayerCAM",
                "occlusion": "occlusion sensitivity"}  # as people write them, for pages and captions
LAYER_FREE = "input"  # target_layer reported by the occlusion method, which needs none

LAYERCAM_STRIDE = 16  # LayerCAM's default layer: the last stage at this stride
_FLAT_TOLERANCE = 1e-6  # a map whose range is below this fraction of its magnitude is constant

ClassChoice = int | Sequence[int] | torch.Tensor | Callable[[torch.Tensor], Any] | None


@dataclass
class CamResult:
    """What :class:`ClassActivationMap` returns for a batch of N images of H x W.

    maps: N x H x W float32 in [0, 1] (zeros where the map is constant).
    logits: N x K model outputs. probabilities: N x K softmax of the logits, or N x 2
        ``[1 - sigmoid, sigmoid]`` for a single-logit head (K = 1); multi-label: N x K
        sigmoid of each logit (uncalibrated).
    class_index: N class indices explained (for a single-logit head 1 = positive logit,
        0 = its negation; multi-label: the output index, also for K = 1).
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
    """CAM / Grad-CAM / Grad-CAM++ / LayerCAM on one layer of a classifier (or occlusion), as a context manager.

    Args:
        model: a :class:`~medtransfer.models.strategies.TransferModel` or any ``nn.Module``
            mapping N x C x H x W images to N x K logits.
        target_layer: dotted module name, relative to ``model.net`` for a TransferModel
            (``"layer4"``) or to ``model`` otherwise. ``None`` picks, for ``"layercam"``, the
            last stride-16 stage (see the module docstring), otherwise ``spec.cam_layer`` when
            the backbone spec is known, else the last module whose output is a 4-D map with
            more than one spatial position (found by a dry forward pass whose temporary
            hooks are removed). ``"occlusion"`` reads no layer (its ``target_layer`` is
            :data:`LAYER_FREE`) and registers no hook.
        method: one of :data:`METHODS` (see the module docstring for the papers).
        spec: the :class:`~medtransfer.models.backbones.BackboneSpec`; taken from
            ``model.spec`` when omitted.
        multilabel: the K outputs are independent sigmoids, one per finding
            (:mod:`medtransfer.task`): ``class_index`` k targets logit k for any K, a single
            logit included (never its negation); occlusion scores the finding's log-sigmoid
            instead of a log-softmax over the findings.

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
        self, model: nn.Module, *, target_layer: str | None = None, method: str = "gradcam", spec: Any = None,
        multilabel: bool = False,
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"--method: got {method!r}; choose one of {', '.join(METHODS)}")
        self.model = model
        self.method = method
        self.multilabel = multilabel
        self.spec = spec if spec is not None else getattr(model, "spec", None)
        inner = getattr(model, "net", None)
        self.root: nn.Module = inner if isinstance(inner, nn.Module) and hasattr(model, "spec") else model
        self.model_name = getattr(self.spec, "name", None) or type(self.root).__name__
        self.layer: nn.Module | None
        self._layer_root: nn.Module | None = None  # what target_layer is relative to (set by _resolve_layer)
        if method == "occlusion":
            if target_layer is not None:
                raise ConfigError(f"--target-layer {target_layer!r}: --method occlusion reads no layer; leave it out")
            self.target_layer, self.layer = LAYER_FREE, None
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
            assert self._layer_root is not None  # set with the layer by _resolve_layer
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
        head class 1 when the logit is >= 0; multi-label: the highest logit); an int explains that class for every image; a
        sequence gives one class per image; a callable receives the detached N x K logits
        and returns the N classes (how :func:`~medtransfer.explain.files.explain_files` applies the saved threshold).
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
            with eval_mode(self.model), torch.inference_mode(False), torch.set_grad_enabled(needs_grad):
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
                single = logits.shape[1] == 1 and not self.multilabel
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
        if self.multilabel:
            probabilities = torch.sigmoid(logits.float())
        elif logits.shape[1] == 1:
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

    def _occlusion(self, images: torch.Tensor, class_index: ClassChoice) -> CamResult:
        """Occlusion sensitivity of the model in eval mode, normalised like the layer maps."""
        with eval_mode(self.model), torch.no_grad():
            logits = self.model(images)
            _check_logits(logits, images.shape[0])
            index = self._class_index(logits, class_index)
            maps, cells = occlusion_sensitivity(self.model, images, index, logits=logits, multilabel=self.multilabel)
        return self._result(maps, logits, index, cells)

    # ------------------------------------------------------------------ internals

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
        n_classes = 2 if k == 1 and not self.multilabel else k
        if choice is None:
            index = (logits[:, 0] >= 0).long() if n_classes != k else logits.argmax(dim=1)
        else:
            if callable(choice):
                choice = choice(logits)
            index = torch.as_tensor(choice, device=logits.device).long().reshape(-1)
            if index.numel() == 1:
                index = index.expand(n)
            if index.numel() != n:
                raise ValueError(f"class_index: expected one class or {n} (one per image); got {index.numel()}")
        if index.numel() and not (0 <= int(index.min()) and int(index.max()) < n_classes):
            what = "findings" if self.multilabel else "classes"
            raise ConfigError(f"class_index: got {index.tolist()}; the model has {n_classes} {what} (0-{n_classes - 1})")
        return index.contiguous()

    def _cam(self, activation: torch.Tensor, index: torch.Tensor, sign: torch.Tensor | None, k: int) -> torch.Tensor:
        assert self.head is not None  # method "cam": __init__ found the Linear head
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
        if name is None and self.method == "layercam":
            name = stride_layer(self.root, LAYERCAM_STRIDE, self.model_name)
        if name is None:
            cam_layer = getattr(self.spec, "cam_layer", None)
            if cam_layer:
                name = cam_layer
            else:
                spatial = spatial_layers(self.root, self.model_name)
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

    def _candidates(self) -> list[str]:
        return candidate_layers(self.root, self.model_name)

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


def _check_logits(logits: Any, n: int) -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != n:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model output: expected N x K logits for {n} images; got {got}")


def _grad_weighted(activation: torch.Tensor, grads: torch.Tensor, method: str) -> torch.Tensor:
    """N x h x w Grad-CAM, Grad-CAM++ or LayerCAM map from N x C x h x w activations and gradients."""
    if method == "gradcam":
        weights = grads.mean(dim=(2, 3), keepdim=True)
    elif method == "layercam":  # a weight per channel and position
        weights = grads.clamp(min=0)
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
