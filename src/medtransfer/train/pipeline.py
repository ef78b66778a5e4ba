"""`medtransfer train`: data -> split -> cache -> model -> Lightning fit -> evaluation -> run directory."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from rich.console import Console

from medtransfer.artifacts import load_model, model_info, save_model
from medtransfer.config import TrainConfig
from medtransfer.data.cache import CachedImages, CacheSettings, ImageCache
from medtransfer.data.datamodule import CachedImageDataset, TransferDataModule
from medtransfer.data.discover import Record, discover
from medtransfer.data.split import (
    check_leakage,
    read_split_csv,
    resplit,
    split_summary,
    summary_lines,
    write_split_csv,
)
from medtransfer.data.transforms import eval_transform, train_transform
from medtransfer.errors import ConfigError, DataError, MedtransferError
from medtransfer.evaluation.evaluate import (
    SplitOutputs,
    default_positive_class,
    fit_operating_point,
    split_metrics,
    write_plots,
    write_predictions,
)
from medtransfer.evaluation import plots
from medtransfer.models.backbones import create_backbone, get_backbone
from medtransfer.models.module import ClassifierModule
from medtransfer.models.strategies import Strategy, TransferModel, build_transfer_model
from medtransfer.runtime import (
    default_decode_workers,
    default_num_workers,
    device_for,
    predict_logits,
    resolve_accelerator,
    resolve_precision,
)
from medtransfer.rundir import write_metrics
from medtransfer.train.callbacks import BestWeights, HistoryWriter, read_history, write_history
from medtransfer.train.feature_probe import extract_features, train_head_on_features

RUN_MARKER = "config.yaml"


class TrainingInterrupted(MedtransferError):
    """Raised when the user stops training; the run directory can be resumed."""

    def __init__(self, run_dir: Path):
        super().__init__(f"training interrupted; continue it with: medtransfer train --resume {run_dir}")
        self.run_dir = run_dir


@dataclass
class SplitData:
    records: list[Record]
    images: CachedImages
    labels: list[int]


def prepare_run_dir(out: Path, *, resume: bool) -> None:
    """A new run needs a new or empty folder; never overwrite a finished or foreign folder."""
    if resume:
        if not (out / RUN_MARKER).is_file():
            raise ConfigError(f"--resume {out}: not a medtransfer run (no {RUN_MARKER}); pass the --out folder of the run")
        return
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out}: exists and is a file; choose a new folder")
        if (out / RUN_MARKER).is_file():
            raise ConfigError(
                f"--out {out}: already holds a run; use --resume {out} to continue it, or choose a new folder"
            )
        if any(out.iterdir()):
            raise ConfigError(f"--out {out}: exists, is not empty and is not a medtransfer run; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)


def class_weights(labels: list[int], num_classes: int) -> list[float]:
    """'balanced' weights n / (k * n_c), as scikit-learn computes them."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    return (len(labels) / (num_classes * np.maximum(counts, 1))).tolist()


def records_and_split(config: TrainConfig, run_dir: Path, console: Console, *, resume: bool) -> list[Record]:
    split_file = run_dir / "split.csv"
    if resume and split_file.is_file():
        return read_split_csv(split_file)
    records = discover(config.data, patient_regex=config.patient_regex, labels=config.labels)
    records = resplit(
        records,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
        keep_official_val=config.keep_official_val,
    )
    return records


def report_leakage(records: list[Record], config: TrainConfig, console: Console) -> dict:
    leakage = check_leakage(records)
    if leakage.clean:
        console.print("Leakage check: no patient and no identical image in two splits.")
    else:
        for line in leakage.lines():
            console.print(f"[yellow]Leakage:[/yellow] {line}")
        if config.strict:
            raise DataError(f"--strict: {leakage.lines()[0]}; remove the duplicates or run without --strict")
    return leakage.to_dict()


def cache_splits(records: list[Record], classes: list[str], config: TrainConfig, console: Console) -> dict[str, SplitData]:
    """Decode every image once (all bad images are listed before training starts)."""
    cache = ImageCache(config.cache_dir, CacheSettings(size=config.cache_size))
    images = cache.build(
        [r.path for r in records], skip_bad=config.skip_bad_images, progress=config.progress,
        workers=default_decode_workers(),
    )
    for path, reason in images.skipped:
        console.print(f"[yellow]Skipped bad image[/yellow] {path}: {reason}")
    kept = [records[i] for i in images.positions]
    out: dict[str, SplitData] = {}
    for split in ("train", "val", "test"):
        indices = [i for i, r in enumerate(kept) if r.split == split]
        if not indices:
            continue
        out[split] = SplitData(
            [kept[i] for i in indices], images.subset(indices), [classes.index(kept[i].label) for i in indices]
        )
    for split in ("train", "val"):
        if split not in out:
            raise DataError(f"--data {config.data}: no {split} images left after splitting; add images")
    return out


