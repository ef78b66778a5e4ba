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

__all__ = ["AtomicCheckpointIO", "EpochSeeding", "ResumeCheckpoint", "checkpoint_to_resume"]

LAST_CHECKPOINT = "last.ckpt"


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
    """Saves ``last.ckpt`` at the end of every epoch (list it after the callbacks whose state it saves)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LAST_CHECKPOINT
        self.stopped = False

    def on_train_epoch_end(self, trainer, pl_module):
        self.stopped = bool(trainer.should_stop)  # early stopping has decided by now
        # the whole training state (optimizer, schedulers, callbacks) for --resume; said explicitly,
        # Lightning stops logging that weights_only was not set. Loading still never unpickles objects.
        trainer.save_checkpoint(self.path, weights_only=False)

    def state_dict(self) -> dict[str, Any]:
        return {"stopped": self.stopped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stopped = bool(state_dict.get("stopped", False))

    def on_fit_start(self, trainer, pl_module):
        if self.stopped:  # restored from a run that early stopping had ended: train no further
            trainer.should_stop = True


def checkpoint_to_resume(run_dir: Path, epochs_done: int) -> Path | None:
    """``checkpoints/last.ckpt`` of ``run_dir``, checked to load; None when no epoch had finished.

    ``epochs_done`` is the number of rows in history.csv. DataError (one line) when epochs
    finished but the checkpoint is missing, or when it cannot be read back whole.
    """
    path = Path(run_dir) / "checkpoints" / LAST_CHECKPOINT
    fresh = f"start again with `medtransfer train --config {Path(run_dir) / 'config.yaml'} --out NEW_FOLDER`"
    if not path.is_file():
        if epochs_done == 0:
            return None
        raise DataError(
            f"--resume {run_dir}: {epochs_done} epoch(s) finished but {path} is missing, so the run cannot continue "
            f"where it stopped; {fresh}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, ...: all mean "cannot continue from it"
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise DataError(f"--resume {run_dir}: {path} is truncated or unreadable ({reason}); {fresh}") from None
    if not isinstance(state, dict) or "state_dict" not in state or "loops" not in state:
        raise DataError(f"--resume {run_dir}: {path} is not a Lightning checkpoint of a medtransfer run; {fresh}")
    return path
