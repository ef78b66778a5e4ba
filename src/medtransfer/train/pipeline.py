"""`medtransfer train` as named steps: check -> data -> model -> cache -> fit -> evaluate -> write.

Nothing is written until every choice has been checked: the settings by
:func:`~medtransfer.train.validate.validate_config`, the data by discovery and splitting,
the model (weights that fit the backbone, children that exist) by building it, the splits
by :func:`~medtransfer.train.validate.validate_splits`. Only then is the run's marker
(config.yaml) written, and the expensive part (decoding, training) starts. The folder
itself is created first to hold its lock (:mod:`medtransfer.train.runfolder`), and removed
again when a check fails.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from rich.console import Console

from medtransfer.config import TrainConfig
from medtransfer.data.cache import CachedImages, CacheSettings, ImageCache
from medtransfer.data.datamodule import CachedImageDataset, TransferDataModule
from medtransfer.data.discover import Record
from medtransfer.data.split import write_split_csv
from medtransfer.data.transforms import train_transform, with_border_crop
from medtransfer.errors import ConfigError, DataError
from medtransfer.models.backbones import BackboneSpec, create_backbone
from medtransfer.models.module import ClassifierModule
from medtransfer.models.strategies import Strategy, TransferModel, build_transfer_model
from medtransfer.rundir import CONFIG_FILE
from medtransfer.runtime import (
    default_decode_workers,
    default_num_workers,
    device_for,
    hardware_summary,
    is_global_zero,
    resolve_accelerator,
    resolve_precision,
)
from medtransfer.evaluation.evaluate import default_positive_class
from medtransfer.evaluation.multilabel import MultiLabelPoint
from medtransfer.evaluation.thresholds import OperatingPoint
from medtransfer.task import Task, positive_weights
from medtransfer.train.callbacks import read_history
from medtransfer.train.fit import Fit, fit_with_lightning, probe_phase, train_probe_on_features
from medtransfer.train.labelled import (  # noqa: F401  (re-exported: the data step's names as before)
    LabelledData,
    discover_records,
    draw_split,
    draw_split_hashed,
    load_labelled_data,
    report_leakage,
    write_split,
)
from medtransfer.train.outputs import write_outputs
from medtransfer.train.runfolder import check_resumable, check_run_dir, hold_run_folder, with_absolute_paths  # noqa: F401
from medtransfer.train.scoring import Hardware, SplitData, eval_datasets, evaluate_model, fit_ood
from medtransfer.train.validate import uses_feature_probe, validate_config, validate_multilabel_splits, validate_splits
from medtransfer.train.wise_ft import choose_mixing, load_or_save_start

LP_HISTORY = "history_lp.csv"  # LP-FT's probe phase; history.csv holds the fine-tuning epochs


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced; its fields, in order, are the keys of metrics.json."""

    backbone: str
    strategy: str
    weights: str
    params: dict[str, int]  # total, trainable
    epochs_run: int
    best_epoch: int
    stopped_early: bool
    train_seconds: float
    positive_class: str | None  # None for multi-label: an operating point per finding (operating_point)
    threshold: float | None
    val: dict[str, Any]
    test: dict[str, Any] | None  # None when the data has no test split
    classes: list[str]
    threshold_policy: str
    total_seconds: float
    precision: str
    leakage: dict[str, Any]
    data_summary: dict[str, Any]
    head: str = "linear"
    wise_ft: dict[str, Any] | None = None  # the mixing coefficient chosen on val (train/wise_ft.py)
    hardware: dict[str, Any] | None = None  # accelerator, devices, num_nodes, world_size, distributed, precision, cpu, gpu
    task: str = "single-label"  # or multi-label (medtransfer.task): then classes are the findings
    operating_point: dict[str, Any] | None = None  # multi-label: per-finding thresholds and temperatures chosen on val

    def to_metrics(self) -> dict[str, Any]:
        """metrics.json's content (DESIGN.md's key order; keys may be added, never renamed)."""
        return dataclasses.asdict(self)


