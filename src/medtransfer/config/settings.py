"""The training settings, each defined once: type, default, help, flag, check, resume rule, when it is read.

Precedence, stated once: field defaults < YAML file (--config) < command-line flags. The resolved
object is saved as RUN/config.yaml and components receive the parts they need. `validate` checks
each value on its own (and the few that bound each other); choices owned by other modules
(backbone, strategy, threshold policy, precision...) are checked by
`medtransfer.train.validate.validate_config`, which asks those modules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from medtransfer.config.setting import RESUME_ANY as ANY
from medtransfer.config.setting import RESUME_EFFECTIVE_BATCH as BATCH
from medtransfer.config.setting import Setting, flag_name, setting
from medtransfer.config.values import coerced_values, read_yaml, shown
from medtransfer.errors import ConfigError
from medtransfer.rundir import write_yaml_atomic
from medtransfer.task import TASK_KINDS, UNCERTAIN_POLICIES

__all__ = ["DISTRIBUTED", "MAX_IMAGE_SIZE", "TrainConfig"]

DISTRIBUTED = ("auto", "ddp", "ddp_spawn")  # Lightning strategies `train --distributed` passes on
MAX_IMAGE_SIZE = 4096  # largest image_size and cache_size (decode size), here and in a saved model.json
_OFF = "0 (off) or a positive number"
_PROBE = ("lightning",)  # read unless the linear probe trains on cached features


def _positive(v: Any) -> bool:
    return v > 0


def _at_least(n: int):
    return lambda v: v >= n


@dataclass
class TrainConfig:
    # data
    data: str = setting("", "Dataset: DIR/{train,val,test}/CLASS/*, plain DIR/CLASS/*, a CSV manifest or a MedMNIST .npz.")
    labels: str = setting("folder", "folder (default) or kermany-3class (NORMAL/BACTERIA/VIRUS from file names).")
    patient_regex: str | None = setting(None, "Regex whose first group of the file stem is the patient ID (default: Kermany, NIH, CheXpert, MIMIC-CXR names; DICOM PatientID).")
    val_fraction: float = setting(0.2, "Patient-level validation fraction drawn from train+val (default {default}).",
                                  check=lambda v: 0 < v < 1, expected="a number between 0 and 1", read_when=("drawn-split",))
    test_fraction: float | None = setting(None, "Patient-level test fraction drawn when the data has no test split (default 0.2; 0: none).",
                                          check=lambda v: v is None or 0 <= v < 1, expected="a number in [0, 1) (0: no test split drawn)",
                                          read_when=("drawn-split",))
    keep_official_val: bool = setting(False, "Use the data's own val split as is.", read_when=("drawn-split",))
    positive_class: str | None = setting(None, "Positive class (default PNEUMONIA when present, else the last).")
    skip_bad_images: bool = setting(False, "Leave unreadable images out instead of stopping.")
    strict: bool = setting(False, "Fail when a patient, an identical image or a near-duplicate image is in two splits.")
    cache_dir: str | None = setting(None, "Decoded-image cache (default ~/.cache/medtransfer).", resume=ANY, path=True)
    cache_size: int = setting(256, "Side in pixels that images are decoded and cached at: at least --image-size (default {default}).")
    image_size: int = setting(224, "Model input size in pixels (default {default}).", check=lambda v: 16 <= v <= MAX_IMAGE_SIZE,
                              expected=f"16 to {MAX_IMAGE_SIZE} pixels")
    eval_crop_fraction: float = setting(0.875, "Evaluation: resize to --image-size / this, then take the centre --image-size (default {default}).")
    border_crop: float = setting(0.0, "Fraction of width and height cut off each side before resizing, in train, evaluation and the saved model (default 0).",
                                 check=lambda v: 0 <= v <= 0.4, expected="a fraction in [0, 0.4] cut off each side, e.g. 0.1")
    # augmentation (data/augment.py; none: a linear probe then trains on cached features)
    augment: str = setting("light", "Training augmentation: light (default: crop, rotation, brightness/contrast), radiograph (+ translation, scale, gamma, blur/sharpen, noise), trivial (TrivialAugment: one radiograph-safe op per image) or none. See docs: guide/training-options.")
    crop_scale: tuple[float, float] = setting((0.6, 1.0), "Training augmentation: area range MIN,MAX of the random resized crop (default {default}).",
                                              check=lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
                                              expected="two numbers MIN,MAX with 0 < MIN <= MAX <= 1, e.g. 0.6,1.0", read_when=("augmenting",))
    rotation_degrees: float = setting(10.0, "Training augmentation: largest random rotation in degrees (default {default}; 0: off).",
                                      check=_at_least(0), expected="0 (off) or a positive angle", read_when=("augmenting",))
    brightness: float = setting(0.2, "Training augmentation: random brightness change, a fraction (default {default}; 0: off).",
                                check=_at_least(0), expected=_OFF, read_when=("augmenting",))
    contrast: float = setting(0.2, "Training augmentation: random contrast change, a fraction (default {default}; 0: off).",
                              check=_at_least(0), expected=_OFF, read_when=("augmenting",))
    horizontal_flip: bool = setting(False, "Add random horizontal flips to augmentation (off: anatomy is lateralised).",
                                    flags=("--hflip", "--horizontal-flip"), read_when=("augmenting",))
    augment_on: str = setting("auto", "Where augmentation runs: auto (default: on the GPU when training on one), workers or device.",
                              resume=ANY, read_when=("augmenting",))
    mixup: float = setting(0.0, "MixUp Beta alpha, e.g. 0.2 (default 0: off).", check=_at_least(0),
                           expected="0 (off) or a positive Beta alpha, e.g. 0.2", read_when=_PROBE)
    cutmix: float = setting(0.0, "CutMix Beta alpha, e.g. 1.0 (default 0: off; with --mixup, one of the two per batch).",
                            check=_at_least(0), expected="0 (off) or a positive Beta alpha, e.g. 1.0", read_when=_PROBE)
    # model
    backbone: str = setting("resnet18", "resnet18 (default), resnet50, densenet121, efficientnet_lite0 or any timm name.")
    weights: str = setting("imagenet", "imagenet (default), none, or a .pth/.safetensors file.")
    strategy: str = setting("finetune", "finetune (default), freeze, linear-probe, lp-ft or gradual (see docs: guide/training-options).")
    in_channels: int = setting(3, "3 (default: RGB) or 1 (grayscale in one channel: the first convolution's RGB filters summed).",
                               check=lambda v: v in (1, 3), expected="1 (grayscale) or 3 (RGB)")
    output_stride: int = setting(32, "32 (default); 16 or 8 dilate the last stage for finer heatmaps (efficientnet_lite0, resnet50, timm).",
                                 check=lambda v: v in (8, 16, 32), expected="32 (default), 16 or 8")
    freeze_children: int = setting(4, "With --strategy freeze: how many first children to freeze (default {default}).",
                                   check=_at_least(0), expected="0 or more", read_when=("strategy-freeze",))
    # transfer strategies (models/strategies.py, models/heads.py, train/wise_ft.py)
    head: str = setting("linear", "linear (default), mlp (one hidden layer, dropout) or dwconv (depthwise-separable block on the last feature map).")
    lp_epochs: int = setting(10, "With --strategy lp-ft: epochs of the linear-probe phase (default {default}).", check=_at_least(1),
                             expected="at least 1", read_when=("strategy-lp-ft",))
    lp_lr: float = setting(1e-3, "With --strategy lp-ft: learning rate of the linear-probe phase (default {default}).", check=_positive,
                           expected="a positive number", read_when=("strategy-lp-ft",))
    unfreeze_every: int = setting(1, "With --strategy gradual: epochs between two child groups thawing (default {default}).",
                                  check=_at_least(1), expected="at least 1", read_when=("strategy-gradual",))
    lr_decay: float = setting(1.0, "Learning rate factor per child group from the head down, e.g. 0.7 (default 1.0: off).",
                              check=lambda v: 0 < v <= 1, expected="a number in (0, 1], e.g. 0.7 (1.0: off)",
                              read_when=("lightning", "trains-backbone"))
    weight_averaging: str = setting("none", "none (default), ema (validated and saved: the average) or swa (last 20% of epochs).",
                                    choices=("none", "ema", "swa"), read_when=_PROBE)
    ema_decay: float = setting(0.999, "With --weight-averaging ema: the average's decay per optimiser step (default {default}).",
                               check=lambda v: 0 < v < 1, expected="a number in (0, 1), e.g. 0.999", read_when=("ema",))
    wise_ft: bool = setting(False, "Interpolate start and fine-tuned weights; mixing chosen by validation loss.")
    # optimisation
    epochs: int = setting(30, "Maximum epochs (default {default}).", check=_at_least(1), expected="at least 1")
    patience: int = setting(10, "Early stopping patience on validation loss (default {default}).", check=_at_least(1), expected="at least 1")
    batch_size: int = setting(32, "Batch size (default {default}).", check=_at_least(1), expected="at least 1", resume=BATCH)
    accumulate: int = setting(1, "Gradient accumulation: batches per optimiser step (default 1); --resume may trade --batch-size for it at the same effective batch.",
                              check=_at_least(1), expected="1 (off) or the batches per optimizer step, e.g. 2", resume=BATCH,
                              read_when=_PROBE)
    lr: float = setting(1e-3, "Peak learning rate for AdamW (default {default}).", check=_positive, expected="a positive number")
    weight_decay: float = setting(1e-4, "AdamW weight decay (default {default}).", check=_at_least(0), expected="0 or a positive number")
    warmup_epochs: int = setting(1, "Epochs of linear learning-rate warm-up before the cosine decay (default {default}; 0: off).",
                                 check=_at_least(0), expected="0 (off) or more", read_when=_PROBE)
    class_weights: str = setting("none", "none (default) or balanced class-weighted loss.", choices=("none", "balanced"))
    sampler: str = setting("shuffle", "shuffle (default) or balanced (each class drawn equally often).", choices=("shuffle", "balanced"),
                           read_when=_PROBE)
    loss: str = setting("cross-entropy", "cross-entropy (default) or focal.", read_when=_PROBE)
    focal_gamma: float = setting(2.0, "With --loss focal: the focusing exponent gamma (default {default}).", check=_at_least(0),
                                 expected="0 or a positive number", read_when=("lightning", "focal"))
    label_smoothing: float = setting(0.0, "Label smoothing of the training loss, in [0, 1) (default 0: off).",
                                     check=lambda v: 0 <= v < 1, expected="a number in [0, 1)", read_when=_PROBE)
    seed: int = setting(0, "Random seed (default {default}).")
    # hardware
    accelerator: str = setting("auto", "auto (default), cpu or gpu.")
    devices: str = setting("auto", "Devices per node: a count, GPU ids like 0,1, or auto (default: all GPUs, or 1 CPU process).", read_when=_PROBE)
    precision: str = setting("auto", "auto (default: bf16-mixed where supported), 32-true, bf16-mixed, 16-mixed.")
    num_workers: int = setting(-1, "DataLoader workers (default: chosen by device).", check=_at_least(-1),
                               expected="-1 (chosen by device) or 0 or more", resume=ANY)
    channels_last: bool = setting(True, "Channels-last memory format for the convolutions (default on).", read_when=_PROBE)
    num_nodes: int = setting(1, "Machines to train on (default 1); launch with torchrun or srun, see docs: scaling.", check=_at_least(1),
                             expected="1 or more machines", read_when=_PROBE)
    distributed: str = setting("auto", "Lightning strategy for several devices: auto (default), ddp or ddp_spawn.", choices=DISTRIBUTED,
                               read_when=_PROBE)
    compile: bool = setting(False, "torch.compile the model (helps on GPUs; slow start).")
    # evaluation
    threshold: str = setting("youden", "Threshold policy on val: youden (default), f1, sensitivity:0.95, specificity:0.90, fixed:0.5.")
    bootstrap: int = setting(2000, "Bootstrap resamples for 95% CIs (default {default}, 0 = off).", check=_at_least(0),
                             expected="0 (off) or a number of resamples")
    calibrate: str = setting("temperature", "temperature (default) or none.", choices=("none", "temperature"))
    tta: str = setting("none", "Test-time augmentation, also saved with the model: none (default), crops (centre + 4 shifted crops) or flip (see docs: guide/training-options).")
    # console
    progress: bool = setting(True, "Show progress bars.", resume=ANY)
    # classes
    class_map: dict[str, str] = setting(factory=dict, help="Rename or merge a class, OLD=NEW (repeatable), e.g. BACTERIA=PNEUMONIA.")
    class_names: list[str] | None = setting(None, "Names of an .npz file's class indices 0,1,..., comma-separated.")
    # multi-label data (medtransfer.task, data/manifest.py): told by the source unless `task` says which
    task: str = setting("auto", "auto (default: told by the data), single-label or multi-label; a run's config.yaml holds the resolved kind.",
                        choices=("auto", *TASK_KINDS))
    labels_column: str | None = setting(None, "Multi-label CSV: the column of |-separated findings (default: labels or Finding Labels).")
    findings: list[str] | None = setting(None, "Multi-label: the findings to use, in output order, comma-separated (default: all found).")
    uncertain: str = setting("ignore", "Multi-label CSV: uncertain (-1) labels as ones, zeros or ignore (default: masked out).",
                             choices=UNCERTAIN_POLICIES, expected="ones, zeros or ignore")
    views: list[str] | None = setting(None, "Keep only these views: frontal, lateral (CSV column, CheXpert file names, DICOM tag).",
                                      choices=("frontal", "lateral"), expected="frontal, lateral or frontal,lateral")
    # experiments and tracking
    split_file: str | None = setting(None, "Use this split.csv (from `medtransfer split`) as is instead of drawing a split.", path=True)
    logger: str = setting("csv", "Tracking under RUN/logs/, offline: csv (default), tensorboard or mlflow (local file store).")
    ensemble: int = setting(1, "Train N members (seeds SEED, SEED+1, ...) on one split and save them as one seed-ensemble model; members in OUT/members (default 1).",
                            check=_at_least(1), expected="1 (one model) or the number of seed-ensemble members, e.g. 3")
    # cross-validation (train/cross_validation.py)
    folds: int = setting(0, "K-fold cross-validation by patient: K folds (OUT/folds/fold-k), out-of-fold figures, the K models saved as one (default 0: off). See docs: guide/cross-validation.",
                         check=lambda v: v == 0 or v >= 2, expected="0 (off: one validation split) or 2 or more folds, e.g. 5")
    refit: bool = setting(False, "With --folds: also train one model on all folds for the median best epoch (OUT/refit).")
    jobs: int = setting(1, "With --folds: folds trained at once, each in its own process (default 1).", check=_at_least(1),
                        expected="1 or more folds trained at once", resume=ANY)
    # explanations and privacy
    cam_method: str = setting("gradcam", "Heatmaps of the report's gallery and border check, and the default of explain, predict --cam, shortcuts and serve: gradcam (default), layercam (finer: the stride-16 stage), gradcam++ or cam.")
    keep_identifiers: bool = setting(False, "Keep absolute paths and patient IDs in the report, metrics.json, model.json, gallery and logs (default: relative paths, hashed IDs; see docs: guide/run-folder).",
                                     resume=ANY)

    def __post_init__(self) -> None:
        if isinstance(self.augment, bool):  # TrainConfig(augment=False) as before the policies existed
            self.augment = "light" if self.augment else "none"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def settings(cls) -> dict[str, Setting]:
        """Each setting's description, in field order."""
        return {f.name: f.metadata["setting"] for f in fields(cls)}

    @classmethod
    def descriptions(cls) -> dict[str, str]:
        """Each setting's help text (the `train` flag's and the schema's)."""
        defaults = cls()
        return {name: meta.help_text(getattr(defaults, name)) for name, meta in cls.settings().items()}

    @classmethod
    def from_sources(cls, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        # Each source is checked on its own, so that an error names where the bad value came from.
        values: dict[str, Any] = {}
        if config_file is not None:
            values.update(cls._coerced(read_yaml(Path(config_file)), source=f"--config {config_file}"))
        flags = {k: v for k, v in (overrides or {}).items() if v is not None}
        values.update(cls._coerced(flags, source="options"))
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        config = cls(**cls._coerced(values, source=source))
        config.validate()
        return config

    @classmethod
    def _coerced(cls, values: dict[str, Any], *, source: str) -> dict[str, Any]:
        """`values` with unknown keys refused ("did you mean") and each value converted to its setting's type."""
        defaults = cls()
        return coerced_values(values, {name: getattr(defaults, name) for name in cls.field_names()}, source=source)

    def validate(self) -> None:
        for name, meta in self.settings().items():
            value = getattr(self, name)
            if not meta.accepts(value):
                raise ConfigError(f"{flag_name(name)}: got {shown(value)}; expected {meta.expectation()}")
        relations = [  # settings bounded by another setting
            (self.image_size <= self.cache_size <= MAX_IMAGE_SIZE, "cache_size", self.cache_size,
             f"at least image_size ({self.image_size}) and at most {MAX_IMAGE_SIZE} pixels"),
            (0 < self.eval_crop_fraction <= 1 and self.image_size / self.eval_crop_fraction <= 2 * MAX_IMAGE_SIZE,
             "eval_crop_fraction", self.eval_crop_fraction, f"in (0, 1], with image_size / it at most {2 * MAX_IMAGE_SIZE}"),
        ]
        for ok, name, value, expected in relations:
            if not ok:
                raise ConfigError(f"{flag_name(name)}: got {shown(value)}; expected {expected}")
        self._validate_folds()

    def _validate_folds(self) -> None:
        """Settings that only cross-validation reads, and what it cannot combine with."""
        if self.folds and self.ensemble > 1:
            raise ConfigError(f"--folds {self.folds} with --ensemble {self.ensemble}: cross-validation already saves its "
                              "fold models as one ensemble; use one of the two")
        if self.refit and not self.folds:
            raise ConfigError("--refit: trains one model on all folds after cross-validation; add --folds K, e.g. --folds 5")
        if self.jobs > 1 and not self.folds:
            raise ConfigError(f"--jobs {self.jobs}: trains cross-validation folds side by side; add --folds K "
                              "(a grid runs in parallel with `medtransfer experiment --jobs N`)")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def write_yaml(self, path: Path) -> None:
        write_yaml_atomic(path, self.to_dict())
