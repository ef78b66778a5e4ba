"""Lightning callbacks: history.csv, the best weights, gradual unfreezing and weight averaging.

history.csv and ``checkpoints/best.safetensors`` are :class:`EpochFiles`: projections of the
state that ``checkpoints/last.ckpt`` commits. Each epoch's record (its history row, the best
score and epoch) is part of the checkpoint; the files are written from it only after the
checkpoint's atomic rename (:class:`~medtransfer.train.checkpointing.ResumeCheckpoint`), and
rewritten from it on resume (:func:`~medtransfer.train.checkpointing.restore_epoch_files`),
so a kill anywhere leaves either the previous epoch's or the new epoch's state, whole.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning, EMAWeightAveraging, StochasticWeightAveraging
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medtransfer.safeio import atomic_path, write_csv_atomic

WEIGHT_AVERAGING = ("none", "ema", "swa")

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


def _metric(trainer: L.Trainer, *names: str) -> float:
    for name in names:
        value = trainer.callback_metrics.get(name)
        if value is not None:
            return float(value)
    return math.nan


class EpochFiles(L.Callback):
    """A callback whose files are projections of the epoch's committed state.

    Alone, it writes them at the end of each epoch. With :class:`ResumeCheckpoint` in the
    trainer (``deferred`` set by it), they are written by that callback right after
    ``last.ckpt`` is renamed into place, so they never run ahead of the checkpoint.
    """

    deferred = False

    def write_files(self) -> None:
        raise NotImplementedError

    def on_train_epoch_end(self, trainer, pl_module):
        if not self.deferred and not trainer.sanity_checking and trainer.is_global_zero:
            self.write_files()


class HistoryWriter(EpochFiles):
    """One row per finished epoch (validation runs before this hook), kept in the checkpoint and
    written to history.csv whole: a resumed run's history is the checkpoint's, later rows dropped."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []
        self._started = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        # Every rank reads the metrics: reading them syncs across ranks (a collective), so a rank
        # that skipped it would wait in the next one alone. Only rank 0 writes the run folder.
        row = {
            "epoch": trainer.current_epoch + 1,
            "train_loss": _metric(trainer, "train/loss_epoch", "train/loss"),
            "train_acc": _metric(trainer, "train/acc"),
            "val_loss": _metric(trainer, "val/loss"),
            "val_acc": _metric(trainer, "val/acc"),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - self._started, 2),
        }
        self.rows = [r for r in self.rows if int(r["epoch"]) < row["epoch"]] + [row]  # a repeated epoch replaces its row
        super().on_train_epoch_end(trainer, pl_module)

    def write_files(self) -> None:
        write_history(self.rows, self.path)

    def state_dict(self):
        return {"rows": [{k: row[k] for k in HISTORY_COLUMNS} for row in self.rows]}

    def load_state_dict(self, state_dict):
        self.rows = [dict(row) for row in state_dict.get("rows", [])]

    def on_train_start(self, trainer, pl_module):
        if trainer.ckpt_path and not self.rows and trainer.current_epoch > 0:
            # a checkpoint from before the rows were kept in it: history.csv up to its epoch
            self.rows = [r for r in read_history(self.path) if r["epoch"] <= trainer.current_epoch]


def write_history(rows: list[dict], path: Path) -> None:
    write_csv_atomic(path, HISTORY_COLUMNS, ([row[k] for k in HISTORY_COLUMNS] for row in rows))


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [{k: float(v) if k != "epoch" else int(v) for k, v in row.items()} for row in csv.DictReader(handle)]


BEST_EPOCH_KEY = "medtransfer_epoch"  # safetensors metadata of best.safetensors: the epoch of its weights


def save_best(state: dict[str, torch.Tensor], path: Path, epoch: int) -> None:
    """The best weights, written atomically and labelled with their epoch (checked on resume)."""
    with atomic_path(path) as temporary:
        save_file(state, str(temporary), metadata={BEST_EPOCH_KEY: str(int(epoch))})