def run_training(
    config: TrainConfig, out: Path, *, resume: bool = False, console: Console | None = None
) -> TrainResult | None:
    """Train and evaluate into the run folder `out` (or continue the interrupted run there).

    One process at a time writes `out` (a second one fails naming the holder's PID); every
    file in it is written atomically, so a run killed at any moment can be resumed. Under
    DDP every process runs this; only global rank 0 holds and writes the run folder,
    evaluates and returns the result (the other ranks return None after training).
    """
    zero = is_global_zero()  # from the launcher's environment: torchrun and Lightning's DDP re-run this
    console = console or Console()
    console = console if zero else Console(quiet=True)
    validate_config(config)
    hardware = resolve_hardware(config)
    if not resume:
        config = with_absolute_paths(config)
    if not zero:
        return _train_into(out, config, hardware, resume=resume, console=console, zero=False)
    with hold_run_folder(out, resume=resume):
        return _train_into(out, config, hardware, resume=resume, console=console, zero=True)


def _train_into(
    out: Path, config: TrainConfig, hardware: Hardware, *, resume: bool, console: Console, zero: bool
) -> TrainResult | None:
    started = time.perf_counter()
    if resume and zero:
        check_resumable(out, config, console)
    L.seed_everything(config.seed, workers=True, verbose=False)
    data = load_labelled_data(config, out, console, resume=resume)  # the same split on every rank: seeded
    config = dataclasses.replace(  # config.yaml records the task the data defines
        config, task=data.task.kind, findings=list(data.task.classes) if data.task.multilabel else None
    )
    model = build_model(config, data.classes, console)
    if not resume and zero:
        config.write_yaml(out / CONFIG_FILE)  # the run's marker, before the long cache build
    splits = cache_splits(data.records, data.task, config, console)
    if zero and not (out / "split.csv").is_file():
        write_split_csv([r for s in splits.values() for r in s.records], out / "split.csv")
    if not zero and uses_feature_probe(config):
        return None  # the feature probe runs in one process
    fit = train_model(model, splits, config, out, hardware, resume=resume, console=console, task=data.task)
    if not is_global_zero():
        return None
    evaluation = evaluate_model(model, splits, data, config, hardware)
    ood = fit_ood(model, splits, config, hardware, console)
    history = read_history(out / "history.csv")
    result = TrainResult(
        backbone=config.backbone, strategy=config.strategy, weights=config.weights, params=model.parameter_counts(),
        epochs_run=len(history), best_epoch=fit.best_epoch, stopped_early=fit.stopped_early,
        train_seconds=round(sum(r["seconds"] for r in history + read_history(out / LP_HISTORY)), 1),
        positive_class=data.positive_class,
        threshold=evaluation.point.threshold if isinstance(evaluation.point, OperatingPoint) else None,
        val=evaluation.metrics["val"], test=evaluation.metrics.get("test"),
        classes=data.classes, threshold_policy=config.threshold, total_seconds=round(time.perf_counter() - started, 1),
        precision=hardware.precision, leakage=data.leakage, data_summary=data.summary, head=config.head,
        wise_ft=fit.wise_ft,
        hardware=hardware_summary(
            accelerator=hardware.accelerator, precision=hardware.precision, devices=fit.devices,
            num_nodes=fit.num_nodes, distributed=fit.distributed,
        ),
        task=data.task.kind,
        operating_point=evaluation.point.to_dict() if isinstance(evaluation.point, MultiLabelPoint) else None,
    )
    write_outputs(out, model=model, config=config, evaluation=evaluation, metrics=result.to_metrics(), history=history,
                  console=console, ood=ood)
    return result


def resolve_hardware(config: TrainConfig) -> Hardware:
    accelerator = resolve_accelerator(config.accelerator)  # fails when a GPU is asked for and none is visible
    workers = config.num_workers if config.num_workers >= 0 else default_num_workers(accelerator)
    return Hardware(accelerator, resolve_precision(config.precision, accelerator), device_for(accelerator), workers)


