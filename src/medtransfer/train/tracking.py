"""Experiment tracking through Lightning loggers, offline, under RUN/logs/.

``--logger csv`` (default) writes RUN/logs/csv/{metrics.csv,hparams.yaml}; ``tensorboard``
writes an event file to RUN/logs/tensorboard/; ``mlflow`` a local file store at
RUN/logs/mlruns (tracking URI file:...), so nothing leaves the machine. Each gets the
run's settings as hyperparameters and, per epoch, train/val loss and accuracy and the
validation AUC (:class:`EpochAUC`). history.csv is written as before, whatever the logger.

The loggers' own files are written by Lightning, TensorBoard and MLflow, not atomically: they
are an append-only record of what ran (an epoch killed and run again on resume appears twice),
never what a resume continues from; that is ``checkpoints/last.ckpt``. The MLflow run ID, read
back on resume, is written atomically.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger

from medtransfer.config import TrainConfig
from medtransfer.errors import ConfigError, MissingExtraError, missing_extra
from medtransfer.evaluation.metrics import binary_metrics, multiclass_metrics
from medtransfer.privacy import shareable_settings
from medtransfer.safeio import write_text_atomic

LOGGERS = {"csv": None, "tensorboard": "tensorboard", "mlflow": "mlflow"}  # name -> the package it needs
LOG_DIR = "logs"
MLFLOW_RUN_ID = "mlflow_run_id.txt"  # under RUN/logs/: a resumed run logs into the same MLflow run


def check_logger(name: str) -> None:
    """ConfigError for an unknown logger, or one whose package is not installed."""
    if name not in LOGGERS:
        raise ConfigError(f"--logger: got {name!r}; choose one of {', '.join(LOGGERS)}")
    package = LOGGERS[name]
    if package and importlib.util.find_spec(package) is None:
        # the [tracking] extra installs tensorboard and mlflow-skinny
        raise MissingExtraError(f"{missing_extra(f'--logger {name}', 'tracking')}, or use --logger csv")


def make_logger(config: TrainConfig, out: Path) -> Logger:
    """The run's logger, its settings logged; a resumed run appends to the same files (or MLflow run)."""
    logs = out / LOG_DIR
    if config.logger == "tensorboard":
        logger: Logger = TensorBoardLogger(save_dir=str(out), name=LOG_DIR, version="tensorboard", default_hp_metric=False)
    elif config.logger == "mlflow":
        id_file = logs / MLFLOW_RUN_ID
        # MLflow 3 keeps its file store but refuses it unless asked: a folder in the run is what is wanted here.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        logger = MLFlowLogger(
            experiment_name="medtransfer", run_name=out.name, tracking_uri=(logs / "mlruns").resolve().as_uri(),
            run_id=id_file.read_text().strip() if id_file.is_file() else None,
        )
        logs.mkdir(parents=True, exist_ok=True)
        write_text_atomic(id_file, str(logger.run_id))  # read back on resume: whole or absent
    else:
        logger = CSVLogger(save_dir=str(out), name=LOG_DIR, version="csv")
        existing = Path(logger.log_dir) / "metrics.csv"
        if existing.is_file():  # resumed: keep the earlier columns, or Lightning rewrites the file without them
            with existing.open(newline="") as handle, warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*exists and is not empty.*")  # it appends, in fact
                logger.experiment.metrics_keys = sorted(next(csv.reader(handle), []))
    settings = config.to_dict()  # no cache folder or absolute data path unless --keep-identifiers (privacy.py)
    logger.log_hyperparams(settings if config.keep_identifiers else shareable_settings(settings))
    return logger


def log_epochs(config: TrainConfig, out: Path, rows: list[dict], *, prefix: str = "") -> None:
    """The feature-cached probe (no Lightning trainer): its history rows, one step per epoch."""
    logger = make_logger(config, out)
    names = {"train_loss": "train/loss_epoch", "train_acc": "train/acc", "val_loss": "val/loss", "val_acc": "val/acc"}
    for row in rows:
        metrics = {prefix + name: float(row[key]) for key, name in names.items() if key in row}
        logger.log_metrics(metrics, step=int(row["epoch"]) - 1)
    logger.save()
    logger.finalize("success")


class EpochAUC(L.Callback):
    """Logs val/auc each epoch: probabilities captured by a forward hook during validation.

    Binary: the AUC of class 1 (the same as of class 0); more classes: the macro one-vs-rest
    AUC. Under DDP each process sees its own shard; the logged value is global rank 0's.
    """

    def __init__(self) -> None:
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._hook = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._probs, self._labels = [], []
        self._hook = pl_module.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        # Under DDP Lightning routes validation_step through forward too: that call returns the loss, not logits.
        if isinstance(output, torch.Tensor) and output.ndim == 2:
            self._probs.append(output.detach().float().cpu())  # logits: softmax or sigmoid once the labels are seen

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._labels.append(batch[1].detach().cpu())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if trainer.sanity_checking or not self._probs:
            return
        labels, logits = torch.cat(self._labels), torch.cat(self._probs)
        probs = logits.sigmoid() if labels.ndim == 2 else logits.softmax(1)  # multi-label: one sigmoid per finding
        auc = epoch_auc(labels.numpy(), probs.numpy())
        if auc is not None:
            pl_module.log("val/auc", auc, rank_zero_only=True)


def epoch_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """AUC of the validation epoch (macro one-vs-rest beyond two classes); None when a class is missing or a
    probability is not finite. Multi-label (2-D labels, NaN unknown): the mean AUC of the findings with both classes."""
    if labels.ndim == 2:
        aucs = []
        for k in range(labels.shape[1]):
            known = ~np.isnan(labels[:, k])
            y = labels[known, k]
            if 0 < y.sum() < len(y) and np.isfinite(probs[known, k]).all():
                aucs.append(binary_metrics(y.astype(int), probs[known, k], threshold=0.5)["auc"])
        return float(np.mean(aucs)) if aucs else None
    if len(np.unique(labels)) < probs.shape[1] or not np.isfinite(probs).all():  # a diverged epoch: no AUC
        return None
    if probs.shape[1] == 2:
        return float(binary_metrics(labels, probs[:, 1], threshold=0.5)["auc"])
    return float(multiclass_metrics(labels, probs, class_names=[str(i) for i in range(probs.shape[1])])["macro_auc"])
