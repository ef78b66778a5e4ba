"""What the detector reads, captured on the classifier's own forward pass (one pass for logits and score).

Forward hooks take the channel statistics (:func:`~medtransfer.ood.scores.channel_statistics`) of
the named backbone layers' outputs and a pre-hook takes the head's input (the penultimate
features). Hooks run while the model is traced, so the ONNX export computes the same score.

    >>> scored = ScoredModel(model, detector)              # doctest: +SKIP
    >>> logits, ood_score = scored(images)                 # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import torch
from torch import nn

from medtransfer.ood.detector import PENULTIMATE, OODDetector
from medtransfer.ood.scores import channel_statistics
from medtransfer.runtime import autocast

__all__ = ["LogitsAndScore", "ScoredModel", "capture", "collect_features", "pick_layers"]

MAX_LAYER_CHANNELS = 1024  # wider maps would need a (2c)^2 whitening matrix of over 16 MB


class TransferModel(Protocol):
    """What capture reads of a classifier (models.strategies.TransferModel, a layer this one may not import):
    a backbone `net` whose named layers are hooked, and the `head` whose input is the penultimate feature."""

    training: bool

    @property
    def net(self) -> nn.Module: ...

    @property
    def head(self) -> nn.Module: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...

    def eval(self) -> nn.Module: ...

    def train(self, mode: bool = True) -> nn.Module: ...


@contextlib.contextmanager
def capture(model: TransferModel, layers: Sequence[str], *, first_only: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward of `model` fills the dict: PENULTIMATE -> the head's
    input, each layer name (a submodule of model.net) -> the channel statistics of its output. With
    `first_only` a later call of `model` in the block leaves the first call's values in place."""
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        if not (first_only and name in captured):
            captured[name] = value

    handles = [model.head.register_forward_pre_hook(lambda _module, args: keep(PENULTIMATE, args[0].flatten(1)))]
    for name in layers:
        handles.append(model.net.get_submodule(name).register_forward_hook(
            lambda _module, _args, output, name=name: keep(name, channel_statistics(output))))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def collect_features(
    model: TransferModel, batches: Iterable, layers: Sequence[str], *, device: torch.device, precision: str
) -> dict[str, torch.Tensor]:
    """Everything the detector reads (float32, on the CPU) for images in `batches` ((image, label) pairs or images)."""
    was_training = model.training
    model.eval().to(device)
    chunks: dict[str, list[torch.Tensor]] = {}
    try:
        with capture(model, layers) as captured:
            for batch in batches:
                images = batch[0] if isinstance(batch, (list, tuple)) else batch
                with autocast(device, precision):
                    model(images.to(device, non_blocking=True))
                for name, value in captured.items():
                    chunks.setdefault(name, []).append(value.float().cpu())
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("collect_features: no images")
    return {name: torch.cat(parts) for name, parts in chunks.items()}


@torch.no_grad()
def pick_layers(model: TransferModel, candidates: Sequence[str], image_size: int, in_channels: int = 3) -> list[str]:
    """Of the backbone's layers in forward order, the last one at each spatial resolution but the final one
    (which the penultimate features already summarise), up to MAX_LAYER_CHANNELS channels."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [model.net.get_submodule(name).register_forward_hook(
        lambda _module, _args, output, name=name: shapes.__setitem__(name, tuple(getattr(output, "shape", ()))))
        for name in candidates]
    was_training = model.training
    try:
        parameter = next(model.parameters())
        model.eval()(torch.zeros(1, in_channels, image_size, image_size, device=parameter.device, dtype=parameter.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    spatial = [(name, shapes[name]) for name in candidates  # a pooled (n, c, 1, 1) output is no stage
               if len(shapes.get(name, ())) == 4 and shapes[name][2] * shapes[name][3] > 1]
    last_at: dict[tuple[int, ...], str] = {}  # (height, width) -> layer
    for name, shape in spatial:
        last_at[shape[2:]] = name  # insertion order is forward order; a later layer at the same size wins
    chosen = list(last_at.values())[:-1]
    return [name for name in chosen if shapes[name][1] <= MAX_LAYER_CHANNELS]


class ScoredModel(nn.Module):
    """The classifier returning (logits, ood_score), both from one forward pass.

    For predict, evaluate, serve and the ONNX export.
    """

    def __init__(self, model: nn.Module, detector: OODDetector):
        """`model`: a TransferModel, or a network averaging several (test-time views, ensemble members;
        ``members``): the detector then reads the first member's first call, the evaluation crop, as fitted."""
        super().__init__()
        self.model = model
        self.detector = detector
        self.reader = getattr(model, "members", [model])[0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with capture(self.reader, self.detector.reads, first_only=True) as captured:
            logits = self.model(images)
        return logits, self.detector.score(captured)


class LogitsAndScore(nn.Module):
    """ScoredModel with one output, (n, classes + 1): logits then the score, for runtime.predict_logits."""

    def __init__(self, scored: ScoredModel):
        super().__init__()
        self.scored = scored

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits, score = self.scored(images)
        return torch.cat([logits.float(), score[:, None].float()], dim=1)
