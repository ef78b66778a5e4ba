"""WiSE-FT (Wortsman et al., CVPR 2022): interpolate the starting and the fine-tuned weights.

theta(a) = (1 - a) * theta0 + a * theta1, where theta0 is the network before fine-tuning
(pretrained backbone with its starting head; after LP-FT's probe phase, with the probed
head) and theta1 the fine-tuned one. Every floating-point tensor is interpolated, BatchNorm
running statistics included; integer buffers (BN's batch counters) keep theta1's value.
The coefficient is chosen on the validation split only: the grid point with the lowest
validation cross-entropy of the uncalibrated logits (ties: the larger a, closer to the
fine-tuned model). The start is saved as checkpoints/start.safetensors, so a resumed run
interpolates from the same theta0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from medtransfer.models.strategies import TransferModel
from medtransfer.runtime import predict_logits
from medtransfer.safeio import atomic_path
from medtransfer.task import Task

GRID = tuple(round(0.1 * i, 1) for i in range(11))
CRITERION = "val_loss"  # cross-entropy of the uncalibrated logits on the validation split

__all__ = ["CRITERION", "GRID", "choose_mixing", "interpolate", "load_or_save_start"]


def net_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in net.state_dict().items()}


def load_or_save_start(net: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """theta0: read from `path` when a resumed run saved it, else taken from `net` now and saved.

    Written atomically before epoch 1: a resume reads it back, so it is whole or absent (then
    taken again from the same seeded start)."""
    if path.is_file():
        return load_file(str(path))
    state = net_state(net)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        save_file(state, str(temporary))
    return state


def interpolate(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * start + alpha * end for floating-point tensors; `end`'s value for the others."""
    return {
        k: torch.lerp(start[k].to(v.dtype), v, alpha) if v.is_floating_point() else v.clone()
        for k, v in end.items()
    }


def choose_mixing(
    model: TransferModel, start: dict[str, torch.Tensor], val: Dataset, labels: Sequence[int] | np.ndarray, *, batch_size: int,
    num_workers: int, device: torch.device, precision: str, task: Task | None = None,
) -> dict:
    """Load theta(a) with the best validation loss over GRID into `model.net`; return the record.

    The record: {"alpha", "criterion", "grid", "val_loss"} (one loss per grid point), as
    stored in metrics.json and model.json.
    """
    end = net_state(model.net)
    target = torch.as_tensor(np.asarray(labels))
    loss_of = task.loss if task is not None else nn.functional.cross_entropy
    losses = []
    for alpha in GRID:
        model.net.load_state_dict(interpolate(start, end, alpha))
        logits = torch.as_tensor(predict_logits(
            model, val, batch_size=batch_size, num_workers=num_workers, device=device, precision=precision
        )).float()
        losses.append(round(float(loss_of(logits, target)), 6))
    best = min(range(len(GRID)), key=lambda i: (losses[i], -GRID[i]))
    model.net.load_state_dict(interpolate(start, end, GRID[best]))
    return {"alpha": GRID[best], "criterion": CRITERION, "grid": list(GRID), "val_loss": losses}
