"""`train --folds K --refit`: after cross-validation, one model trained on every fold, in OUT/refit.

There is no validation split left to stop on, so the refit trains for a fixed number of epochs:
the median of the folds' best epochs (rounded half up), its learning-rate schedule spanning
those epochs, and keeps the last epoch's weights. Its temperature and threshold are the ones
chosen on the pooled out-of-fold logits (:mod:`medtransfer.train.fold_ensemble`), never refitted;
it is scored on the test split when there is one.

OUT/refit is a full run folder (config.yaml, split.csv with the pool as train, history.csv,
metrics.json, predictions_test.csv, plots, report.html, model/, checkpoints/ for --resume).
Lightning still runs a validation pass per epoch, on the training pool itself under the
evaluation transform: history.csv's val_loss is that (training) loss, not a held-out one, and the
OOD guard accepts 95% of the training pool. metrics.json ``val`` is null and ``refit`` says so.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from rich.console import Console

from medtransfer.config import TrainConfig, default_cache_dir
from medtransfer.data.cache import CacheSettings, ImageCache
from medtransfer.data.discover import Record
from medtransfer.data.split import write_split_csv
from medtransfer.errors import DataError
from medtransfer.evaluation.evaluate import SplitOutputs, default_positive_class
from medtransfer.evaluation.multilabel import MultiLabelPoint
from medtransfer.evaluation.thresholds import OperatingPoint
from medtransfer.models.inference import inference_network
from medtransfer.rundir import CONFIG_FILE, RunDir
from medtransfer.runtime import hardware_summary, predict_logits
from medtransfer.task import Task
from medtransfer.train.callbacks import read_history
from medtransfer.train.fold_ensemble import score, shown_run
from medtransfer.train.labelled import task_of_split_file
from medtransfer.train.outputs import Evaluation, write_outputs
from medtransfer.train.pipeline import (
    build_model,
    decode_images,
    resolve_hardware,
    train_model,
)
from medtransfer.train.runfolder import check_resumable, hold_run_folder
from medtransfer.train.scoring import SplitData, eval_datasets, fit_ood

__all__ = ["REFIT", "refit_epochs", "train_refit"]

REFIT = "refit"
POOL_AS_VAL = ("the training pool under the evaluation transform (no held-out data: history.csv's val_loss is a "
               "training loss, and the OOD guard accepts 95% of the training pool)")


def refit_epochs(best_epochs: list[int]) -> int:
    """The median of the folds' best epochs, rounded half up, at least 1.

    >>> refit_epochs([3, 4, 7, 8]), refit_epochs([2, 5, 9])
    (6, 5)
    """
    return max(1, int(math.floor(float(np.median(best_epochs)) + 0.5)))


def refit_config(config: TrainConfig, epochs: int) -> TrainConfig:
    """One run on every fold for `epochs` epochs, never stopping early (patience beyond the last epoch)."""
    defaults = TrainConfig()
    return dataclasses.replace(
        config, folds=0, refit=False, jobs=1, epochs=epochs, patience=epochs + 1, split_file=None,
        val_fraction=defaults.val_fraction, test_fraction=None, keep_official_val=False,
        devices="1" if config.devices == "auto" else config.devices,
    )


def train_refit(
    config: TrainConfig, out: Path, point: OperatingPoint | MultiLabelPoint, best_epochs: list[int],
    records: list[Record], *, console: Console,
) -> dict[str, Any]:
    """Train (or resume, or keep) OUT/refit; returns what the cross-validation's metrics.json records of it."""
    run = out / REFIT
    epochs = refit_epochs(best_epochs)
    summary = {"run": shown_run(run, out, config), "epochs": epochs, "fold_best_epochs": list(best_epochs),
               "operating_point": "out-of-fold (the cross-validation's)", "val": POOL_AS_VAL}
    if RunDir(run).finished():
        console.print(f"Refit: finished earlier, kept ({run})")
        return _with_results(summary, run)
    resume = (run / CONFIG_FILE).is_file()
    settings = refit_config(config, epochs)
    console.rule(f"Refit on all folds for {epochs} epoch(s) (median best epoch of the folds)" + (" (resuming)" if resume else ""))
    hardware = resolve_hardware(settings)
    with hold_run_folder(run, resume=resume):
        if resume:
            check_resumable(run, settings, console)
        L.seed_everything(settings.seed, workers=True, verbose=False)
        rows = [dataclasses.replace(r, split="test" if r.split == "test" else "train") for r in records]
        task = task_of_split_file(rows, config)
        classes = list(task.classes)
        positive_class = None if task.multilabel else (config.positive_class or default_positive_class(classes))
        model = build_model(settings, classes, console)
        if not resume:
            settings.write_yaml(run / CONFIG_FILE)
        splits = _cache(rows, task, settings, console)
        if not (run / "split.csv").is_file():
            write_split_csv([r for s in ("train", "test") if s in splits for r in splits[s].records], run / "split.csv")
        fit = train_model(model, splits, settings, run, hardware, resume=resume, console=console, task=task)
        history = read_history(run / "history.csv")
        if fit.best_epoch != len(history):
            load_last_epoch(model, run)  # no early stopping: the last epoch's weights, not the lowest pool loss
        evaluation = _evaluate(model, splits, task, classes, positive_class, point, settings, hardware)
        ood = fit_ood(model, splits, settings, hardware, console)
        metrics = {
            "backbone": settings.backbone, "strategy": settings.strategy, "weights": settings.weights,
            "params": model.parameter_counts(), "epochs_run": len(history), "best_epoch": len(history),
            "stopped_early": False, "train_seconds": round(sum(r["seconds"] for r in history), 1),
            "positive_class": positive_class, "threshold": point.threshold if isinstance(point, OperatingPoint) else None,
            "val": None, "test": evaluation.metrics.get("test"), "classes": classes, "threshold_policy": settings.threshold,
            "precision": hardware.precision, "head": settings.head, "task": task.kind,
            "hardware": hardware_summary(accelerator=hardware.accelerator, precision=hardware.precision),
            "operating_point": point.to_dict() if isinstance(point, MultiLabelPoint) else None, "refit": summary,
        }
        write_outputs(run, model=model, config=settings, evaluation=evaluation, metrics=metrics, history=history,
                      console=console, ood=ood)
    return _with_results(summary, run)


