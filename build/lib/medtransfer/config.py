"""The one typed training configuration.

Precedence, stated once: dataclass defaults < YAML file (--config) < command-line flags.
The resolved object is saved as RUN/config.yaml and components receive the parts they need.
`TrainConfig.validate` checks each value on its own; choices owned by other modules
(backbone, strategy, threshold policy, precision...) are checked by
`medtransfer.train.validate.validate_config`, which asks those modules.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import reprlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from medtransfer.errors import ConfigError
from medtransfer.rundir import CONFIG_FILE, write_yaml_atomic
from medtransfer.task import TASK_KINDS, UNCERTAIN_POLICIES

DISTRIBUTED = ("auto", "ddp", "ddp_spawn")  # Lightning strategies `train --distributed` passes on
MAX_IMAGE_SIZE = 4096  # largest image_size and cache_size (decode size), here and in a saved model.json
MAX_YAML_BYTES, MAX_YAML_NODES = 1 << 20, 100_000  # a settings file: its size, and its values with aliases expanded
MAX_NAMES, MAX_NAME = 1000, 200  # class or finding names in a setting (as in a saved model.json), and their length


@dataclass
class TrainConfig:
    # data
    data: str = ""
    labels: str = "folder"  # or kermany-3class
    patient_regex: str | None = None
    val_fraction: float = 0.2
    # A patient-level test split is drawn when the data has none: this fraction, 0.2 when None.
    test_fraction: float | None = None
    keep_official_val: bool = False
    positive_class: str | None = None  # default: PNEUMONIA when present, else the last class
    skip_bad_images: bool = False
    strict: bool = False  # leakage between splits fails the run
    cache_dir: str | None = None
    cache_size: int = 256
    image_size: int = 224
    eval_crop_fraction: float = 0.875
    border_crop: float = 0.0  # fraction cut off each side before resizing (train, evaluation, saved model)
    # augmentation: none, light, radiograph or trivial (data/augment.py; old true/false read as light/none;
    # none: a linear probe then trains on cached features)
    augment: str = "light"
    crop_scale: tuple[float, float] = (0.6, 1.0)
    rotation_degrees: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2
    horizontal_flip: bool = False
    augment_on: str = "auto"  # auto (the GPU when training on one), workers or device
    mixup: float = 0.0  # Beta(alpha, alpha) mixing of image pairs in the training step (0: off)
    cutmix: float = 0.0  # Beta(alpha, alpha) pasted boxes (0: off; with mixup, one of the two per batch)
    # model
    backbone: str = "resnet18"
    weights: str = "imagenet"
    strategy: str = "finetune"
    in_channels: int = 3  # 1: grayscale in one channel (first convolution's RGB filters summed)
    output_stride: int = 32  # 16 or 8: last stage dilated instead of strided, finer class activation maps
    freeze_children: int = 4
    # transfer strategies (see models/strategies.py, models/heads.py, train/wise_ft.py)
    head: str = "linear"  # linear, mlp or dwconv
    lp_epochs: int = 10  # lp-ft: epochs of the linear-probe phase (on cached features)
    lp_lr: float = 1e-3  # lp-ft: learning rate of the linear-probe phase
    unfreeze_every: int = 1  # gradual: epochs between two child groups thawing
    lr_decay: float = 1.0  # learning rate factor per child group from the head down (1.0: off)
    weight_averaging: str = "none"  # none, ema or swa
    ema_decay: float = 0.999
    wise_ft: bool = False  # interpolate start and fine-tuned weights, mixing chosen on val
    # optimisation
    epochs: int = 30
    patience: int = 10
    batch_size: int = 32
    accumulate: int = 1  # batches per optimizer step (Lightning's accumulate_grad_batches); effective batch = batch_size x accumulate
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    class_weights: str = "none"  # or balanced
    sampler: str = "shuffle"  # or balanced: each class drawn equally often
    loss: str = "cross-entropy"  # or focal
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    seed: int = 0
    # hardware
    accelerator: str = "auto"
    devices: str = "auto"
    precision: str = "auto"  # auto: bf16-mixed on CPUs with bf16 support or GPUs, else 32-true
    num_workers: int = -1  # -1: chosen by device
    channels_last: bool = True
    num_nodes: int = 1  # machines; devices per machine is `devices`
    distributed: str = "auto"  # Lightning strategy: auto, ddp (one process per device) or ddp_spawn
    compile: bool = False  # torch.compile the model (in place; saved weights keep their names)
    # evaluation
    threshold: str = "youden"
    bootstrap: int = 2000
    calibrate: str = "temperature"  # or none
    tta: str = "none"  # test-time augmentation of evaluation and the saved model: none, crops or flip
    # console
    progress: bool = True
    # classes: OLD -> NEW renames or merges (--class-map OLD=NEW); names of an .npz file's label indices
    class_map: dict[str, str] = field(default_factory=dict)
    class_names: list[str] | None = None
    # multi-label data (medtransfer.task, data/manifest.py): told by the source unless `task` says which
    task: str = "auto"  # auto, single-label or multi-label; a run's config.yaml holds the resolved kind
    labels_column: str | None = None  # CSV column of |-separated findings (default: labels or Finding Labels)
    findings: list[str] | None = None  # the findings to train on, in output order (default: every finding found)
    uncertain: str = "ignore"  # CheXpert's -1 labels: ones, zeros or ignore (masked out of loss and metrics)
    views: list[str] | None = None  # keep only these views: frontal, lateral (CSV column, file names, DICOM tag)
    # experiments and tracking
    split_file: str | None = None  # a split.csv (from `medtransfer split`) used as is instead of drawing a split
    logger: str = "csv"  # csv, tensorboard or mlflow (train/tracking.py): settings and per-epoch metrics in RUN/logs/
    ensemble: int = 1  # > 1: that many members, seeds seed, seed+1, ..., saved as one model (train/seed_ensemble.py)
    # cross-validation (train/cross_validation.py): K patient-grouped folds (0: one validation split), one fold ensemble
    folds: int = 0
    refit: bool = False  # with folds: also one model on all folds for the median best epoch (OUT/refit)
    jobs: int = 1  # with folds: folds trained at once, each in its own process
    # explanations
    cam_method: str = "gradcam"  # heatmaps of the report's gallery and border check: cam, gradcam, gradcam++ or layercam
    keep_identifiers: bool = False  # true: shareable outputs (report, metrics.json, model/, gallery, logs) keep paths and IDs

    def __post_init__(self) -> None:
        if isinstance(self.augment, bool):  # TrainConfig(augment=False) as before the policies existed
            self.augment = "light" if self.augment else "none"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

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
        """`values` with unknown keys refused and each value converted to its setting's type."""
        defaults = cls()
        known = cls.field_names()
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key).replace("-", "_"), known, n=1) if len(str(key)) <= 80 else []
                hint = f"; did you mean {close[0]!r}?" if close else f"; known settings: {', '.join(known)}"
                raise ConfigError(f"{source}: unknown setting {shown(key)}{hint}")
        return {
            key: _SPECIAL.get(key, _coerce)(key, value, getattr(defaults, key), source) for key, value in values.items()
        }

    def validate(self) -> None:
        checks = [
            (0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "a number between 0 and 1"),
            (self.test_fraction is None or 0 <= self.test_fraction < 1, "test_fraction", self.test_fraction,
             "a number in [0, 1) (0: no test split drawn)"),
            (self.epochs >= 1, "epochs", self.epochs, "at least 1"),
            (self.patience >= 1, "patience", self.patience, "at least 1"),
            (self.batch_size >= 1, "batch_size", self.batch_size, "at least 1"),
            (self.accumulate >= 1, "accumulate", self.accumulate, "1 (off) or the batches per optimizer step, e.g. 2"),
            (self.lr > 0, "lr", self.lr, "a positive number"),
            (16 <= self.image_size <= MAX_IMAGE_SIZE, "image_size", self.image_size, f"16 to {MAX_IMAGE_SIZE} pixels"),
            (self.image_size <= self.cache_size <= MAX_IMAGE_SIZE, "cache_size", self.cache_size,
             f"at least image_size ({self.image_size}) and at most {MAX_IMAGE_SIZE} pixels"),
            (0 < self.eval_crop_fraction <= 1 and self.image_size / self.eval_crop_fraction <= 2 * MAX_IMAGE_SIZE,
             "eval_crop_fraction", self.eval_crop_fraction, f"in (0, 1], with image_size / it at most {2 * MAX_IMAGE_SIZE}"),
            (0 <= self.border_crop <= 0.4, "border_crop", self.border_crop, "a fraction in [0, 0.4] cut off each side, e.g. 0.1"),
            (len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop_scale", self.crop_scale,
             "two numbers MIN,MAX with 0 < MIN <= MAX <= 1, e.g. 0.6,1.0"),
            (self.rotation_degrees >= 0, "rotation_degrees", self.rotation_degrees, "0 (off) or a positive angle"),
            (self.brightness >= 0, "brightness", self.brightness, "0 (off) or a positive number"),
            (self.contrast >= 0, "contrast", self.contrast, "0 (off) or a positive number"),
            (self.freeze_children >= 0, "freeze_children", self.freeze_children, "0 or more"),
            (self.in_channels in (1, 3), "in_channels", self.in_channels, "1 (grayscale) or 3 (RGB)"),
            (self.output_stride in (8, 16, 32), "output_stride", self.output_stride, "32 (default), 16 or 8"),
            (self.weight_decay >= 0, "weight_decay", self.weight_decay, "0 or a positive number"),
            (self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, "0 (off) or more"),
            (self.focal_gamma >= 0, "focal_gamma", self.focal_gamma, "0 or a positive number"),
            (0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "a number in [0, 1)"),
            (self.num_workers >= -1, "num_workers", self.num_workers, "-1 (chosen by device) or 0 or more"),
            (self.class_weights in ("none", "balanced"), "class_weights", self.class_weights, "none or balanced"),
            (self.sampler in ("shuffle", "balanced"), "sampler", self.sampler, "shuffle or balanced"),
            (self.calibrate in ("none", "temperature"), "calibrate", self.calibrate, "none or temperature"),
            (self.bootstrap >= 0, "bootstrap", self.bootstrap, "0 (off) or a number of resamples"),
            (self.lp_epochs >= 1, "lp_epochs", self.lp_epochs, "at least 1"),
            (self.lp_lr > 0, "lp_lr", self.lp_lr, "a positive number"),
            (self.unfreeze_every >= 1, "unfreeze_every", self.unfreeze_every, "at least 1"),
            (0 < self.lr_decay <= 1, "lr_decay", self.lr_decay, "a number in (0, 1], e.g. 0.7 (1.0: off)"),
            (self.weight_averaging in ("none", "ema", "swa"), "weight_averaging", self.weight_averaging, "none, ema or swa"),
            (0 < self.ema_decay < 1, "ema_decay", self.ema_decay, "a number in (0, 1), e.g. 0.999"),
            (self.num_nodes >= 1, "num_nodes", self.num_nodes, "1 or more machines"),
            (self.distributed in DISTRIBUTED, "distributed", self.distributed, " or ".join(DISTRIBUTED)),
            (self.mixup >= 0, "mixup", self.mixup, "0 (off) or a positive Beta alpha, e.g. 0.2"),
            (self.cutmix >= 0, "cutmix", self.cutmix, "0 (off) or a positive Beta alpha, e.g. 1.0"),
            (self.ensemble >= 1, "ensemble", self.ensemble, "1 (one model) or the number of seed-ensemble members, e.g. 3"),
            (self.task in ("auto", *TASK_KINDS), "task", self.task, "auto, single-label or multi-label"),
            (self.folds == 0 or self.folds >= 2, "folds", self.folds, "0 (off: one validation split) or 2 or more folds, e.g. 5"),
            (self.jobs >= 1, "jobs", self.jobs, "1 or more folds trained at once"),
            (self.uncertain in UNCERTAIN_POLICIES, "uncertain", self.uncertain, "ones, zeros or ignore"),
            (not self.views or set(self.views) <= {"frontal", "lateral"}, "views", self.views, "frontal, lateral or frontal,lateral"),
        ]
        for ok, name, value, expected in checks:
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')}: got {shown(value)}; expected {expected}")
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