def best_file_epoch(path: Path) -> int | None:
    """The epoch recorded in a best-weights file; None when absent, unlabelled (older runs) or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return int((handle.metadata() or {})[BEST_EPOCH_KEY])
    except Exception:  # missing, unreadable, or written before the label existed: nothing to compare
        return None


class BestWeights(EpochFiles):
    """Keeps the weights with the lowest validation loss as safetensors (no pickle to reload).

    The best score and epoch are checkpointed; the weights of a new best wait in memory until the
    epoch is committed, then go to ``path`` labelled with their epoch.
    """

    def __init__(self, path: Path, monitor: str = "val/loss", averaging: L.Callback | None = None):
        self.path = path
        self.monitor = monitor
        self.averaging = averaging  # with EMA, validation scores the averaged weights, so those are kept
        self.best_score = math.inf
        self.best_epoch = 0
        self._pending: tuple[int, dict[str, torch.Tensor]] | None = None

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        score = trainer.callback_metrics.get(self.monitor)
        if score is None or not math.isfinite(float(score)) or float(score) >= self.best_score:
            return
        self.best_score = float(score)
        self.best_epoch = trainer.current_epoch + 1
        if not trainer.is_global_zero:  # every rank tracks the (synced) best score; rank 0 writes it
            return
        source = pl_module
        average = getattr(self.averaging, "_average_model", None)  # EMA: swapped back after validation
        if average is not None:
            source = average.module
        state = {k: v.detach().cpu().clone().contiguous() for k, v in source.model.net.state_dict().items()}
        self._pending = (self.best_epoch, state)

    def write_files(self) -> None:
        if self._pending is not None:
            epoch, state = self._pending
            save_best(state, self.path, epoch)
            self._pending = None

    def load_best(self, model: torch.nn.Module) -> None:
        model.load_state_dict(load_file(str(self.path)), strict=True)

    def state_dict(self):
        return {"best_score": self.best_score, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict):
        self.best_score = state_dict["best_score"]
        self.best_epoch = state_dict["best_epoch"]


class GradualUnfreezing(BaseFinetuning):
    """Gradual unfreezing (ULMFiT): the head trains alone, then every `every` epochs the next child
    group from the head down thaws and joins the optimizer at lr * lr_decay**depth.

    What is frozen is decided by the epoch number alone, so it is the same on every DDP rank,
    and a resumed run re-applies it at its first epoch; the optimizer's added groups come back
    from this callback's checkpointed state (BaseFinetuning), the scheduler is extended to them.
    """

    def __init__(self, every: int = 1, lr_decay: float = 1.0):
        super().__init__()
        self.every = every
        self.lr_decay = lr_decay

    def thawed_groups(self, groups: list[str], epoch: int) -> list[str]:
        """The child groups (from the head down) that train in 0-based `epoch`."""
        return groups[: epoch // self.every]

    def freeze_before_training(self, pl_module) -> None:
        model = pl_module.model
        model.freeze(list(dict.fromkeys(model.frozen + model.child_groups())))

    def finetune_function(self, pl_module, epoch: int, optimizer) -> None:
        model = pl_module.model
        groups = model.child_groups()
        thawed = self.thawed_groups(groups, epoch)
        model.freeze([name for name in dict.fromkeys(model.frozen + groups) if name not in thawed])
        present = {group.get("name") for group in optimizer.param_groups}
        head = optimizer.param_groups[0]
        scale = head["lr"] / head.get("initial_lr", head["lr"])  # where the schedule is now
        for depth, name in enumerate(groups, start=1):
            if name in thawed and name not in present:
                base = head.get("initial_lr", head["lr"]) * self.lr_decay**depth
                params = [p for p in model.net.get_submodule(name).parameters() if p.requires_grad]
                optimizer.add_param_group({"name": name, "params": params, "lr": base * scale, "initial_lr": base})

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        for config in trainer.lr_scheduler_configs:  # LambdaLR schedules only the groups it was built with
            scheduler = config.scheduler
            groups = scheduler.optimizer.param_groups
            if hasattr(scheduler, "lr_lambdas") and len(scheduler.lr_lambdas) < len(groups):
                scheduler.lr_lambdas = [scheduler.lr_lambdas[0]] * len(groups)
                scheduler.base_lrs = [group["initial_lr"] for group in groups]


def weight_averaging_callback(name: str, *, lr: float, ema_decay: float) -> L.Callback | None:
    """Lightning's EMA (validated and saved: the averaged weights, BN statistics averaged too) or
    SWA (averages the last 20% of epochs at lr/10, then recomputes BN statistics in one extra pass)."""
    if name == "ema":
        return EMAWeightAveraging(decay=ema_decay, use_buffers=True)
    if name == "swa":
        return StochasticWeightAveraging(swa_lrs=lr / 10, swa_epoch_start=0.8, annealing_epochs=1)
    return None

