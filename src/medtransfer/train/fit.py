"""The two ways a run fits its model; each writes history.csv and leaves the best weights in the model.

- :func:`fit_with_lightning`: Lightning with early stopping on validation loss, the best
  weights kept as safetensors and the latest epoch checkpointed for ``--resume``;
- :func:`train_probe_on_features`: a linear probe without augmentation, trained on backbone
  features computed once (see :mod:`medtransfer.train.feature_probe`).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from rich.console import Console

from medtransfer.config import TrainConfig
from medtransfer.data.datamodule import CachedImageDataset, TransferDataModule
from medtransfer.errors import DataError, TrainingInterrupted
from medtransfer.models.module import ClassifierModule
from medtransfer.models.strategies import TransferModel
from medtransfer.train.callbacks import BestWeights, HistoryWriter, write_history
from medtransfer.train.feature_probe import extract_features, train_head_on_features

__all__ = ["Fit", "fit_with_lightning", "train_probe_on_features"]


@dataclass(frozen=True)
class Fit:
    best_epoch: int  # 1-based epoch whose weights the model now holds
    stopped_early: bool
    features: dict[str, torch.Tensor] | None = None  # a linear probe's frozen-backbone train/val features, for reuse


def _trainer(config: TrainConfig, out: Path, *, accelerator: str, precision: str, callbacks: list) -> L.Trainer:
    return L.Trainer(
        max_epochs=config.epochs,
        accelerator=accelerator,
        devices=config.devices if accelerator == "gpu" else 1,
        precision=precision,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=config.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
        default_root_dir=out,
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
    checkpoints.mkdir(exist_ok=True)
    best = BestWeights(checkpoints / "best.safetensors")
    early_stopping = L.pytorch.callbacks.EarlyStopping(monitor="val/loss", mode="min", patience=config.patience)
    # The latest epoch for --resume (one file; last.ckpt links to it). The best weights are kept
    # by BestWeights as safetensors, so nothing is unpickled to reload them.
    latest = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=checkpoints, filename="latest", save_top_k=1, save_last="link", save_on_train_epoch_end=True
    )
    callbacks = [early_stopping, best, HistoryWriter(out / "history.csv"), latest]
    trainer = _trainer(config, out, accelerator=accelerator, precision=precision, callbacks=callbacks)
    last = checkpoints / "last.ckpt"
    try:
        with warnings.catch_warnings():
            # Frozen layers are in eval mode on purpose (their BatchNorm keeps pretrained statistics).
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resume and last.is_file() else None)
    except SystemExit:  # Lightning exits after a graceful Ctrl-C shutdown; last.ckpt holds the last full epoch
        if trainer.interrupted:
            raise TrainingInterrupted(out) from None
        raise
    if trainer.interrupted:
        raise TrainingInterrupted(out)
    if not best.path.is_file():
        raise DataError("training produced no finite validation loss; lower --lr or check the data")
    best.load_best(module.model.net)
    return Fit(best.best_epoch, bool(early_stopping.stopped_epoch > 0))


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
) -> Fit:
    """Linear probe without augmentation: one backbone pass over train and val, then the head trains on the features."""
    started = time.perf_counter()
    features = {
        name: extract_features(
            model, datasets[name], batch_size=max(64, config.batch_size), device=device, precision=precision,
            num_workers=workers,
        )
        for name in ("train", "val")
    }
    console.print(f"Feature pass: {sum(len(f) for f in features.values())} images in {time.perf_counter() - started:.1f} s")
    labels = {name: torch.as_tensor(datasets[name].labels) for name in ("train", "val")}
    history, best_state = train_head_on_features(
        model.head, features["train"], labels["train"], features["val"], labels["val"], epochs=config.epochs,
        lr=config.lr, weight_decay=config.weight_decay, batch_size=config.batch_size, class_weights=class_weights,
        patience=config.patience, seed=config.seed,
    )
    history[0]["seconds"] += time.perf_counter() - started - sum(r["seconds"] for r in history)  # the feature pass
    write_history(history, history_path)
    model.head.load_state_dict(best_state)
    best_epoch = min(history, key=lambda row: row["val_loss"])["epoch"]
    return Fit(best_epoch, len(history) < config.epochs, features)