def class_weights(labels: list[int] | np.ndarray, num_classes: int) -> list[float]:
    """'balanced' weights n / (k * n_c), as scikit-learn computes them; multi-label (2-D targets): each
    finding's positive weight negatives / positives over its known labels."""
    if np.ndim(labels) == 2:
        return positive_weights(np.asarray(labels))
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    return (len(labels) / (num_classes * np.maximum(counts, 1))).tolist()


def build_model(config: TrainConfig, classes: list[str], console: Console) -> TransferModel:
    net, spec = create_backbone(
        config.backbone,
        num_classes=len(classes),
        weights=config.weights,
        in_channels=config.in_channels,
        output_stride=config.output_stride,
    )
    model = build_transfer_model(net, spec, Strategy(config.strategy, config.freeze_children), config.head)
    counts = model.parameter_counts()
    console.print(
        f"Model {config.backbone} ({config.weights}), strategy {config.strategy}"
        + (f" (first {config.freeze_children} children frozen)" if config.strategy == "freeze" else "")
        + f": {counts['total']:,} parameters, {counts['trainable']:,} trainable, head {config.head} {counts['head']:,}"
    )
    return model


def decode_images(
    cache: ImageCache, paths: list[Path], *, skip_bad: bool, progress: bool, console: Console, workers: int | None = None
) -> CachedImages:
    """Decode every image once into `cache` (all bad images are listed together)."""
    images = cache.build(paths, skip_bad=skip_bad, progress=progress, workers=workers or default_decode_workers())
    for path, reason in images.skipped:
        console.print(f"[yellow]Skipped bad image[/yellow] {path}: {reason}")
    return images


def prebuild_cache(
    data: Path, *, cache_dir: Path, size: int, workers: int | None, skip_bad: bool, console: Console
) -> None:
    """`medtransfer cache`: decode a dataset into the cache ahead of training."""
    cache = ImageCache(cache_dir, CacheSettings(size=size))
    config = TrainConfig(data=str(data), cache_dir=str(cache_dir))  # an .npz is extracted where train finds it
    paths = [r.path for r in discover_records(config)]
    images = decode_images(cache, paths, skip_bad=skip_bad, progress=True, console=console, workers=workers)
    console.print(f"{len(images)} images cached ({images.built} decoded now) in {cache.stats()['location']}")


def cache_splits(records: list[Record], task: Task | list[str], config: TrainConfig, console: Console) -> dict[str, SplitData]:
    """Decoded images per split (before training starts, so a bad image stops the run early),
    checked again by :func:`validate_splits` once bad images are left out."""
    if config.cache_dir is None:
        raise ConfigError("cache_dir: not set; name the folder of the decoded-image cache "
                          "(the CLI's default is medtransfer.config.default_cache_dir())")
    cache = ImageCache(config.cache_dir, CacheSettings(size=config.cache_size))
    images = decode_images(
        cache, [r.path for r in records], skip_bad=config.skip_bad_images, progress=config.progress, console=console
    )
    kept = [records[i] for i in images.positions]
    task = task if isinstance(task, Task) else Task("single-label", tuple(task))
    out: dict[str, SplitData] = {}
    for split in ("train", "val", "test"):
        indices = [i for i, r in enumerate(kept) if r.split == split]
        if not indices:
            continue
        chosen = [kept[i] for i in indices]
        targets = task.targets([r.label for r in chosen], [r.masked for r in chosen])
        out[split] = SplitData(chosen, images.subset(indices), targets if task.multilabel else targets.tolist())
    for split in ("train", "val"):
        if split not in out:
            raise DataError(f"--data {config.data}: no {split} images left after splitting; add images")
    if task.multilabel:
        validate_multilabel_splits({k: s.records for k, s in out.items()}, task, config)
        return out
    classes = list(task.classes)
    positive_class = config.positive_class or default_positive_class(classes)
    validate_splits({k: [classes[i] for i in s.labels] for k, s in out.items()}, classes, config, positive_class)
    return out


