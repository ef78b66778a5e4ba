"""What makes `train --resume` continue exactly where a killed run stopped.

- :class:`EpochSeeding`: the random state of each training batch is a function of (seed,
  epoch, batch), not of what the process did before, so a resumed process draws the same
  dropout and augmentation as the uninterrupted one (the sampler does the same for the
  order of images: :class:`~medtransfer.data.datamodule.EpochSampler`). Lightning restores
  the model, optimiser, schedule and loop counters, but not the random generators.
- :class:`ResumeCheckpoint`: ``checkpoints/last.ckpt`` at the end of every epoch, written
  atomically (:class:`AtomicCheckpointIO`); it records whether early stopping ended the
  run, so resuming a run that had stopped does not train one more epoch.
- :func:`checkpoint_to_resume`: the checkpoint a resume starts from, checked first: missing
  after an epoch finished, or truncated, is one line (never a silent restart from epoch 0).
  Checkpoints are loaded with ``weights_only=True``: they hold tensors and plain values only.
- :func:`restore_epoch_files`: on resume, history.csv and the best weights rewritten from
  the checkpoint's own record.

The commit order of an epoch (one process, or rank 0 under DDP):

1. validation; early stopping decides (at validation end, so its state is in step 2);
   a new best's weights are kept in memory only;
2. ``last.ckpt``: the whole state (model, optimiser, schedule, loop counters, EMA/SWA
   averages, early stopping, best score and epoch, every history row), written to a
   temporary file, fsync-ed, renamed: **the commit**;
3. ``best.safetensors`` (when the epoch improved; labelled with its epoch), then history.csv,
   both atomic, both derived from what step 2 committed.

A kill before the rename of step 2 leaves the previous epoch's state; after it, the new one's
(a resume rewrites whatever of step 3 is missing from the checkpoint). WiSE-FT's start weights
(``checkpoints/start.safetensors``) are written atomically once, before epoch 1.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from medtransfer.data.datamodule import derived_seed
from medtransfer.errors import DataError
from medtransfer.safeio import atomic_path
from medtransfer.train.callbacks import EpochFiles, best_file_epoch, read_history, save_best, write_history

__all__ = ["AtomicCheckpointIO", "EpochSeeding", "ResumeCheckpoint", "checkpoint_to_resume", "restore_epoch_files"]

LAST_CHECKPOINT = "last.ckpt"
BEST_WEIGHTS = "best.safetensors"
HISTORY = "history.csv"


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochSeeding(L.Callback):
    """Seeds python, numpy and torch before every training batch from (seed, epoch, batch)."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        seed_all(derived_seed(self.seed, trainer.current_epoch, batch_idx))

    def on_train_epoch_end(self, trainer, pl_module):
        # what runs between epochs (validation is deterministic) starts from a known state too
        seed_all(derived_seed(self.seed, trainer.current_epoch, -1))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file, fsync-ed, then renamed over the old one;
    read back with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            torch.save(checkpoint, temporary)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return torch.load(path, map_location="cpu", weights_only=True)