def run_training(config: TrainConfig, out: Path, *, resume: bool = False, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    started = time.perf_counter()
    accelerator = resolve_accelerator(config.accelerator)  # fails early when no GPU is visible
    precision = resolve_precision(config.precision, accelerator)
    if config.output_stride != 32:  # a backbone without dilation support fails here, before the run folder exists
        get_backbone(config.backbone).build(output_stride=config.output_stride)
    prepare_run_dir(out, resume=resume)
    L.seed_everything(config.seed, workers=True, verbose=False)

    records = records_and_split(config, out, console, resume=resume)
    classes = sorted({r.label for r in records})
    positive_class = config.positive_class or default_positive_class(classes)
    if positive_class not in classes:
        raise ConfigError(f"--positive-class: got {positive_class!r}; classes are {', '.join(classes)}")
    leakage = report_leakage(records, config, console)
    summary = split_summary(records)
    for line in summary_lines(summary):
        console.print(line)

    net, spec = create_backbone(
        config.backbone,
        num_classes=len(classes),
        weights=config.weights,
        in_channels=config.in_channels,
        output_stride=config.output_stride,
    )
    model = build_transfer_model(net, spec, Strategy(config.strategy, config.freeze_children))
    counts = model.parameter_counts()
    console.print(
        f"Model {config.backbone} ({config.weights}), strategy {config.strategy}"
        + (f" (first {config.freeze_children} children frozen)" if config.strategy == "freeze" else "")
        + f": {counts['total']:,} parameters, {counts['trainable']:,} trainable"
    )

    splits = cache_splits(records, classes, config, console)
    kept_records = [r for s in splits.values() for r in s.records]
    if not resume:
        config.write_yaml(out / RUN_MARKER)
        write_split_csv(kept_records, out / "split.csv")

    workers = config.num_workers if config.num_workers >= 0 else default_num_workers(accelerator)
    common = dict(image_size=config.image_size, mean=spec.normalization.mean, std=spec.normalization.std, channels=config.in_channels)
    train_tf = train_transform(
        **common,
        crop_scale=config.crop_scale,
        rotation_degrees=config.rotation_degrees,
        brightness=config.brightness,
        contrast=config.contrast,
        horizontal_flip=config.horizontal_flip,
    )
    eval_tf = eval_transform(**common, crop_fraction=config.eval_crop_fraction)
    datasets = {name: CachedImageDataset(s.images, s.labels, eval_tf) for name, s in splits.items()}
    datamodule = TransferDataModule(
        train=CachedImageDataset(splits["train"].images, splits["train"].labels, train_tf),
        val=datasets["val"],
        batch_size=config.batch_size,
        num_workers=workers,
        pin_memory=accelerator == "gpu",
        sampler=config.sampler,
        seed=config.seed,
    )
    module = ClassifierModule(
        model,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_epochs=config.warmup_epochs,
        class_weights=class_weights(splits["train"].labels, len(classes)) if config.class_weights == "balanced" else None,
        label_smoothing=config.label_smoothing,
        focal_gamma=config.focal_gamma if config.loss == "focal" else 0.0,
        channels_last=config.channels_last,
    )

    console.print(f"Training on {accelerator} with {precision}, {workers} loader worker(s)")
    if config.strategy == "linear-probe" and not config.augment:
        best_epoch, stopped_early = train_probe_on_features(
            model, datasets, splits, config, out, device=device_for(config.accelerator), precision=precision,
            workers=workers, console=console,
        )
    else:
        best_epoch, stopped_early = fit_with_lightning(
            module, datamodule, config, out, accelerator=accelerator, precision=precision, resume=resume
        )
    history = read_history(out / "history.csv")
    train_seconds = sum(r["seconds"] for r in history)
    result = evaluate_and_save(
        model,
        splits,
        datasets,
        classes=classes,
        positive_class=positive_class,
        config=config,
        out=out,
        device=device_for(config.accelerator),
        precision=precision,
        workers=workers,
    )
    result.update(
        {
            "epochs_run": len(history),
            "best_epoch": best_epoch,
            "stopped_early": stopped_early,
            "train_seconds": round(train_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            "params": counts,
            "precision": precision,
            "leakage": leakage,
            "data_summary": summary,
        }
    )
    ordered = _ordered_metrics(result, config)
    write_metrics(out, ordered)
    if history:
        plots.plot_history(history, out / "plots" / "history.png")
    from medtransfer.evaluation.report import write_report
    from medtransfer.explain.gallery import write_gallery

    write_gallery(out, load_model(out))  # Grad-CAM of the most confident hits and misses, for the report
    write_report(out, console=console)
    return ordered


def fit_with_lightning(
    module: ClassifierModule,
    datamodule: TransferDataModule,
    config: TrainConfig,
    out: Path,
    *,
    accelerator: str,
    precision: str,
    resume: bool,
) -> tuple[int, bool]:
    """Lightning fit with early stopping; loads the best-on-validation weights into the model."""
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    best = BestWeights(checkpoints / "best.safetensors")
    early_stopping = L.pytorch.callbacks.EarlyStopping(monitor="val/loss", mode="min", patience=config.patience)
    trainer = L.Trainer(
        max_epochs=config.epochs,
        accelerator=accelerator,
        devices=config.devices if accelerator == "gpu" else 1,
        precision=precision,
        callbacks=[
            early_stopping,
            best,
            HistoryWriter(out / "history.csv"),
            # The latest epoch for --resume (one file; last.ckpt links to it). The best weights are
            # kept by BestWeights as safetensors, so nothing is unpickled to reload them.
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=checkpoints, filename="latest", save_top_k=1, save_last="link", save_on_train_epoch_end=True
            ),
        ],
        logger=False,
        enable_progress_bar=config.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
        default_root_dir=out,
    )
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
    return best.best_epoch, bool(early_stopping.stopped_epoch > 0)


def train_probe_on_features(
    model: TransferModel,
    datasets: dict[str, CachedImageDataset],
    splits: dict[str, SplitData],
    config: TrainConfig,
    out: Path,
    *,
    device: torch.device,
    precision: str,
    workers: int,
    console: Console,
) -> tuple[int, bool]:
    """Linear probe without augmentation: one backbone pass, then the head trains on cached features."""
    started = time.perf_counter()
    features = {
        name: extract_features(
            model, datasets[name], batch_size=max(64, config.batch_size), device=device, precision=precision,
            num_workers=workers,
        )
        for name in ("train", "val")
    }
    console.print(f"Feature pass: {sum(len(f) for f in features.values())} images in {time.perf_counter() - started:.1f} s")
    labels = {name: torch.as_tensor(splits[name].labels) for name in ("train", "val")}
    weights = class_weights(splits["train"].labels, model.head.out_features) if config.class_weights == "balanced" else None
    history, best_state = train_head_on_features(
        model.head, features["train"], labels["train"], features["val"], labels["val"], epochs=config.epochs,
        lr=config.lr, weight_decay=config.weight_decay, batch_size=config.batch_size, class_weights=weights,
        patience=config.patience, seed=config.seed,
    )
    history[0]["seconds"] += time.perf_counter() - started - sum(r["seconds"] for r in history)  # the feature pass
    write_history(history, out / "history.csv")
    model.head.load_state_dict(best_state)
    best_epoch = min(history, key=lambda row: row["val_loss"])["epoch"]
    return best_epoch, len(history) < config.epochs


def evaluate_and_save(
    model: TransferModel,
    splits: dict[str, SplitData],
    datasets: dict[str, CachedImageDataset],
    *,
    classes: list[str],
    positive_class: str,
    config: TrainConfig,
    out: Path,
    device: torch.device,
    precision: str,
    workers: int,
) -> dict[str, Any]:
    """Best-on-validation model: calibrate and pick the threshold on val, then report val and test."""
    outputs = {}
    for name in ("val", "test"):
        if name not in splits:
            continue
        logits = predict_logits(
            model, datasets[name], batch_size=max(64, config.batch_size), num_workers=workers, device=device, precision=precision
        )
        data = splits[name]
        outputs[name] = SplitOutputs(
            [str(r.path) for r in data.records], np.asarray(data.labels), [r.patient_id for r in data.records], logits
        )
    positive_index = classes.index(positive_class)
    point = fit_operating_point(outputs["val"], positive_index=positive_index, policy=config.threshold, calibrate=config.calibrate)
    result: dict[str, Any] = {
        "positive_class": positive_class,
        "classes": classes,
        "threshold": point.threshold,
        "threshold_policy": config.threshold,
    }
    for name, split_outputs in outputs.items():
        result[name] = split_metrics(split_outputs, point, classes, bootstrap=config.bootstrap, seed=config.seed)
        write_predictions(split_outputs, point, classes, out / f"predictions_{name}.csv")
        write_plots(
            split_outputs, point, classes, result[name], out / "plots", prefix=name,
            band_resamples=min(200, config.bootstrap), seed=config.seed,
        )
    if "test" not in outputs:
        result["test"] = None
    save_model(
        model,
        model_info(
            model,
            classes=classes,
            positive_class=positive_class,
            threshold=point.threshold,
            temperature=point.temperature,
            image_size=config.image_size,
            decode_size=config.cache_size,
            eval_crop_fraction=config.eval_crop_fraction,
            in_channels=config.in_channels,
            output_stride=config.output_stride,
            threshold_policy=config.threshold,
            strategy=config.strategy,
            frozen=model.frozen,
            training_config=config.to_dict(),
        ),
        out,
    )
    return result


def _ordered_metrics(result: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    """DESIGN.md's key order first; added keys after (keys may be added, never renamed)."""
    head = {
        "backbone": config.backbone,
        "strategy": config.strategy,
        "weights": config.weights,
        "params": result.pop("params"),
        "epochs_run": result.pop("epochs_run"),
        "best_epoch": result.pop("best_epoch"),
        "stopped_early": result.pop("stopped_early"),
        "train_seconds": result.pop("train_seconds"),
        "positive_class": result.pop("positive_class"),
        "threshold": result.pop("threshold"),
        "val": result.pop("val"),
        "test": result.pop("test"),
    }
    return {**head, **result}
