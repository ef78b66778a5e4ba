"""Device, precision, autocast, memory format, cores and batched inference (medtransfer.runtime)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from medtransfer import runtime
from medtransfer.errors import ConfigError
from medtransfer.runtime import (
    ACCELERATORS,
    PRECISIONS,
    autocast,
    available_cores,
    default_decode_workers,
    default_num_workers,
    device_for,
    place_batch,
    place_model,
    predict_logits,
    resolve_accelerator,
    resolve_precision,
)


# ----------------------------------------------------------------- validation


def test_unknown_accelerator_lists_every_valid_choice():
    with pytest.raises(ConfigError, match=r"--accelerator: got 'tpu'; choose one of auto, cpu, gpu, cuda") as info:
        resolve_accelerator("tpu")
    assert all(choice in str(info.value) for choice in ACCELERATORS)


def test_unknown_precision_lists_every_valid_choice():
    with pytest.raises(ConfigError, match=r"--precision: got 'fp8'; choose one of auto, 32-true, bf16-mixed, 16-mixed"):
        resolve_precision("fp8", "cpu")
    assert PRECISIONS == ("auto", "32-true", "bf16-mixed", "16-mixed")


@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_asking_for_a_gpu_without_one_says_what_to_use(monkeypatch, accelerator):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=rf"--accelerator {accelerator}: no CUDA GPU is visible; use --accelerator cpu"):
        resolve_accelerator(accelerator)


@pytest.mark.parametrize(("cuda", "given", "resolved", "device"), [
    (False, "auto", "cpu", "cpu"),
    (False, "cpu", "cpu", "cpu"),
    (True, "auto", "gpu", "cuda"),
    (True, "cuda", "gpu", "cuda"),
    (True, "cpu", "cpu", "cpu"),
])
def test_accelerator_resolution_and_device(monkeypatch, cuda, given, resolved, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_accelerator(given) == resolved
    assert device_for(given) == torch.device(device)


@pytest.mark.parametrize(("given", "accelerator", "cpu_bf16", "gpu_bf16", "expected"), [
    ("32-true", "gpu", True, True, "32-true"),  # an explicit choice is kept as it is
    ("16-mixed", "cpu", False, False, "16-mixed"),
    ("auto", "cpu", True, False, "bf16-mixed"),
    ("auto", "cpu", False, False, "32-true"),
    ("auto", "gpu", False, True, "bf16-mixed"),
    ("auto", "gpu", False, False, "16-mixed"),
])
def test_auto_precision_follows_the_hardware(monkeypatch, given, accelerator, cpu_bf16, gpu_bf16, expected):
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_bf16)
    assert resolve_precision(given, accelerator) == expected


# ----------------------------------------------------------------- autocast and memory format


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)])
def test_autocast_on_cpu_sets_the_matmul_dtype(precision, dtype):
    a, b = torch.rand(8, 16), torch.rand(16, 4)
    with autocast(torch.device("cpu"), precision):
        product = a @ b
    assert product.dtype == dtype
    torch.testing.assert_close(product.float(), a @ b, atol=0.1, rtol=0.02)


def test_place_model_and_batch_use_channels_last_unless_told_otherwise():
    model = place_model(nn.Conv2d(3, 4, 3), torch.device("cpu"))
    assert model.weight.is_contiguous(memory_format=torch.channels_last)
    batch = place_batch(torch.rand(2, 3, 8, 8), torch.device("cpu"))
    assert batch.is_contiguous(memory_format=torch.channels_last) and not batch.is_contiguous()
    plain = place_batch(batch, torch.device("cpu"), channels_last=False)
    assert plain.is_contiguous()
    assert place_model(model, torch.device("cpu"), channels_last=False).weight.is_contiguous()


# ----------------------------------------------------------------- cores


def test_available_cores_is_the_affinity_mask():
    assert available_cores() >= 1
    if hasattr(os, "sched_getaffinity"):
        assert available_cores() == len(os.sched_getaffinity(0))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity (Linux)")
def test_available_cores_follows_a_narrowed_affinity_mask():
    """taskset / cgroup cpusets narrow the mask: the count follows (checked in a child process)."""
    first = min(os.sched_getaffinity(0))
    code = (
        "import os; os.sched_setaffinity(0, {%d}); "
        "from medtransfer.runtime import available_cores, default_decode_workers, default_num_workers; "
        "print(available_cores(), default_decode_workers(), default_num_workers('cpu'), default_num_workers('gpu'))"
    ) % first
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.split() == ["1", "1", "0", "1"]


@pytest.mark.parametrize(("cores", "decode", "cpu_loader", "gpu_loader"), [
    (1, 1, 0, 1), (2, 2, 1, 1), (4, 4, 1, 3), (32, 8, 1, 8),
])
def test_default_workers_per_core_count(monkeypatch, cores, decode, cpu_loader, gpu_loader):
    monkeypatch.setattr(runtime, "available_cores", lambda: cores)
    assert default_decode_workers() == decode
    assert default_num_workers("cpu") == cpu_loader
    assert default_num_workers("gpu") == default_num_workers("cuda") == gpu_loader


# ----------------------------------------------------------------- batched inference


def test_predict_logits_equals_the_model_on_the_whole_set_in_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).train()
    images = torch.rand(10, 3, 12, 12)
    dataset = TensorDataset(images, torch.zeros(10, dtype=torch.long))
    logits = predict_logits(model, dataset, batch_size=3)
    assert not model.training
    assert isinstance(logits, np.ndarray) and logits.dtype == np.float32 and logits.shape == (10, 2)
    with torch.no_grad():
        expected = model(images).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_predict_logits_on_an_empty_set_is_an_empty_array():
    empty = TensorDataset(torch.zeros(0, 3, 4, 4), torch.zeros(0, dtype=torch.long))
    assert predict_logits(nn.Conv2d(3, 1, 1), empty).shape == (0, 0)


def test_runtime_imports_only_torch_the_standard_library_and_errors():
    code = (
        "import json, sys; before = set(sys.modules); import medtransfer.runtime; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    loaded = set(json.loads(out.stdout))
    assert {m for m in loaded if m.startswith("medtransfer")} == {"medtransfer", "medtransfer.errors", "medtransfer.runtime"}
    assert not {m.split(".")[0] for m in loaded} & {"lightning", "torchvision", "PIL", "timm", "sklearn", "pandas"}


# ----------------------------------------------------------------- distributed ranks

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
                  "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (0, 0, 1, True)),  # a plain process
        ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}, (3, 1, 4, False)),  # torchrun
        ({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2"}, (1, 1, 2, False)),  # Lightning's launcher
        ({"LOCAL_RANK": "0", "NODE_RANK": "1", "WORLD_SIZE": "4"}, (1, 0, 4, False)),  # another node is never 0
        ({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}, (5, 1, 8, False)),  # srun
        ({"SLURM_PROCID": "0", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}, (1, 1, 2, False)),  # launched inside one task
    ],
)
def test_ranks_come_from_the_launchers_environment_before_the_process_group_exists(monkeypatch, env, expected):
    from medtransfer.runtime import global_rank, is_global_zero, local_rank, world_size

    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert (global_rank(), local_rank(), world_size(), is_global_zero()) == expected


def test_barrier_is_a_no_op_without_a_process_group():
    from medtransfer.runtime import barrier

    assert not torch.distributed.is_initialized()
    barrier()


def test_hardware_summary_records_the_distributed_setup():
    from medtransfer.runtime import hardware_summary

    summary = hardware_summary(accelerator="cpu", precision="32-true", devices=2, num_nodes=3, distributed="ddp")
    assert summary | {"cpu": "x", "cores": 1, "torch": "x"} == {
        "accelerator": "cpu", "devices": 2, "num_nodes": 3, "world_size": 6, "distributed": "ddp",
        "precision": "32-true", "gpu": None, "cpu": "x", "cores": 1, "torch": "x",
    }
    assert summary["cpu"] and summary["cores"] >= 1


def test_hardware_summary_names_the_gpu_on_cuda(monkeypatch):
    from medtransfer.runtime import hardware_summary

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")
    summary = hardware_summary(accelerator="gpu", precision="bf16-mixed", devices=8)
    assert (summary["gpu"], summary["world_size"], summary["distributed"]) == ("NVIDIA H100 80GB HBM3", 8, "none")


# ----------------------------------------------------------------- several devices


def test_map_in_order_deals_items_in_turn_to_one_thread_per_slot_and_keeps_input_order():
    import threading
    import time

    seen: dict[int, set] = {0: set(), 1: set()}

    def work(slot: int, item: int) -> tuple[int, int]:
        seen[slot].add(threading.get_ident())
        time.sleep(0.02 if item % 3 == 0 else 0.0)  # slot 0 sometimes slower: results must still come in order
        return slot, item * item

    results = list(runtime.map_in_order(work, range(9), 2, ahead=2))
    assert [r for _, r in results] == [i * i for i in range(9)]
    assert [slot for slot, _ in results] == [i % 2 for i in range(9)]
    assert len(seen[0]) == len(seen[1]) == 1 and seen[0] != seen[1]  # a device's copy is only used by its own thread


def test_map_in_order_passes_a_failure_on_and_stops_early_without_leaking_threads():
    import threading

    def work(slot: int, item: int) -> int:
        if item == 5:
            raise ValueError("batch 5 failed")
        return item

    before = threading.active_count()
    with pytest.raises(ValueError, match="batch 5 failed"):
        list(runtime.map_in_order(work, range(20), 2))
    stream = runtime.map_in_order(work, range(20), 3)
    assert [next(stream), next(stream)] == [0, 1]
    stream.close()
    assert threading.active_count() == before


def test_predict_logits_on_two_devices_equals_one_device_in_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    dataset = TensorDataset(torch.rand(11, 3, 12, 12), torch.zeros(11, dtype=torch.long))
    one = predict_logits(model, dataset, batch_size=2)
    two = predict_logits(model, dataset, batch_size=2, devices=[torch.device("cpu"), torch.device("cpu")])
    np.testing.assert_array_equal(one, two)


def test_devices_resolve_to_every_gpu_a_count_or_ids_and_refuse_the_rest(monkeypatch):
    from medtransfer.runtime import resolve_devices

    assert resolve_devices("auto", "cpu") == resolve_devices("1", "cpu") == [torch.device("cpu")]
    with pytest.raises(ConfigError, match=r"--devices 2: on the CPU .* use --devices auto or 1"):
        resolve_devices("2", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_devices("auto", "gpu") == [torch.device("cuda", i) for i in range(4)]
    assert resolve_devices("2", "auto") == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert resolve_devices("0,3", "cuda") == [torch.device("cuda", 0), torch.device("cuda", 3)]
    for bad, message in [("5", "4 GPU\\(s\\) visible"), ("1,1", "at most once"), ("0", "4 GPU"),
                         ("x", "use auto, a count like 2, or GPU ids like 0,1")]:
        with pytest.raises(ConfigError, match=f"--devices.*{message}"):
            resolve_devices(bad, "gpu")