class ResumeCheckpoint(L.Callback):
    """Saves ``last.ckpt`` at the end of every epoch, then writes the :class:`EpochFiles` from the
    committed state (list it after the callbacks whose state it saves)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LAST_CHECKPOINT
        self.stopped = False
        self.epoch = 0  # epochs the checkpoint holds
        self._files: list[EpochFiles] = []

    def setup(self, trainer, pl_module, stage):
        self._files = [callback for callback in trainer.callbacks if isinstance(callback, EpochFiles)]
        for callback in self._files:
            callback.deferred = True  # written here, after the commit

    def on_train_epoch_end(self, trainer, pl_module):
        self.stopped = bool(trainer.should_stop)  # early stopping decides at validation end
        self.epoch = trainer.current_epoch + 1
        # the whole training state (optimizer, schedulers, callbacks) for --resume; said explicitly,
        # Lightning stops logging that weights_only was not set. Loading still never unpickles objects.
        trainer.save_checkpoint(self.path, weights_only=False)  # the commit: one atomic rename
        if trainer.is_global_zero:
            for callback in self._files:  # in callback order: best weights, then history.csv
                callback.write_files()

    def state_dict(self) -> dict[str, Any]:
        return {"stopped": self.stopped, "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stopped = bool(state_dict.get("stopped", False))
        self.epoch = int(state_dict.get("epoch", 0))

    def on_fit_start(self, trainer, pl_module):
        if self.stopped:  # restored from a run that early stopping had ended: train no further
            trainer.should_stop = True


def _fresh(run_dir: Path) -> str:
    return f"start again with `medtransfer train --config {Path(run_dir) / 'config.yaml'} --out NEW_FOLDER`"


def load_resume_checkpoint(run_dir: Path, epochs_done: int) -> dict[str, Any] | None:
    """``checkpoints/last.ckpt`` of ``run_dir`` loaded (CPU, ``weights_only``); None when no epoch had
    finished. ``epochs_done``: the rows of history.csv. DataError (one line) when epochs finished but the
    checkpoint is missing, or when it cannot be read back whole."""
    path = Path(run_dir) / "checkpoints" / LAST_CHECKPOINT
    if not path.is_file():
        if epochs_done == 0:
            return None
        raise DataError(
            f"--resume {run_dir}: {epochs_done} epoch(s) finished but {path} is missing, so the run cannot continue "
            f"where it stopped; {_fresh(run_dir)}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, ...: all mean "cannot continue from it"
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise DataError(f"--resume {run_dir}: {path} is truncated or unreadable ({reason}); {_fresh(run_dir)}") from None
    if not isinstance(state, dict) or "state_dict" not in state or "loops" not in state:
        raise DataError(f"--resume {run_dir}: {path} is not a Lightning checkpoint of a medtransfer run; {_fresh(run_dir)}")
    return state


def checkpoint_to_resume(run_dir: Path, epochs_done: int) -> Path | None:
    """``checkpoints/last.ckpt`` of ``run_dir``, checked to load; None when no epoch had finished
    (see :func:`load_resume_checkpoint`)."""
    if load_resume_checkpoint(run_dir, epochs_done) is None:
        return None
    return Path(run_dir) / "checkpoints" / LAST_CHECKPOINT


def _callback_state(state: dict[str, Any], name: str) -> dict[str, Any]:
    return next((v for k, v in (state.get("callbacks") or {}).items() if str(k).split("{")[0] == name), {})


def restore_epoch_files(run_dir: Path) -> str:
    """Before a resume: the run folder made to agree with its checkpoint, which alone says what finished.

    history.csv is rewritten from the checkpoint's rows (a row of an epoch the checkpoint does not hold
    is dropped, a missing last row restored); ``best.safetensors`` is rewritten from the checkpoint's
    weights when the checkpoint's last epoch is its best and the file holds another epoch; temporary
    files of interrupted atomic writes are removed. Returns where training continues, for the console.
    DataError (one line) when the files cannot belong to the checkpoint (a history longer than the
    checkpoint by more than the one epoch that may be uncommitted, best weights of an unknown epoch).
    """
    run_dir = Path(run_dir)
    folder = run_dir / "checkpoints"
    for leftover in [*folder.glob(".*.tmp*"), *run_dir.glob(f".{Path(HISTORY).stem}.*.tmp*")]:
        leftover.unlink(missing_ok=True)  # a temporary file of a write the kill interrupted: never renamed
    history = read_history(run_dir / HISTORY)
    state = load_resume_checkpoint(run_dir, len(history))
    if state is None:
        (folder / BEST_WEIGHTS).unlink(missing_ok=True)  # weights of an epoch that never committed
        return "no epoch had finished; training starts at epoch 1"
    epochs = int(_callback_state(state, "ResumeCheckpoint").get("epoch") or int(state.get("epoch", 0)) + 1)
    rows = _callback_state(state, "HistoryWriter").get("rows")
    if len(history) > epochs + 1:
        raise DataError(
            f"--resume {run_dir}: history.csv has {len(history)} epochs but {folder / LAST_CHECKPOINT} holds {epochs}, "
            f"so the checkpoint is older than the run; {_fresh(run_dir)}"
        )
    if rows is None:  # a checkpoint from before it kept the rows: history.csv up to its epoch
        rows = [r for r in history if r["epoch"] <= epochs]
    dropped = [int(r["epoch"]) for r in history if r["epoch"] > epochs]
    write_history(rows, run_dir / HISTORY)
    best_epoch = int(_callback_state(state, "BestWeights").get("best_epoch", 0))
    labelled = best_file_epoch(folder / BEST_WEIGHTS)
    present = (folder / BEST_WEIGHTS).is_file()
    stale = not present or (labelled is not None and labelled != best_epoch)  # unlabelled: an older run's, kept
    if best_epoch and stale:
        if best_epoch != epochs:
            held = f"holds epoch {labelled}" if present else "is missing"
            raise DataError(
                f"--resume {run_dir}: {folder / BEST_WEIGHTS} {held} but the checkpoint's best is epoch {best_epoch}, "
                f"whose weights are gone; {_fresh(run_dir)}"
            )
        weights = {k.removeprefix("model.net."): v.contiguous() for k, v in state["state_dict"].items()
                   if k.startswith("model.net.")}  # with EMA these are the averaged weights, as validated
        save_best(weights, folder / BEST_WEIGHTS, best_epoch)
    note = f" (epoch {', '.join(map(str, dropped))} had not been committed and runs again)" if dropped else ""
    return f"continues after epoch {epochs}{note}"
