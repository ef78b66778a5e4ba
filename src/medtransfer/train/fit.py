"""The two ways a run fits its model; each writes history.csv and leaves the best weights in the model.

- :func:`fit_with_lightning`: Lightning with early stopping on validation loss, the best
  weights kept as safetensors and the latest epoch checkpointed for ``--resume``;
- :func:`train_probe_on_features`: a linear probe without augmentation, trained on backbone
  features computed once (see :mod:`medtransfer.train.feature_probe`); also the first phase
  of LP-FT (:func:`probe_phase`).

The strategy's callbacks join the Lightning fit here: gradual unfreezing and weight
averaging (EMA: the averaged weights are validated and kept; SWA: the final averaged
weights are kept, early stopping is off since SWA averages up to the last epoch).

Running out of GPU memory during the fit is one line (ConfigError) naming a smaller
``--batch-size`` with ``--accumulate`` keeping the effective batch, and the ``--resume``
command that continues with them (:func:`out_of_memory_error`).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import lightning as L
import numpy as np
import torch
from rich.console import Console

from medtransfer.config import TrainConfig
from medtransfer.data.datamodule import CachedImageDataset, TransferDataModule
from medtransfer.errors import ConfigError, DataError, TrainingInterrupted
from medtransfer.models.module import ClassifierModule
from medtransfer.models.strategies import TransferModel
from medtransfer.runtime import is_global_zero
from medtransfer.task import Task
from medtransfer.train.callbacks import (
    BestWeights,
    GradualUnfreezing,
    HistoryWriter,
    read_history,
    weight_averaging_callback,
    write_history,
)
from medtransfer.train.checkpointing import AtomicCheckpointIO, EpochSeeding, ResumeCheckpoint
from medtransfer.train.feature_probe import extract_features, train_head_on_features
from medtransfer.train.tracking import EpochAUC, log_epochs, make_logger

__all__ = ["Fit", "fit_with_lightning", "probe_phase", "train_probe_on_features"]


@dataclass(frozen=True)
class Fit:
    best_epoch: int  # 1-based epoch whose weights the model now holds
    stopped_early: bool
    wise_ft: dict | None = None  # the WiSE-FT record when the weights were interpolated afterwards
    devices: int = 1  # per node
    num_nodes: int = 1
    distributed: str = "none"  # the Lightning strategy when several processes trained: ddp, ddp_spawn
    features: dict[str, torch.Tensor] | None = None  # a linear probe's frozen-backbone train/val features, for reuse


def _trainer(config: TrainConfig, out: Path, *, accelerator: str, precision: str, callbacks: list) -> L.Trainer:
    return L.Trainer(
        max_epochs=config.epochs,
        accelerator=accelerator,
        devices=config.devices,  # "auto": every visible GPU, or one CPU process
        num_nodes=config.num_nodes,
        strategy=config.distributed,
        use_distributed_sampler=False,  # TransferDataModule shards itself (weighted draws, unpadded validation)
        precision=precision,  # type: ignore[arg-type]  # a name resolve_precision checked
        accumulate_grad_batches=config.accumulate,  # effective batch = batch_size x accumulate
        callbacks=callbacks,
        logger=make_logger(config, out) if is_global_zero() else False,  # --logger: RUN/logs/, rank 0 writes
        enable_progress_bar=config.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
        default_root_dir=out,
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False,  # ResumeCheckpoint and BestWeights keep what a run needs
    )


def fit_with_lightning(
    module: ClassifierModule,
    datamodule: TransferDataModule,
    config: TrainConfig,
    out: Path,
    *,
    accelerator: str,
    precision: str,
    resume: bool,
) -> Fit:
    """Lightning fit with early stopping; loads the best-on-validation weights into the model.

    Raises TrainingInterrupted after Ctrl-C (the run can be resumed from its last full epoch).
    """
    checkpoints = out / "checkpoints"
    if is_global_zero():  # under torchrun every rank runs this; only rank 0 writes the run folder
        checkpoints.mkdir(parents=True, exist_ok=True)
    averaging = weight_averaging_callback(config.weight_averaging, lr=config.lr, ema_decay=config.ema_decay)
    swa = config.weight_averaging == "swa"
    best = BestWeights(checkpoints / "best.safetensors", averaging=None if swa else averaging)
    # SWA averages up to the last epoch: stopping early would skip the averaging.
    patience = config.epochs + 1 if swa else config.patience
    # Decides at validation end, so that the epoch's checkpoint holds its decision and counters (at the train epoch's
    # end, Lightning's default here, it would run after ResumeCheckpoint, and a resumed run would stop an epoch late).
    early_stopping = L.pytorch.callbacks.EarlyStopping(
        monitor="val/loss", mode="min", patience=patience, check_on_train_epoch_end=False
    )
    # The latest epoch for --resume, saved last (after the states it records), then the files derived from it:
    # the best weights, then history.csv, in this order (checkpointing.py). EpochSeeding makes an epoch's randomness
    # resumable.
    callbacks = [EpochSeeding(config.seed), EpochAUC(), early_stopping, best, HistoryWriter(out / "history.csv")]
    if config.strategy == "gradual":
        callbacks.insert(1, GradualUnfreezing(config.unfreeze_every, config.lr_decay))
    if averaging is not None:
        callbacks.insert(1, averaging)
    callbacks.append(ResumeCheckpoint(checkpoints))
    trainer = _trainer(config, out, accelerator=accelerator, precision=precision, callbacks=callbacks)
    last = checkpoints / "last.ckpt"
    if config.compile:
        module.model.net.compile()  # in place: parameter names, hence saved weights, are unchanged
    try:
        with warnings.catch_warnings():
            # Frozen layers are in eval mode on purpose (their BatchNorm keeps pretrained statistics).
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")  # small sets
            # SWA swaps the per-step schedule for its own per-epoch SWALR at its start, as intended.
            warnings.filterwarnings("ignore", message=r"SWA is currently only supported every epoch.*")
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resume and last.is_file() else None,
                        weights_only=True)
    except SystemExit:  # Lightning exits after a graceful Ctrl-C shutdown; last.ckpt holds the last full epoch
        if trainer.interrupted:
            raise TrainingInterrupted(out) from None
        raise
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory_error(config, out, accelerator) from None
    if trainer.interrupted:
        raise TrainingInterrupted(out)
    setup: dict[str, Any] = {"devices": trainer.num_devices, "num_nodes": trainer.num_nodes, "distributed": _distributed_name(trainer)}
    if not trainer.is_global_zero:  # only rank 0 goes on to evaluate and write the run folder
        return Fit(best.best_epoch, bool(early_stopping.stopped_epoch > 0), **setup)
    if not best.path.is_file():
        raise DataError("training produced no finite validation loss; lower --lr or check the data")
    if swa:  # the model holds the SWA average (BN statistics recomputed) after the last epoch
        return Fit(len(read_history(out / "history.csv")), False, **setup)
    best.load_best(module.model.net)
    if best.best_epoch == 0:  # ddp_spawn trained copies of the callbacks in other processes: read their files
        history = read_history(out / "history.csv")
        finite = [r for r in history if math.isfinite(r["val_loss"])]
        best_epoch = int(min(finite, key=lambda r: r["val_loss"])["epoch"]) if finite else 0
        return Fit(best_epoch, len(history) < config.epochs, **setup)
    return Fit(best.best_epoch, bool(early_stopping.stopped_epoch > 0), **setup)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or a RuntimeError that says the device (CUDA, MPS, CPU allocator) ran out."""
    text = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def out_of_memory_error(config: TrainConfig, out: Path, accelerator: str) -> ConfigError:
    """One line: what ran out, and the smaller batch (with accumulation keeping the effective batch) to resume with."""
    where = "GPU memory" if accelerator == "gpu" else "memory"
    effective = config.batch_size * config.accumulate
    if config.batch_size < 2:
        return ConfigError(
            f"out of {where} while training with --batch-size 1: use a smaller --image-size or backbone, or "
            f"--precision bf16-mixed, in a new run (--out NEW_FOLDER)"
        )
    k = next(d for d in range(2, config.batch_size + 1) if config.batch_size % d == 0)  # keeps the product whole
    return ConfigError(
        f"out of {where} while training with --batch-size {config.batch_size}: continue with a smaller batch and gradient "
        f"accumulation keeping the effective batch of {effective}: medtransfer train --resume {out} "
        f"--batch-size {config.batch_size // k} --accumulate {config.accumulate * k}"
    )


