"""Lightning callbacks that write the run directory's history.csv and best weights."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file, save_file

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


def _metric(trainer: L.Trainer, *names: str) -> float:
    for name in names:
        value = trainer.callback_metrics.get(name)
        if value is not None:
            return float(value)
    return math.nan


class HistoryWriter(L.Callback):
    """Appends one row per finished epoch to history.csv (validation runs before this hook)."""

    def __init__(self, path: Path):
        self.path = path
        self._started = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:  # under DDP only rank 0 writes the run folder
            return
        row = {
            "epoch": trainer.current_epoch + 1,
            "train_loss": _metric(trainer, "train/loss_epoch", "train/loss"),
            "train_acc": _metric(trainer, "train/acc"),
            "val_loss": _metric(trainer, "val/loss"),
            "val_acc": _metric(trainer, "val/acc"),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - self._started, 2),
        }
        rows = [r for r in read_history(self.path) if int(r["epoch"]) < row["epoch"]]  # a resumed epoch replaces its row
        write_history(rows + [row], self.path)


def write_history(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in HISTORY_COLUMNS} for row in rows)


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [{k: float(v) if k != "epoch" else int(v) for k, v in row.items()} for row in csv.DictReader(handle)]


class BestWeights(L.Callback):
    """Keeps the weights with the lowest validation loss as safetensors (no pickle to reload)."""

    def __init__(self, path: Path, monitor: str = "val/loss"):
        self.path = path
        self.monitor = monitor
        self.best_score = math.inf
        self.best_epoch = 0

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
        state = {k: v.detach().cpu().contiguous() for k, v in pl_module.model.net.state_dict().items()}
        temporary = self.path.with_suffix(".tmp")
        save_file(state, str(temporary))
        temporary.replace(self.path)

    def load_best(self, model: torch.nn.Module) -> None:
        model.load_state_dict(load_file(str(self.path)), strict=True)

    def state_dict(self):
        return {"best_score": self.best_score, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict):
        self.best_score = state_dict["best_score"]
        self.best_epoch = state_dict["best_epoch"]
