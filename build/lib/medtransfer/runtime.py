"""Where and how models run: device, precision, autocast, memory format, cores, batched inference.

One module for train, predict, evaluate, explain, serve and the benchmarks, so that every
command picks the same device and precision for the same flags. Imports only torch, the
standard library and medtransfer.errors.

    >>> accelerator = resolve_accelerator("auto")          # "gpu" when CUDA is visible, else "cpu"
    >>> precision = resolve_precision("auto", accelerator)  # bf16 autocast where the hardware has it
    >>> with autocast(device_for(accelerator), precision):  # doctest: +SKIP
    ...     logits = model(place_batch(images, device_for(accelerator)))
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medtransfer.errors import ConfigError

if TYPE_CHECKING:  # numpy arrays come out of torch; no import needed at run time
    import numpy as np

__all__ = [
    "ACCELERATORS",
    "PRECISIONS",
    "autocast",
    "available_cores",
    "barrier",
    "cpu_name",
    "cpu_supports_bf16",
    "default_decode_workers",
    "default_num_workers",
    "device_for",
    "global_rank",
    "hardware_summary",
    "is_global_zero",
    "local_rank",
    "map_in_order",
    "memory_format",
    "place_batch",
    "place_model",
    "predict_logits",
    "replicate",
    "resolve_accelerator",
    "resolve_devices",
    "resolve_precision",
    "world_size",
]

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")


# --------------------------------------------------------------------------- device and precision


def resolve_accelerator(accelerator: str) -> str:
    """``"cpu"`` or ``"gpu"`` for a value of :data:`ACCELERATORS`; ConfigError when no GPU is visible."""
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"--accelerator: got {accelerator!r}; choose one of {', '.join(ACCELERATORS)}")
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--accelerator {accelerator}: no CUDA GPU is visible; use --accelerator cpu or auto")
    return "gpu" if accelerator == "cuda" else accelerator


def device_for(accelerator: str) -> torch.device:
    """The torch device for a value of :data:`ACCELERATORS`."""
    return torch.device("cuda" if resolve_accelerator(accelerator) == "gpu" else "cpu")


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bfloat16 kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, accelerator: str) -> str:
    """A Lightning precision string; ``auto`` picks bf16 autocast where the hardware has it.

    ``accelerator`` is a resolved one (``"cpu"`` or ``"gpu"``). bf16 on CPUs with
    AVX512-BF16/AMX is about 2x faster than fp32; GPUs without bf16 get fp16 autocast.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision: got {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if accelerator == "gpu":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_supports_bf16() else "32-true"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast for a mixed precision, a no-op context for ``32-true``."""
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- memory format


def memory_format(channels_last: bool = True) -> torch.memory_format:
    """NHWC (channels_last), which oneDNN and tensor cores run convolutions fastest in, or NCHW."""
    return torch.channels_last if channels_last else torch.contiguous_format


def place_model(model: nn.Module, device: torch.device, *, channels_last: bool = True) -> nn.Module:
    """``model`` moved to ``device`` in the memory format its batches will have (mode unchanged)."""
    return model.to(device).to(memory_format=memory_format(channels_last))


def place_batch(images: torch.Tensor, device: torch.device, *, channels_last: bool = True) -> torch.Tensor:
    """A batch ``N x C x H x W`` moved to ``device`` in the chosen memory format."""
    return images.to(device, non_blocking=True).contiguous(memory_format=memory_format(channels_last))


# --------------------------------------------------------------------------- cores


def available_cores() -> int:
    """Cores this process may run on, at least 1.

    The affinity mask where the platform has one (taskset, cgroup cpusets and Slurm set
    it), else the machine's count.
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_decode_workers() -> int:
    """Decoding is CPU-bound and runs before training starts: use the cores (up to 8)."""
    return max(1, min(8, available_cores()))


def default_num_workers(accelerator: str) -> int:
    """DataLoader workers: CPU training shares the cores with the model, so one; GPUs get more."""
    cores = available_cores()
    if accelerator in ("gpu", "cuda"):
        return max(1, min(8, cores - 1))
    return 1 if cores > 1 else 0


# --------------------------------------------------------------------------- batched inference


def predict_logits(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device = torch.device("cpu"),
    precision: str = "32-true",
    channels_last: bool = True,
    devices: Sequence[torch.device] | None = None,
) -> np.ndarray:
    """Logits (float32, n x classes) in dataset order; the model is put in eval mode.

    ``dataset`` yields ``(image, label)`` pairs; the labels are ignored. With ``devices``
    (several GPUs) each gets a copy of the model and the batches in turn, one thread per
    device (:func:`map_in_order`); ``device`` is then ignored.
    """
    models = replicate(model.eval(), list(devices or [device]), channels_last=channels_last)
    targets = list(devices or [device])
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)

    def forward(slot: int, batch: tuple) -> torch.Tensor:
        with torch.inference_mode(), autocast(targets[slot], precision):  # both are per thread
            return models[slot](place_batch(batch[0], targets[slot], channels_last=channels_last)).float().cpu()

    outputs = list(map_in_order(forward, loader, len(models)))
    return torch.cat(outputs).numpy() if outputs else torch.zeros((0, 0), dtype=torch.float32).numpy()


