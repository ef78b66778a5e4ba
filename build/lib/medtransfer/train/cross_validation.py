"""`train --folds K`: patient-grouped, stratified K-fold cross-validation, saved as ONE fold-ensemble model.

Small medical datasets make one validation split a lottery: early stopping, the threshold and
the reported figures all hang on a handful of patients. Here the pool (train + val of the source)
is divided once into K folds by patient, stratified by class or, for multi-label data, over the
findings (:mod:`medtransfer.data.folds`); a test split, official or drawn as a single-split run
draws it, stays outside the folds. OUT/split.csv records it, with a ``fold`` column.

Fold k trains as an ordinary run folder OUT/folds/fold-k on the other folds, with fold k as its
validation split (early stopping, its own threshold and temperature), reading its split from
OUT/folds/fold-k.csv (``split_file``). Then (:mod:`medtransfer.train.fold_ensemble`) every pool
image gets its one out-of-fold prediction, the final operating point is chosen on those pooled
logits, and the K models are saved in OUT as one model (logits averaged), scored on test.
``refit`` also trains one model on all folds (:mod:`medtransfer.train.refit`).

Interrupted, ``--resume OUT`` keeps the finished folds, resumes the one that was training and
trains the rest. ``jobs`` > 1 trains that many folds at once, each in its own process
(``medtransfer train`` on the fold's folder, log OUT/folds/fold-k.log), with the cores shared.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from medtransfer.config import TrainConfig
from medtransfer.data.discover import Record
from medtransfer.data.folds import (
    assign_folds,
    draw_folds,
    fold_records,
    read_folds,
    write_fold_split_csv,
)
from medtransfer.data.near_duplicates import hash_images
from medtransfer.data.split import read_split_csv, split_summary, write_split_csv
from medtransfer.errors import ConfigError, DataError
from medtransfer.rundir import CONFIG_FILE, RunDir
from medtransfer.runtime import available_cores
from medtransfer.task import Task
from medtransfer.train.fold_ensemble import out_of_fold, write_fold_ensemble
from medtransfer.train.labelled import discover_task, report_leakage, task_of_split_file
from medtransfer.train.pipeline import run_training
from medtransfer.train.refit import train_refit
from medtransfer.train.runfolder import hold_run_folder, with_absolute_paths
from medtransfer.train.validate import uses_feature_probe, validate_config

__all__ = ["FOLDS", "FoldPlan", "check_cross_validation", "fold_config", "train_cross_validation", "write_fold_split"]

FOLDS = "folds"


@dataclass(frozen=True)
class FoldPlan:
    """The records of OUT/split.csv (pool as train, test as test), each one's fold (None: test), the task."""

    records: list[Record]
    numbers: list[int | None]
    task: Task
    leakage: dict[str, Any]
    summary: dict[str, Any]

    @property
    def folds(self) -> int:
        return max(n for n in self.numbers if n is not None)


def check_cross_validation(config: TrainConfig) -> None:
    """Settings that cross-validation cannot honour, refused in one line each (TrainConfig.validate
    already refused --folds 1, --folds with --ensemble, --refit or --jobs without --folds)."""
    k = config.folds
    defaults = TrainConfig()
    if config.keep_official_val:
        raise ConfigError(f"--keep-official-val: --folds {k} pools train and val and makes each fold the validation "
                          "split in turn; leave --keep-official-val out")
    if config.val_fraction != defaults.val_fraction:
        raise ConfigError(f"--val-fraction: got {config.val_fraction}, but --folds {k} validates on each fold in turn "
                          f"(1/{k} of the pool); leave --val-fraction out")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched or config.num_nodes > 1 or config.devices not in ("auto", "1") or config.distributed != "auto":
        raise ConfigError(f"--folds {k}: each fold trains in one process, so --devices {config.devices} / --num-nodes "
                          f"{config.num_nodes} / --distributed {config.distributed} cannot apply; use --jobs N to train "
                          "folds side by side")
    if config.refit:
        blocked = [(uses_feature_probe(config), "the linear probe on cached features keeps its best-on-validation head"),
                   (config.weight_averaging == "ema", "--weight-averaging ema keeps the average chosen on validation"),
                   (config.wise_ft, "--wise-ft chooses its mixing on validation")]
        reason = next((why for hit, why in blocked if hit), None)
        if reason:
            raise ConfigError(f"--refit: the refit model has no validation split, but {reason}; leave out --refit")


