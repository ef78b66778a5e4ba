"""The network inference runs: test-time augmentation views x ensemble members, logits averaged.

One implementation for every path that turns a model input into logits - train's own
validation and test predictions (so the temperature and threshold are chosen on what the
saved model will output), ``evaluate``, ``predict``, ``serve`` and the ONNX graph (the
views are tensor operations on the normalised input, so the exporter traces them).

Test-time augmentation (``tta``):

- ``none``: the evaluation crop only;
- ``crops``: the evaluation crop plus four slightly shifted and scaled views: the
  corner crops of side 0.9, resized back (each shifts the image by 5% and zooms it by 11%).
  No flips: left and right carry meaning in a radiograph (heart, situs, side markers);
- ``flip``: the evaluation crop and its horizontal mirror. Offered for anatomy without
  a preferred side; questionable for lateralised anatomy (chest, where the heart is left).

Averaging: the mean of the logits, not of the probabilities. Everything downstream reads
logits (the temperature fitted on validation, ``SavedModel.decide``, the ONNX ``logits``
output), so the averaged network stays a drop-in classifier; the temperature is fitted on
the averaged logits, which re-calibrates what a mean of logits (a normalised geometric mean
of the probabilities) sharpens. The first view is always the evaluation crop and the first
member runs first, so a hook on :attr:`AveragedNetwork.head` (the OOD guard's
``ScoredModel``) sees the first member's evaluation-crop features first.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from medtransfer.errors import ConfigError, MedtransferError, WeightsError
from medtransfer.models.backbones import create_backbone
from medtransfer.models.heads import apply_head
from medtransfer.models.strategies import TransferModel

__all__ = [
    "TTA_MODES", "AveragedNetwork", "check_tta", "expected_shapes", "inference_network", "load_member", "override_warning",
    "tta_views", "weights_header",
]

TTA_MODES = ("none", "crops", "flip")
CROP_SIDE = 0.9  # side of the shifted crops, as a fraction of the input side


def check_tta(value: str, *, option: str = "--tta") -> str:
    if value not in TTA_MODES:
        raise ConfigError(f"{option}: got {value!r}; choose one of {', '.join(TTA_MODES)}")
    return value


def override_warning(saved: str, tta: str) -> str:
    """What `predict/evaluate --tta` says when it runs a model with another TTA than it was calibrated with."""
    return (f"warning: --tta {tta}: the model's temperature and threshold were chosen on validation with tta {saved}; "
            f"with {tta} its outputs, hence the operating point, differ from those reported")


def tta_views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views of a normalised N x C x H x W batch; the first is the batch itself."""
    check_tta(mode)
    if mode == "none":
        return [images]
    if mode == "flip":
        return [images, torch.flip(images, dims=[3])]
    height, width = int(images.shape[-2]), int(images.shape[-1])  # fixed in the ONNX graph (only the batch varies)
    h, w = max(1, round(height * CROP_SIDE)), max(1, round(width * CROP_SIDE))
    views = [images]
    for top, left in ((0, 0), (0, width - w), (height - h, 0), (height - h, width - w)):
        crop = images[:, :, top : top + h, left : left + w]
        views.append(F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False))
    return views


class AveragedNetwork(nn.Module):
    """Mean logits of every member over every view of the input (members run in order)."""

    def __init__(self, members: list[nn.Module], tta: str = "none"):
        super().__init__()
        if not members:
            raise ConfigError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.tta = check_tta(tta)

    @property
    def head(self) -> nn.Module:
        """The first member's classifier: its first call is the first member on the evaluation crop."""
        return cast(nn.Module, self.members[0].head)  # a TransferModel's (nn.Module types attributes Tensor | Module)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        views = tta_views(images, self.tta)
        total: torch.Tensor | None = None
        for member in self.members:
            for view in views:
                logits = member(view).float()
                total = logits if total is None else total + logits
        assert total is not None  # at least one member (checked in __init__) and one view
        return total / (len(self.members) * len(views))


def inference_network(members: list[nn.Module], tta: str) -> nn.Module:
    """The single model itself when there is nothing to average (no wrapper, no overhead), else AveragedNetwork."""
    if len(members) == 1 and check_tta(tta) == "none":
        return members[0]
    return AveragedNetwork(members, tta)


RESTORE = "restore the model folder from a backup, or train the model again with `medtransfer train`"


def weights_header(weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors file's header; no tensor is read.

    safetensors checks that the header is whole and that its tensors cover the file exactly, so a
    truncated or garbage file fails here. Raises WeightsError naming the file and what to do."""
    if not weights.is_file():
        raise WeightsError(f"{weights} is missing; the model folder is incomplete: {RESTORE}")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{weights}: truncated or corrupt, not a readable safetensors file "
                           f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}): {RESTORE}") from None


@functools.lru_cache(maxsize=8)
def expected_shapes(backbone: str, num_classes: int, in_channels: int, output_stride: int, head: str) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of the network `load_member` builds, computed on the meta device: no memory
    is allocated, so a model.json naming a huge backbone costs nothing until its weights are shown to fit."""
    try:
        with torch.device("meta"):
            net, spec = create_backbone(backbone, num_classes=num_classes, weights="none", in_channels=in_channels,
                                        output_stride=output_stride)
            apply_head(net, spec, head)
    except MedtransferError:
        raise
    except Exception as exc:  # a timm architecture that cannot be built this way (its own assertion or shape error)
        raise ConfigError(f"cannot be built ({type(exc).__name__}: {str(exc)[:100]})") from None
    return {name: tuple(tensor.shape) for name, tensor in net.state_dict().items()}


def check_fits(weights: Path, expected: dict[str, tuple[int, ...]], *, backbone: str, source: str) -> None:
    """WeightsError unless the file's header holds exactly the `expected` tensor names and shapes."""
    given = weights_header(weights)
    wrong = sorted(f"{k} {given[k]} vs {expected[k]}" for k in set(given) & set(expected) if given[k] != expected[k])
    problems = [f"{len(items)} {title} (e.g. {', '.join(items[:2])})" for title, items in (
        ("wrong shapes", wrong), ("missing tensors", sorted(set(expected) - set(given))),
        ("unexpected tensors", sorted(set(given) - set(expected)))) if items]
    if problems:
        raise WeightsError(f"--run {source}: {weights.name} does not fit backbone {backbone} as model.json describes it: "
                           f"{'; '.join(problems)[:300]}. The weights and model.json come from different models: {RESTORE}")


def load_member(
    weights: Path, *, backbone: str, num_classes: int, in_channels: int, output_stride: int, head: str, source: str
) -> TransferModel:
    """A TransferModel (eval mode) rebuilt from its architecture and a safetensors file; WeightsError names `source`.

    The file's header is checked against the architecture's shapes (on the meta device) before anything
    is built, so a truncated, foreign or mismatched file is refused without allocating the network."""
    check_fits(weights, expected_shapes(backbone, num_classes, in_channels, output_stride, head), backbone=backbone,
               source=source)
    net, spec = create_backbone(
        backbone, num_classes=num_classes, weights="none", in_channels=in_channels, output_stride=output_stride
    )
    apply_head(net, spec, head)
    try:
        net.load_state_dict(load_file(str(weights)), strict=True)
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{weights}: truncated or corrupt ({str(exc)[:120]}): {RESTORE}") from None
    except RuntimeError as exc:
        raise WeightsError(f"--run {source}: weights do not fit {backbone}: {str(exc).splitlines()[0][:200]}") from None
    return TransferModel(net, spec).eval()