# --------------------------------------------------------------------------- several devices

Item = TypeVar("Item")
Result = TypeVar("Result")


def resolve_devices(devices: str, accelerator: str) -> list[torch.device]:
    """The devices inference runs on, for ``--devices``: ``auto`` every visible GPU (or the CPU),
    a count N the first N GPUs, ``0,2`` those GPUs. ``accelerator`` is a value of :data:`ACCELERATORS`."""
    spec = str(devices).strip().replace(" ", "")
    if resolve_accelerator(accelerator) == "cpu":
        if spec not in ("auto", "1"):
            raise ConfigError(f"--devices {devices}: on the CPU inference is one process using every core; "
                              "use --devices auto or 1 (several devices need GPUs)")
        return [torch.device("cpu")]
    visible = torch.cuda.device_count()
    if spec == "auto":
        ids = list(range(visible))
    elif spec.isdigit() and "," not in spec:
        ids = list(range(int(spec)))
    elif all(part.isdigit() for part in spec.rstrip(",").split(",")):
        ids = [int(part) for part in spec.rstrip(",").split(",")]
    else:
        raise ConfigError(f"--devices: got {devices!r}; use auto, a count like 2, or GPU ids like 0,1")
    if not ids or max(ids) >= visible or len(set(ids)) != len(ids):
        raise ConfigError(f"--devices {devices}: {visible} GPU(s) visible (ids 0 to {visible - 1}); "
                          "name each at most once, or use --devices auto")
    return [torch.device("cuda", i) for i in ids]


def replicate(model: nn.Module, devices: Sequence[torch.device], *, channels_last: bool = True) -> list[nn.Module]:
    """One copy of ``model`` per device (the first is ``model`` itself, moved), each placed once."""
    return [place_model(model if i == 0 else copy.deepcopy(model), device, channels_last=channels_last)
            for i, device in enumerate(devices)]


def map_in_order(
    work: Callable[[int, Item], Result], items: Iterable[Item], workers: int, *, ahead: int = 2
) -> Iterator[Result]:
    """``work(slot, item)`` for each item, item k on slot ``k % workers``, results in input order.

    Each slot is one thread (one device: its model copy is only ever used by that thread);
    at most ``workers * ahead`` items are in flight, so memory stays bounded for a stream.
    With one worker the items run in the calling thread.
    """
    if workers == 1:
        yield from (work(0, item) for item in items)
        return
    pools = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"device{slot}") for slot in range(workers)]
    pending: deque = deque()
    try:
        for k, item in enumerate(items):
            pending.append(pools[k % workers].submit(work, k % workers, item))
            if len(pending) >= workers * ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # also when the consumer stops early or a batch fails: no thread outlives the call
        for future in pending:
            future.cancel()
        for pool in pools:
            pool.shutdown(wait=True)


# --------------------------------------------------------------------------- distributed ranks


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def local_rank() -> int:
    """This process's index on its node: torchrun and Lightning set LOCAL_RANK, srun SLURM_LOCALID; else 0."""
    return _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0


def global_rank() -> int:
    """This process's index among all processes of the run (0 when not distributed).

    The process group's rank once it exists; before that (data loading runs before
    Lightning starts the group) the launcher's environment: RANK (torchrun), LOCAL_RANK and
    NODE_RANK (Lightning's own launcher; a process on another node is never rank 0), or
    SLURM_PROCID (srun). LOCAL_RANK comes before SLURM_PROCID because processes that
    Lightning launches inside one SLURM task inherit that task's SLURM_PROCID.
    """
    if _distributed():
        return torch.distributed.get_rank()
    rank = _env_int("RANK")
    if rank is not None:
        return rank
    if "LOCAL_RANK" in os.environ:
        node = _env_int("NODE_RANK", "GROUP_RANK") or 0
        per_node = _env_int("LOCAL_WORLD_SIZE") or (local_rank() + 1)
        return node * per_node + local_rank()
    return _env_int("SLURM_PROCID") or 0


def world_size() -> int:
    """How many processes train together (1 when not distributed)."""
    if _distributed():
        return torch.distributed.get_world_size()
    return _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1


def is_global_zero() -> bool:
    """True in the one process that writes the run folder."""
    return global_rank() == 0


def barrier() -> None:
    """Wait for every process of the group; a no-op before the group exists or when alone."""
    if _distributed() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


# --------------------------------------------------------------------------- hardware record


def hardware_summary(
    *, accelerator: str, precision: str, devices: int = 1, num_nodes: int = 1, distributed: str = "none"
) -> dict[str, object]:
    """What ran the training, for metrics.json and the report (keys may be added, never renamed)."""
    gpu = torch.cuda.get_device_name(0) if accelerator == "gpu" and torch.cuda.is_available() else None
    return {
        "accelerator": accelerator,
        "devices": devices,
        "num_nodes": num_nodes,
        "world_size": devices * num_nodes,
        "distributed": distributed,
        "precision": precision,
        "gpu": gpu,
        "cpu": cpu_name(),
        "cores": available_cores(),
        "torch": torch.__version__,
    }


def cpu_name() -> str:
    """The CPU model ("AMD EPYC 7B13"), from /proc/cpuinfo on Linux, else the platform's machine name."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
