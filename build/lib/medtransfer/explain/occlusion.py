"""Occlusion sensitivity: what the decision depends on, without reading any layer.

Zeiler MD, Fergus R. *Visualizing and Understanding Convolutional Networks.* ECCV 2014.
Model-agnostic and layer-free: a square patch (1/8 of the side, moved by half its size) is
set to the normalisation mean, and each pixel's value is the mean drop of the class's
log-probability over the patches that cover it (negative drops clipped to 0). About 200
forward passes per image, so a cross-check rather than the default; it answers "what does
the decision depend on" where the last feature map is too coarse or mixes the whole image.

:class:`~medtransfer.explain.cam.ClassActivationMap` with ``method="occlusion"`` calls
:func:`occlusion_sensitivity` and normalises its maps like the gradient methods' maps.

>>> import torch
>>> from torch import nn
>>> mean_logit = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 1))  # one logit: evidence for class 1
>>> maps, cells = occlusion_sensitivity(mean_logit, torch.rand(1, 1, 16, 16), torch.tensor([1]))
>>> tuple(maps.shape), cells
((1, 16, 16), (15, 15))
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["occlusion_sensitivity"]

_OCCLUSION_PATCH = 1 / 8  # of the image side; moved by half a patch
_OCCLUSION_BATCH = 32  # occluded copies per forward pass


def occlusion_sensitivity(
    model: nn.Module, images: torch.Tensor, class_index: torch.Tensor, *, logits: torch.Tensor | None = None,
    multilabel: bool = False,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Unnormalised occlusion maps (N x H x W, >= 0) of ``class_index`` (N classes) and the patch grid (rows, cols).

    ``images`` are normalised N x C x H x W, so a patch of zeros is the normalisation mean.
    The model is run as it is (the caller chooses eval mode); ``logits`` of the unoccluded
    images may be passed when the caller has them already. A single-logit head scores class
    1 by its logit and class 0 by its negation. ``multilabel``: the outputs are independent
    sigmoids, and output k is scored by its own log-probability, log sigmoid(logit_k).
    """
    with torch.no_grad():
        if logits is None:
            logits = model(images)
        single = logits.shape[1] == 1 and not multilabel
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
            target = class_index[n : n + 1]
            reference = _class_score(logits[n : n + 1], target, single, multilabel)
            for start in range(0, len(boxes), _OCCLUSION_BATCH):
                chunk = boxes[start : start + _OCCLUSION_BATCH]
                occluded = images[n].expand(len(chunk), -1, -1, -1).clone()
                for k, (y, x) in enumerate(chunk):
                    occluded[k, :, y : y + patch_h, x : x + patch_w] = 0.0  # the normalisation mean
                drops = reference - _class_score(model(occluded), target.expand(len(chunk)), single, multilabel)
                for k, (y, x) in enumerate(chunk):
                    maps[n, y : y + patch_h, x : x + patch_w] += drops[k]
    return (maps / cover).clamp(min=0), (len(rows), len(cols))


def _patch_starts(length: int, patch: int) -> list[int]:
    """Patch origins every half patch, the last one flush with the far edge."""
    stride = max(1, patch // 2)
    starts = list(range(0, max(length - patch, 0) + 1, stride))
    if starts[-1] != max(length - patch, 0):
        starts.append(length - patch)
    return starts


def _class_score(logits: torch.Tensor, index: torch.Tensor, single: bool, multilabel: bool = False) -> torch.Tensor:
    """Per-row evidence for the explained class: its log-probability (a single logit: signed logit;
    multi-label: the finding's log-sigmoid)."""
    if multilabel:
        return nn.functional.logsigmoid(logits.float().gather(1, index[:, None])[:, 0])
    if single:
        return logits[:, 0].float() * (index * 2 - 1).float()
    return torch.log_softmax(logits.float(), dim=1).gather(1, index[:, None])[:, 0]