def default_cache_dir() -> Path:
    """The decoded-image cache shared by all runs: $MEDTRANSFER_CACHE, else ~/.cache/medtransfer."""
    if os.environ.get("MEDTRANSFER_CACHE"):
        return Path(os.environ["MEDTRANSFER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medtransfer"


def parse_set_values(items: list[str] | None) -> dict[str, str]:
    """`--set KEY=VALUE` items as settings (values are coerced later, with the other sources)."""
    values = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {shown(item)}: expected KEY=VALUE, e.g. --set label_smoothing=0.1")
        values[key.strip().replace("-", "_")] = value
    return values


# Settings a resumed run may change: they do not change what the run computes (augment_on: where, not what).
RESUME_OVERRIDABLE = ("num_workers", "progress", "cache_dir", "augment_on", "jobs", "keep_identifiers")
EFFECTIVE_BATCH = ("batch_size", "accumulate")  # may change on resume together, keeping batch_size x accumulate


def resolve_train_config(
    *, out: Path | None, resume: Path | None, config_file: Path | None, overrides: dict[str, Any]
) -> tuple[TrainConfig, Path]:
    """The settings and run folder of `medtransfer train`.

    A new run: defaults < `config_file` < `overrides`, into `out`. A resumed run: the run's
    own config.yaml < `overrides`, in `resume`. A missing cache_dir becomes
    :func:`default_cache_dir`. `overrides` values of None mean "not given".
    """
    if resume is not None:
        if config_file is not None or overrides.get("data") is not None:
            raise ConfigError("--resume: takes the run's own config.yaml; leave out --config and --data")
        if out is not None and Path(out) != Path(resume):
            raise ConfigError(f"--resume {resume}: continues the run in its own folder; leave out --out {out}")
        changed = sorted(k for k, v in overrides.items() if v is not None and k not in RESUME_OVERRIDABLE + EFFECTIVE_BATCH)
        if changed:
            listed = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise ConfigError(f"--resume {resume}: continues with the run's own settings, so {listed} cannot change; leave "
                              f"{'it' if len(changed) == 1 else 'them'} out (only {', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDABLE)} "
                              "may), or start a new run with --out")
        saved = Path(resume) / CONFIG_FILE
        config = TrainConfig.from_sources(saved if saved.is_file() else None, overrides)
        run = TrainConfig.from_sources(saved if saved.is_file() else None)
        if config.batch_size * config.accumulate != run.batch_size * run.accumulate:
            k = next((d for d in range(2, run.batch_size + 1) if run.batch_size % d == 0), 1)  # smallest divisor
            raise ConfigError(f"--resume {resume}: --batch-size {config.batch_size} x --accumulate {config.accumulate} changes the "
                              f"run's effective batch of {run.batch_size * run.accumulate} ({run.batch_size} x {run.accumulate}); "
                              f"keep the product, e.g. --batch-size {run.batch_size // k} --accumulate {run.accumulate * k}")
        run_dir = Path(resume)
    else:
        if out is None:
            raise ConfigError("--out: required; name a new folder for the run, e.g. --out runs/first")
        config = TrainConfig.from_sources(config_file, overrides)
        if not config.data:
            raise ConfigError("--data: required; pass the dataset folder or CSV (or set data: in --config)")
        run_dir = Path(out)
    if config.cache_dir is None:
        config.cache_dir = str(default_cache_dir())
    return config, run_dir


def read_yaml(path: Path) -> dict[str, Any]:
    """A settings file: safe YAML of at most MAX_YAML_BYTES whose values, every alias (*name) expanded, number at
    most MAX_YAML_NODES: a few hundred bytes of nested aliases ("billion laughs") are refused before use."""
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file; pass a YAML file such as configs/chest_xray_pneumonia.yaml")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"--config {path}: {path.stat().st_size:,} bytes; a settings file holds at most {MAX_YAML_BYTES:,}")
    try:
        values = yaml.load(path.read_text(), Loader=_BoundedLoader) or {}
    except (yaml.YAMLError, RecursionError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0][:200] if isinstance(exc, yaml.YAMLError) else f"{type(exc).__name__}: too deep or not UTF-8"
        raise ConfigError(f"--config {path}: not valid YAML ({reason})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of setting: value, got {type(values).__name__}")
    return values


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts a document's values with every alias expanded (memoised; a cycle is refused)."""
    def compose_document(self):
        node, sizes = super().compose_document(), {}

        def size(item: yaml.Node, active: frozenset = frozenset()) -> int:
            if id(item) in active:
                raise yaml.YAMLError("an alias refers to the value that contains it")
            if id(item) not in sizes:
                children = item.value if isinstance(item, yaml.SequenceNode) else (
                    [n for pair in item.value for n in pair] if isinstance(item, yaml.MappingNode) else [])
                sizes[id(item)] = 1 + sum(size(child, active | {id(item)}) for child in children)
                if sizes[id(item)] > MAX_YAML_NODES:
                    raise yaml.YAMLError(f"its aliases expand to more than {MAX_YAML_NODES:,} values; write them out")
            return sizes[id(item)]
        return node if node is None or size(node) else node


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 80, 80, 8, 8
_WORDS = {"true": True, "yes": True, "1": True, "on": True, "false": False, "no": False, "0": False, "off": False}


def shown(value: Any, limit: int = 200) -> str:
    """repr(value) for an error message, cut to `limit` characters without building the whole repr first."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_EXPECTED = {bool: "true or false", int: "a whole number", float: "a number", str: "a text value", tuple: "a list of numbers"}


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    """Convert YAML/CLI values to the type of the default, with a clear error."""
    try:
        if default is None:  # optional text settings
            if isinstance(value, (list, tuple, dict)):
                raise ValueError
            return None if value is None else str(value)
        if isinstance(default, bool):
            if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in _WORDS:
                return _WORDS[value.strip().lower()]
            raise ValueError
        if isinstance(value, bool):  # YAML turns yes/no/on/off into booleans; never read them as 1/0
            raise ValueError
        if isinstance(default, tuple):
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            if len(items) != len(default):
                raise ValueError
            return tuple(float(v) for v in items)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, str):
            if value is None or isinstance(value, (list, tuple, dict)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        expected = _EXPECTED.get(type(default), type(default).__name__)
        if isinstance(default, tuple):
            expected = f"a list of {len(default)} numbers, e.g. {','.join(str(v) for v in default)}"
        raise ConfigError(f"{source}: setting {key!r} got {shown(value)}; expected {expected}") from None
    return value


def _optional_fraction(key: str, value: Any, default: Any, source: str) -> float | None:
    """None (also "none" or "") keeps the default rule; anything else must be a number."""
    blank = value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))
    return None if blank else _coerce(key, value, 0.0, source)


def _class_map(key: str, value: Any, default: Any, source: str) -> dict[str, str]:
    """A YAML mapping {OLD: NEW}, or OLD=NEW text (several separated by commas, as --set gives them)."""
    if isinstance(value, str):
        value = [item for item in value.split(",") if item.strip()]
    if not isinstance(value, (dict, list, tuple)) and value is not None:
        raise ConfigError(f"{source}: setting {key!r} got {shown(value)}; expected a mapping OLD: NEW or OLD=NEW items")
    return parse_class_map(value)


def _class_names(key: str, value: Any, default: Any, source: str) -> list[str] | None:
    """A YAML list, or names separated by commas."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if (not isinstance(items, (list, tuple)) or len(items) > MAX_NAMES
            or not all(isinstance(v, (str, int)) and len(str(v)) <= MAX_NAME for v in items)):
        raise ConfigError(f"{source}: setting {key!r} got {shown(value)}; expected class names, e.g. normal,pneumonia "
                          f"(at most {MAX_NAMES}, of at most {MAX_NAME} characters each)")
    names = [str(v).strip() for v in items]
    if not all(names):
        raise ConfigError(f"{source}: setting {key!r} got {shown(value)}; a class name is empty")
    return names


def _augment(key: str, value: Any, default: Any, source: str) -> str:
    """A policy name; true/false (run folders and YAML from before the policies) read as light/none."""
    if isinstance(value, bool):
        return "light" if value else "none"
    text = _coerce(key, value, default, source).strip().lower()
    return {"true": "light", "yes": "light", "on": "light", "false": "none", "no": "none", "off": "none"}.get(text, text)


_SPECIAL = {
    "test_fraction": _optional_fraction, "class_map": _class_map, "class_names": _class_names, "augment": _augment,
    "findings": _class_names, "views": _class_names,
}


def parse_class_map(values: Iterable[str] | Mapping[str, str] | None) -> dict[str, str]:
    """{OLD: NEW} from "OLD=NEW" strings (the repeatable flag) or a YAML mapping.

    >>> parse_class_map(["BACTERIA=PNEUMONIA", "VIRUS=PNEUMONIA"])
    {'BACTERIA': 'PNEUMONIA', 'VIRUS': 'PNEUMONIA'}
    """
    if values is None:
        return {}
    pairs = [(str(k), str(v)) for k, v in values.items()] if isinstance(values, Mapping) else []
    if not isinstance(values, Mapping):
        for value in [values] if isinstance(values, str) else values:
            old, sep, new = str(value).partition("=")
            if not sep:
                raise ConfigError(f"--class-map {shown(value)}: expected OLD=NEW, e.g. --class-map BACTERIA=PNEUMONIA")
            pairs.append((old, new))
    mapping: dict[str, str] = {}
    for old, new in ((o.strip(), n.strip()) for o, n in pairs):
        if not old or not new:
            raise ConfigError(f"--class-map {shown(f'{old}={new}')}: both the old and the new class name are needed")
        if mapping.get(old, new) != new:
            raise ConfigError(f"--class-map maps {shown(old)} twice ({shown(old)[1:-1]}={shown(mapping[old])[1:-1]}, "
                              f"{shown(old)[1:-1]}={shown(new)[1:-1]}); keep one")
        mapping[old] = new
    return mapping