def fold_config(config: TrainConfig, out: Path, fold: int) -> TrainConfig:
    """Fold ``fold``'s run: the same settings, its split from OUT/folds/fold-k.csv, one model, one device."""
    defaults = TrainConfig()
    return dataclasses.replace(
        config, folds=0, refit=False, jobs=1, split_file=str(fold_split_file(out, fold)),
        val_fraction=defaults.val_fraction, test_fraction=None, keep_official_val=False,
        devices="1" if config.devices == "auto" else config.devices,
    )


def fold_dir(out: Path, fold: int) -> Path:
    return out / FOLDS / f"fold-{fold}"


def fold_split_file(out: Path, fold: int) -> Path:
    return out / FOLDS / f"fold-{fold}.csv"


def train_cross_validation(config: TrainConfig, out: Path, *, resume: bool, console: Console) -> dict[str, Any]:
    """Draw (or read) the folds, train (or keep, or resume) every fold, then write the fold ensemble into OUT."""
    validate_config(config)  # before OUT exists: a refused setting leaves no folder behind
    check_cross_validation(config)
    if not resume:
        config = with_absolute_paths(config)
    with hold_run_folder(out, resume=resume):
        plan = plan_folds(config, out, console, resume=resume)
        if not resume:
            config = dataclasses.replace(config, task=plan.task.kind,
                                         findings=list(plan.task.classes) if plan.task.multilabel else None)
            config.write_yaml(out / CONFIG_FILE)  # the run's marker: --resume reads it
        if not (out / "split.csv").is_file():  # (a resumed run killed before it was written draws the same folds)
            write_fold_split_csv(plan.records, plan.numbers, out / "split.csv")
        (out / FOLDS).mkdir(exist_ok=True)
        for k in range(1, plan.folds + 1):
            write_split_csv(fold_records(plan.records, plan.numbers, k), fold_split_file(out, k))
        runs = train_folds(config, out, plan.folds, console)
        console.rule(f"{plan.folds}-fold cross-validation: out-of-fold evaluation and the fold ensemble")
        oof = out_of_fold(config, runs, [r for r in plan.records if r.split != "test"])
        refit = None
        if config.refit:
            epochs = [RunDir(run).metrics().best_epoch or 1 for run in runs]
            refit = train_refit(config, out, oof.point, epochs, plan.records, console=console)
        return write_fold_ensemble(config, out, oof, plan.records, leakage=plan.leakage, data_summary=plan.summary,
                                   refit=refit, console=console)


def plan_folds(config: TrainConfig, out: Path, console: Console, *, resume: bool) -> FoldPlan:
    """The folds: a resumed run's split.csv, else ``split_file`` (its fold column, or folds drawn over its
    train and val rows), else drawn from the data; checked, with the leakage check and the data summary."""
    source = out / "split.csv" if resume and (out / "split.csv").is_file() else config.split_file
    k = config.folds
    hashes = None
    if source:
        records = read_split_csv(Path(source))
        numbers = read_folds(Path(source))
        task = task_of_split_file(records, config)
        records = [dataclasses.replace(r, split="test" if r.split == "test" else "train") for r in records]
        if numbers is None:
            pool = [r for r in records if r.split != "test"]
            drawn = iter(assign_folds(pool, folds=k, seed=config.seed, hashes=hash_images([r.path for r in pool]),
                                      findings=task.classes if task.multilabel else None))
            numbers = [None if r.split == "test" else next(drawn) for r in records]
            console.print(f"{source}: no fold column; {k} folds drawn over its train and val images")
    else:
        found = discover_task(config, console)
        task = found.task
        hashes = hash_images([r.path for r in found.records])
        records, numbers = draw_folds(found.records, folds=k, seed=config.seed, test_fraction=config.test_fraction,
                                      hashes=hashes, findings=task.classes if task.multilabel else None)
    check_fold_numbers(records, numbers, k, source or config.data)
    leakage = report_leakage(records, config, console, hashes)
    named = [dataclasses.replace(r, split="test" if n is None else f"fold-{n}") for r, n in zip(records, numbers)]
    summary = split_summary(named, findings=task.classes) if task.multilabel else split_summary(named)
    sizes = Counter(n for n in numbers if n is not None)
    console.print(f"{k} folds by patient: " + ", ".join(f"fold {f} {sizes[f]} images" for f in sorted(sizes))
                  + f"; test {numbers.count(None)} images (outside the folds)")
    return FoldPlan(records, numbers, task, leakage, summary)