def train_dataset(train: SplitData, config: TrainConfig, spec: BackboneSpec, *, accelerator: str = "cpu") -> CachedImageDataset:
    """The training images under `augment` ("none": as evaluation sees them), finished on the GPU per `augment_on`."""
    if config.augment == "none":
        return eval_datasets({"train": train}, config, spec)["train"]
    on_device = config.augment_on == "device" or (config.augment_on == "auto" and accelerator == "gpu")
    magnitudes = {k: getattr(config, k) for k in ("crop_scale", "rotation_degrees", "brightness", "contrast", "horizontal_flip")}
    transform = train_transform(image_size=config.image_size, mean=spec.normalization.mean, std=spec.normalization.std,
                                channels=config.in_channels, policy=config.augment, on_device=on_device, **magnitudes)
    return CachedImageDataset(train.images, train.labels, with_border_crop(transform, config.border_crop))


def train_model(
    model: TransferModel,
    splits: dict[str, SplitData],
    config: TrainConfig,
    out: Path,
    hardware: Hardware,
    *,
    resume: bool,
    console: Console,
    task: Task | None = None,
) -> Fit:
    """Fit with Lightning, or, for a linear probe without augmentation, on features computed once.

    Leaves the best-on-validation weights in `model` and history.csv in `out`.
    """
    weights = class_weights(splits["train"].labels, model.num_classes) if config.class_weights == "balanced" else None
    console.print(f"Training on {hardware.accelerator} with {hardware.precision}, {hardware.workers} loader worker(s)")
    probe_settings: dict[str, Any] = dict(
        class_weights=weights, device=hardware.device, precision=hardware.precision, workers=hardware.workers,
        console=console, task=task,
    )
    if uses_feature_probe(config):
        datasets = eval_datasets({k: splits[k] for k in ("train", "val")}, config, model.spec)
        return train_probe_on_features(model, datasets, config, out / "history.csv", **probe_settings)
    if config.strategy == "lp-ft" and not (resume and (out / "checkpoints" / "last.ckpt").is_file()):
        console.print(f"LP-FT phase 1: the head trains on frozen features for up to {config.lp_epochs} epochs")
        datasets = eval_datasets({k: splits[k] for k in ("train", "val")}, config, model.spec)
        probe_phase(model, datasets, config, out / LP_HISTORY, **probe_settings)
    start = load_or_save_start(model.net, out / "checkpoints" / "start.safetensors") if config.wise_ft else None
    module = ClassifierModule(
        model,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_epochs=config.warmup_epochs,
        class_weights=weights,
        label_smoothing=config.label_smoothing,
        focal_gamma=config.focal_gamma if config.loss == "focal" else 0.0,
        channels_last=config.channels_last,
        lr_decay=config.lr_decay, mixup=config.mixup, cutmix=config.cutmix, task=task,
    )
    datamodule = TransferDataModule(
        train=train_dataset(splits["train"], config, model.spec, accelerator=hardware.accelerator),
        val=eval_datasets({"val": splits["val"]}, config, model.spec)["val"],
        batch_size=config.batch_size,
        num_workers=hardware.workers,
        pin_memory=hardware.accelerator == "gpu",
        sampler=config.sampler,
        seed=config.seed,
    )
    fit = fit_with_lightning(
        module, datamodule, config, out, accelerator=hardware.accelerator, precision=hardware.precision, resume=resume
    )
    if start is None:
        return fit
    val = eval_datasets({"val": splits["val"]}, config, model.spec)["val"]
    mixing = choose_mixing(
        model, start, val, splits["val"].labels, batch_size=max(64, config.batch_size), num_workers=hardware.workers,
        device=hardware.device, precision=hardware.precision, task=task,
    )
    console.print(f"WiSE-FT: mixing coefficient {mixing['alpha']} (lowest validation loss over {mixing['grid']})")
    return dataclasses.replace(fit, wise_ft=mixing)


