"""The settings and run folder of `medtransfer train`: a new run, or a resumed one with what it may change."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medtransfer.config.setting import RESUME_ANY, RESUME_EFFECTIVE_BATCH
from medtransfer.config.settings import TrainConfig
from medtransfer.config.values import shown
from medtransfer.errors import ConfigError
from medtransfer.rundir import CONFIG_FILE

__all__ = ["EFFECTIVE_BATCH", "RESUME_OVERRIDABLE", "default_cache_dir", "parse_set_values", "resolve_train_config"]


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
RESUME_OVERRIDABLE = tuple(name for name, meta in TrainConfig.settings().items() if meta.resume == RESUME_ANY)
# May change on resume together, keeping batch_size x accumulate.
EFFECTIVE_BATCH = tuple(name for name, meta in TrainConfig.settings().items() if meta.resume == RESUME_EFFECTIVE_BATCH)


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