def check_fold_numbers(records: list[Record], numbers: list[int | None], k: int, source: Any) -> None:
    """Test rows have no fold, pool rows one of 1..k, every fold holds images, no patient is in two folds."""
    pool_without = sum(1 for r, n in zip(records, numbers) if r.split != "test" and n is None)
    test_with = sum(1 for r, n in zip(records, numbers) if r.split == "test" and n is not None)
    if pool_without or test_with:
        raise DataError(f"{source}: {pool_without} train/val row(s) without a fold and {test_with} test row(s) with one; "
                        "every train and val image needs a fold, test images none")
    found = sorted({n for n in numbers if n is not None})
    if found != list(range(1, k + 1)):
        raise ConfigError(f"--folds {k}: {source} holds folds {found}; use --folds {len(found)} with this file, "
                          "or leave out --split-file to draw the folds")
    fold_of: dict[str, int] = {}
    for r, n in zip(records, numbers):
        if n is not None and fold_of.setdefault(r.patient_id, n) != n:
            raise DataError(f"{source}: patient {r.patient_id} is in folds {fold_of[r.patient_id]} and {n}; "
                            "a patient's images must all lie in one fold")


def train_folds(config: TrainConfig, out: Path, k: int, console: Console) -> list[Path]:
    """Every fold's run folder, trained now, resumed or kept; ``jobs`` > 1: several at once in processes."""
    runs = [fold_dir(out, f) for f in range(1, k + 1)]
    pending = [f for f, run in enumerate(runs, start=1) if not _kept(run, f, k, console)]
    jobs = min(config.jobs, len(pending))
    if jobs <= 1:
        for f in pending:
            run = runs[f - 1]
            resume = (run / CONFIG_FILE).is_file()  # started before the interruption
            console.rule(f"Fold {f} of {k}" + (" (resuming)" if resume else ""))
            run_training(fold_config(config, out, f), run, resume=resume, console=console)
        return runs
    threads = max(1, available_cores() // jobs)
    console.print(f"Training {len(pending)} folds, {jobs} at a time in their own processes ({threads} thread(s) each)")
    with ThreadPoolExecutor(jobs) as pool:
        failures = [e for e in pool.map(lambda f: _fold_process(config, out, f, threads, console), pending) if e]
    if failures:
        raise DataError(f"{len(failures)} fold(s) failed: {failures[0]}; fix the cause and continue with --resume {out}")
    return runs


def _kept(run: Path, fold: int, k: int, console: Console) -> bool:
    if RunDir(run).finished():
        console.print(f"Fold {fold} of {k}: finished earlier, kept ({run})")
        return True
    return False


def _fold_process(config: TrainConfig, out: Path, fold: int, threads: int, console: Console) -> str | None:
    """One fold as `medtransfer train` in its own process (log OUT/folds/fold-k.log); its error line, or None."""
    run, log = fold_dir(out, fold), out / FOLDS / f"fold-{fold}.log"
    if (run / CONFIG_FILE).is_file():
        args = ["--resume", str(run)]
    else:
        settings = out / FOLDS / f"fold-{fold}.yaml"
        fold_config(config, out, fold).write_yaml(settings)
        args = ["--config", str(settings), "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    console.print(f"Fold {fold}: started in its own process (log {escape(str(log))})")
    with open(log, "w") as stream:
        code = subprocess.run([sys.executable, "-m", "medtransfer.cli", "train", *args], stdout=stream,
                              stderr=subprocess.STDOUT, env=env).returncode
    if code == 0 and RunDir(run).finished():
        console.print(f"Fold {fold}: finished")
        return None
    tail = (log.read_text(errors="replace").strip().splitlines() or [""])[-1]
    return f"fold {fold} exited with code {code} ({tail[:200]}; log {log})"


def write_fold_split(config: TrainConfig, out: Path, console: Console) -> None:
    """The split.csv with a fold column that `train --folds K` would draw (for `experiment`: every cell reads it)."""
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; name a CSV file, e.g. --out split.csv")
    found = discover_task(config, console)
    hashes = hash_images([r.path for r in found.records])
    records, numbers = draw_folds(found.records, folds=config.folds, seed=config.seed, test_fraction=config.test_fraction,
                                  hashes=hashes, findings=found.task.classes if found.task.multilabel else None)
    report_leakage(records, config, console, hashes)
    write_fold_split_csv(records, numbers, out)
    console.print(f"Wrote {out} ({config.folds} folds by patient; test outside the folds)")
