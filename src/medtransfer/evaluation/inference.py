"""Batched, deterministic inference: logits for a dataset, on the chosen device and precision."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medtransfer.errors import ConfigError

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")


def resolve_accelerator(accelerator: str) -> str:
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"--accelerator: got {accelerator!r}; choose one of {', '.join(ACCELERATORS)}")
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--accelerator {accelerator}: no CUDA GPU is visible; use --accelerator cpu or auto")
    return "gpu" if accelerator == "cuda" else accelerator


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, accelerator: str) -> str:
    """auto: bf16 autocast where the hardware has it (about 2x faster on CPUs with AVX512-BF16/AMX)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision: got {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if accelerator == "gpu":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_supports_bf16() else "32-true"


def autocast(device: torch.device, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def device_for(accelerator: str) -> torch.device:
    return torch.device("cuda" if resolve_accelerator(accelerator) == "gpu" else "cpu")


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device = torch.device("cpu"),
    precision: str = "32-true",
    channels_last: bool = True,
) -> np.ndarray:
    """Logits (float32, n x classes) in dataset order; the model is put in eval mode."""
    model.eval().to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    outputs = []
    for images, _ in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with autocast(device, precision):
            outputs.append(model(images).float().cpu())
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, 0), dtype=np.float32)
