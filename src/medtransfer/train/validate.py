"""Every training choice checked by the module that owns it, before a run folder exists.

`TrainConfig.validate` checks each value on its own (ranges, types). Here each choice
that another module defines is handed to that module (the backbone registry, the
strategies, the threshold policies, the hardware resolvers, the label schemes), and a
setting that the chosen training path would ignore is refused instead of being dropped
in silence (:func:`medtransfer.config.ignored_settings`, from each setting's ``read_when``).

    >>> from medtransfer.config import TrainConfig
    >>> validate_config(TrainConfig(strategy="linear-probe", augment="none", label_smoothing=0.1))
    Traceback (most recent call last):
    ...
    medtransfer.errors.ConfigError: --label-smoothing: got 0.1, but the linear probe on cached features ...
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medtransfer.config import TrainConfig, ignored_settings, uses_feature_probe
from medtransfer.data.augment import AUGMENT_ON, POLICIES
from medtransfer.data.discover import LABEL_SCHEMES
from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation.thresholds import parse_threshold_policy
from medtransfer.explain.cam import METHODS
from medtransfer.models.backbones import WEIGHT_CHOICES, get_backbone, load_weights_file
from medtransfer.models.heads import check_head
from medtransfer.models.inference import check_tta
from medtransfer.models.module import LOSSES
from medtransfer.models.strategies import Strategy
from medtransfer.runtime import resolve_accelerator, resolve_precision
from medtransfer.train.tracking import check_logger

__all__ = ["uses_feature_probe", "validate_config", "validate_splits"]


def validate_config(config: TrainConfig) -> None:
    """Raise ConfigError (or WeightsError) for the first choice that its owner refuses.

    Reads no data; a weights file is opened once to check that it holds a state dict
    (whether it fits the backbone is checked when the model is built, still before the
    run folder is created).
    """
    config.validate()
    parse_threshold_policy(config.threshold)
    resolve_precision(config.precision, resolve_accelerator(config.accelerator))  # also: no GPU visible
    if config.labels not in LABEL_SCHEMES:
        raise ConfigError(f"--labels: got {config.labels!r}; choose one of {', '.join(LABEL_SCHEMES)}")
    if config.loss not in LOSSES:
        raise ConfigError(f"--loss: got {config.loss!r}; choose one of {', '.join(LOSSES)}")
    check_augmentation(config)
    Strategy(config.strategy, config.freeze_children)
    spec = get_backbone(config.backbone)
    if config.output_stride != 32:  # a backbone without dilation support refuses here
        spec.build(output_stride=config.output_stride)
    if config.weights not in WEIGHT_CHOICES:
        load_weights_file(Path(config.weights))
    check_transfer_choices(config)
    check_tta(config.tta)
    check_logger(config.logger)
    check_cam_method(config.cam_method)
    if config.split_file and not Path(config.split_file).is_file():
        raise ConfigError(f"--split-file {config.split_file}: no such file; write one with "
                          "`medtransfer split --data DIR --out FILE`, or leave out --split-file to draw the split")
    ignored = ignored_settings(config)
    if ignored:
        raise ConfigError(ignored[0])


def validate_splits(labels: dict[str, list[str]], classes: list[str], config: TrainConfig, positive_class: str) -> None:
    """Refuse, before the first epoch, a split that training or evaluation cannot use.

    ``labels`` maps a split (train, val, test) to the labels of its images. Training needs
    at least two images (BatchNorm cannot train on a batch of one) and every class; the
    threshold policy, calibration and AUC on val (and the scores on test) need the positive
    class and another one. Each refusal names the split, what it holds and the fix.
    """
    train = labels.get("train", [])
    if len(train) < 2:
        raise DataError(f"--data {config.data}: the train split has {len(train)} image(s); training needs at least 2; add images")
    missing = [c for c in classes if c not in train]
    if missing:
        raise DataError(
            f"--data {config.data}: class(es) {', '.join(missing)} appear in val/test but not in the train split; "
            "the model cannot learn them: add training images of them, or remove them from the other splits"
        )
    for split in ("val", "test"):
        held = sorted(set(labels.get(split, [])))
        if split not in labels or (positive_class in held and len(held) >= 2):
            continue
        need = f"the positive class {positive_class} and another class"
        use = f"--threshold {config.threshold} chooses the threshold" if split == "val" else "AUC and the other scores are computed"
        fix = "raise --val-fraction or leave out --keep-official-val" if split == "val" else "raise --test-fraction, or add images of the missing class to the test folder"
        raise DataError(
            f"--data {config.data}: the {split} split holds only {', '.join(held) or 'no images'} ({len(labels[split])} "
            f"image(s)), but {use} on it and needs {need}; {fix}"
        )


def validate_multilabel_splits(splits: dict[str, list], task, config: TrainConfig) -> None:
    """Multi-label: train needs two images and, for every finding, a known positive and a known negative.

    A finding with one class on validation keeps a fallback operating point (evaluation/multilabel.py);
    one with one class on test has no AUC there: both are reported, neither stops the run.
    """
    if config.sampler == "balanced":
        raise ConfigError("--sampler balanced draws each class equally often; multi-label images carry several findings: "
                          "use --class-weights balanced (a positive weight per finding) instead")
    train = splits.get("train", [])
    if len(train) < 2:
        raise DataError(f"--data {config.data}: the train split has {len(train)} image(s); training needs at least 2; add images")
    targets = task.targets([r.label for r in train], [r.masked for r in train])
    one_class = [
        f"{finding} ({int(np.nansum(targets[:, k]))} positive of {int((~np.isnan(targets[:, k])).sum())} known)"
        for k, finding in enumerate(task.classes)
        if not 0 < np.nansum(targets[:, k]) < (~np.isnan(targets[:, k])).sum()
    ]
    if one_class:
        raise DataError(
            f"--data {config.data}: finding(s) {', '.join(one_class)} have a single known class in the train split, so the "
            "model cannot learn them; choose the findings to train with --findings, or add images"
        )


def check_cam_method(method: str) -> None:
    """The gallery's and border check's heatmap method: one forward and backward pass an image, so no occlusion."""
    choices = [m for m in METHODS if m != "occlusion"]
    if method not in choices:
        extra = "; occlusion (about 200 forward passes an image) runs on chosen images with `medtransfer explain --method occlusion`"
        raise ConfigError(f"--cam-method: got {method!r}; choose one of {', '.join(choices)}{extra if method == 'occlusion' else ''}")


def check_augmentation(config: TrainConfig) -> None:
    """The policy and where it runs; mixing needs a batch to mix (and mixes losses, so it composes with
    label smoothing, class weights and focal loss)."""
    if config.augment not in POLICIES:
        raise ConfigError(f"--augment: got {config.augment!r}; choose one of {', '.join(POLICIES)}")
    if config.augment_on not in AUGMENT_ON:
        raise ConfigError(f"--augment-on: got {config.augment_on!r}; choose one of {', '.join(AUGMENT_ON)}")
    if config.augment_on == "device" and resolve_accelerator(config.accelerator) != "gpu":
        raise ConfigError("--augment-on: got 'device', but training runs on the CPU; use auto or workers, or --accelerator gpu")
    if (config.mixup or config.cutmix) and config.batch_size < 2:
        name = "mixup" if config.mixup else "cutmix"
        raise ConfigError(f"--{name}: got {getattr(config, name)}, but a batch of 1 has no second image to mix with; "
                          "raise --batch-size or leave it at 0")


def check_transfer_choices(config: TrainConfig) -> None:
    """Heads, weight averaging and WiSE-FT that the chosen strategy cannot use."""
    check_head(config.head)
    if config.wise_ft and config.strategy == "linear-probe":
        raise ConfigError(
            "--wise-ft: got true, but a linear probe's start has a random head, so interpolating towards it only "
            "shrinks the logits; use --strategy finetune, freeze, lp-ft or gradual, or leave out --wise-ft"
        )
    if config.head == "dwconv" and uses_feature_probe(config):
        raise ConfigError(
            "--head: got 'dwconv', but the linear probe on cached features (strategy linear-probe, augment none) "
            "sees pooled features only; use --head linear or mlp, or choose --augment light"
        )
    if config.weight_averaging == "swa" and config.strategy not in ("finetune", "lp-ft"):
        raise ConfigError(
            f"--weight-averaging: got 'swa', but --strategy {config.strategy} keeps frozen BatchNorm layers whose "
            "statistics SWA would recompute; use --weight-averaging ema, or --strategy finetune or lp-ft"
        )