def _with_results(summary: dict[str, Any], run: Path) -> dict[str, Any]:
    metrics = RunDir(run).metrics()
    test = metrics.test
    return {**summary, "train_seconds": metrics.train_seconds,
            "test_auc": None if test is None else test.auc, "test_auc_ci": None if test is None else test.interval("auc")}


def _cache(rows: list[Record], task: Task, config: TrainConfig, console: Console) -> dict[str, SplitData]:
    """train (the pool), val (the same images: Lightning's per-epoch pass) and test, decoded once."""
    cache = ImageCache(config.cache_dir or default_cache_dir(), CacheSettings(size=config.cache_size))
    images = decode_images(cache, [r.path for r in rows], skip_bad=config.skip_bad_images, progress=config.progress,
                           console=console)
    kept = [rows[i] for i in images.positions]
    out: dict[str, SplitData] = {}
    for split in ("train", "test"):
        index = [i for i, r in enumerate(kept) if r.split == split]
        if index:
            chosen = [kept[i] for i in index]
            targets = task.targets([r.label for r in chosen], [r.masked for r in chosen])
            out[split] = SplitData(chosen, images.subset(index), targets if task.multilabel else targets.tolist())
    if "train" not in out:
        raise DataError(f"--refit: no training images left in {config.data}")
    out["val"] = out["train"]
    return out


def load_last_epoch(model: Any, run: Path) -> None:
    """The network weights of checkpoints/last.ckpt (the last finished epoch) into `model`."""
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    prefix = "model.net."
    model.net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)


def _evaluate(model: Any, splits: dict[str, SplitData], task: Task, classes: list[str], positive_class: str | None,
              point: OperatingPoint | MultiLabelPoint, config: TrainConfig, hardware: Any) -> Evaluation:
    """The test split at the out-of-fold operating point (no choice is made here)."""
    outputs, metrics = {}, {}
    if "test" in splits:
        dataset = eval_datasets({"test": splits["test"]}, config, model.spec)["test"]
        logits = predict_logits(inference_network([model], config.tta), dataset, batch_size=max(64, config.batch_size),
                                num_workers=hardware.workers, device=hardware.device, precision=hardware.precision)
        test = splits["test"]
        outputs["test"] = SplitOutputs([str(r.path) for r in test.records], np.asarray(test.labels),
                                       [r.patient_id for r in test.records], logits)
        metrics["test"] = score(outputs["test"], point, classes, bootstrap=config.bootstrap, seed=config.seed)
    return Evaluation(classes, positive_class, outputs, point, metrics, task=task if task.multilabel else None)