def _distributed_name(trainer: L.Trainer) -> str:
    """"none" for one process, else Lightning's strategy as --distributed names it (ddp, ddp_spawn)."""
    if trainer.world_size == 1:
        return "none"
    name = type(trainer.strategy).__name__.lower().removesuffix("strategy")  # DDPStrategy -> ddp
    start = getattr(trainer.strategy, "_start_method", "popen")
    return name if start == "popen" else f"{name}_{start}"


def train_probe_on_features(
    model: TransferModel,
    datasets: dict[str, CachedImageDataset],
    config: TrainConfig,
    history_path: Path,
    *,
    class_weights: list[float] | None,
    device: torch.device,
    precision: str,
    workers: int,
    console: Console,
    prefix: str = "",
    task: Task | None = None,
) -> Fit:
    """Linear probe without augmentation: one backbone pass over train and val, then the head trains on the features.

    The logger (--logger) gets the epochs with metric names starting with `prefix`."""
    started = time.perf_counter()
    features = {
        name: extract_features(
            model, datasets[name], batch_size=max(64, config.batch_size), device=device, precision=precision,
            num_workers=workers,
        )
        for name in ("train", "val")
    }
    console.print(f"Feature pass: {sum(len(f) for f in features.values())} images in {time.perf_counter() - started:.1f} s")
    labels = {name: torch.as_tensor(np.asarray(datasets[name].labels)) for name in ("train", "val")}
    history, best_state = train_head_on_features(
        model.head, features["train"], labels["train"], features["val"], labels["val"], epochs=config.epochs,
        lr=config.lr, weight_decay=config.weight_decay, batch_size=config.batch_size, class_weights=class_weights,
        patience=config.patience, seed=config.seed, task=task,
    )
    history[0]["seconds"] += time.perf_counter() - started - sum(r["seconds"] for r in history)  # the feature pass
    write_history(history, history_path)
    log_epochs(config, history_path.parent, history, prefix=prefix)
    model.head.load_state_dict(best_state)
    best_epoch = min(history, key=lambda row: row["val_loss"])["epoch"]
    return Fit(best_epoch, len(history) < config.epochs, features=features)


def probe_phase(model: TransferModel, datasets: dict[str, CachedImageDataset], config: TrainConfig, history_path: Path,
                **kwargs) -> Fit:
    """LP-FT's first phase: the head trains on frozen, unaugmented features for `lp_epochs` at `lp_lr`
    (history in `history_path`); the model keeps the best-on-validation head. `kwargs`: those of
    :func:`train_probe_on_features`."""
    settings = dataclasses.replace(config, epochs=config.lp_epochs, lr=config.lp_lr)
    return train_probe_on_features(model, datasets, settings, history_path, prefix="lp/", **kwargs)
