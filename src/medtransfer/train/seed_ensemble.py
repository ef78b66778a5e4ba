"""`train --ensemble N`: N runs that differ only in their seed, trained on one split and saved as ONE
model folder.

Averaging the logits of a few independently trained members is the cheapest robustness to a
shifted test site that the recipe comparison found (docs: results): the members
make different mistakes off the training distribution while agreeing on it. The run folder
OUT holds the ensemble itself (model/ with every member's weights, metrics.json, predictions,
report: what `medtransfer ensemble` writes) and OUT/members/seed-S, one ordinary run folder
per member, with seeds ``seed``, ``seed + 1``, ... The first member draws the patient-level
split (or reads ``split_file``); the others read its split.csv, so every member sees the same
validation images the ensemble's threshold is chosen on.

Interrupted, ``--resume OUT`` keeps the finished members, resumes the one that was training
(from its last checkpoint) and trains the rest. Members train one after another in one
process: several devices per member would need every rank to walk the member loop in step,
so the ensemble refuses them; train the members with ``--split-file`` on several machines
and combine them with `medtransfer ensemble` instead.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from rich.console import Console

from medtransfer.config import TrainConfig
from medtransfer.errors import ConfigError
from medtransfer.rundir import CONFIG_FILE, RunDir
from medtransfer.train.cross_validation import train_cross_validation
from medtransfer.train.ensemble import build_ensemble
from medtransfer.train.pipeline import run_training
from medtransfer.train.runfolder import hold_run_folder, with_absolute_paths
from medtransfer.train.validate import validate_config

__all__ = ["MEMBERS", "member_seeds", "train_run", "train_seed_ensemble"]

MEMBERS = "members"


def train_run(config: TrainConfig, out: Path, *, resume: bool, console: Console) -> dict[str, Any] | None:
    """`medtransfer train`: one run, a seed ensemble when ``config.ensemble`` > 1, or K-fold cross-validation
    when ``config.folds`` > 1 (then "oof", the pooled out-of-fold figures, instead of "val"). Returns the val
    and test metrics and the threshold (None on a DDP process other than rank 0, which prints nothing)."""
    if config.folds > 1:
        return train_cross_validation(config, out, resume=resume, console=console)
    if config.ensemble > 1:
        return train_seed_ensemble(config, out, resume=resume, console=console)
    result = run_training(config, out, resume=resume, console=console)
    return None if result is None else {"val": result.val, "test": result.test, "threshold": result.threshold}


def member_seeds(config: TrainConfig) -> list[int]:
    return [config.seed + k for k in range(config.ensemble)]


def train_seed_ensemble(config: TrainConfig, out: Path, *, resume: bool, console: Console) -> dict[str, Any]:
    """Train (or keep, or resume) every member into OUT/members, then write the ensemble into OUT."""
    check_single_process(config)
    validate_config(config)  # before OUT/config.yaml exists: a refused setting leaves no folder behind
    if not resume:
        config = with_absolute_paths(config)
    with hold_run_folder(out, resume=resume):
        if not resume:
            config.write_yaml(out / CONFIG_FILE)  # the ensemble's own settings: --resume reads them
        runs = [_train_member(config, out, seed, index, console) for index, seed in enumerate(member_seeds(config))]
        console.rule(f"Seed ensemble of {len(runs)} members")
        return build_ensemble(runs, out, cache_dir=Path(config.cache_dir) if config.cache_dir else None,
                              accelerator=config.accelerator, console=console, held_run_folder=True)


def _train_member(config: TrainConfig, out: Path, seed: int, index: int, console: Console) -> Path:
    run = out / MEMBERS / f"seed-{seed}"
    first = out / MEMBERS / f"seed-{config.seed}"
    split_file = config.split_file if index == 0 else str(first / "split.csv")
    # One device per member: "auto" would start every visible GPU's process on the member loop
    devices = "1" if config.devices == "auto" else config.devices
    member = dataclasses.replace(config, seed=seed, ensemble=1, split_file=split_file, devices=devices)
    if RunDir(run).finished():
        console.print(f"Member seed {seed}: finished earlier, kept ({run})")
        return run
    resume = (run / CONFIG_FILE).is_file()  # started before the interruption
    console.rule(f"Member seed {seed} of {config.ensemble}" + (" (resuming)" if resume else ""))
    run_training(member, run, resume=resume, console=console)
    return run


def check_single_process(config: TrainConfig) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun or SLURM started several processes
    if launched or config.num_nodes > 1 or config.devices not in ("auto", "1") or config.distributed != "auto":
        raise ConfigError(
            f"--ensemble {config.ensemble}: members train one after another in one process, so --devices "
            f"{config.devices} / --num-nodes {config.num_nodes} / --distributed {config.distributed} cannot apply; "
            "train each seed with --split-file on its own devices and combine them with `medtransfer ensemble`"
        )
