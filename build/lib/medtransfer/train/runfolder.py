"""The run folder around a training run: who may write it, whether it may be (re)used, and
what a resume needs before it starts.

- :func:`hold_run_folder`: one writer per run folder (:class:`~medtransfer.rundir.FolderLock`),
  then :func:`check_run_dir`; a new folder that a failed check leaves empty is removed again.
- :func:`check_resumable`: the checkpoint a resume continues from, checked before any work, and
  the run folder's history and best weights made to agree with it.
- :func:`with_absolute_paths`: the paths a run records (data, cache, weights file) made
  absolute, so that ``--resume`` works from any working directory.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from medtransfer.config import TrainConfig
from medtransfer.errors import ConfigError
from medtransfer.rundir import CONFIG_FILE, FolderLock, RunDir
from medtransfer.train.checkpointing import restore_epoch_files
from medtransfer.train.validate import uses_feature_probe

__all__ = ["LOCK_FILES", "check_resumable", "check_run_dir", "hold_run_folder", "with_absolute_paths"]

LOCK_FILES = (".lock", ".lock.pid")


@contextmanager
def hold_run_folder(out: Path, *, resume: bool) -> Iterator[None]:
    """Hold the folder's lock for the block (a second writer fails at once, naming the holder)
    after checking that it may be used; a folder created here and left empty is removed."""
    created = not out.exists()
    if not resume and not (out / CONFIG_FILE).is_file():
        check_run_dir(out, resume=False)  # a foreign folder is refused before a lock file is put in it
    lock = FolderLock(out, what="--resume" if resume else "--out")
    lock.acquire()  # a run still training: fails here, naming its process
    try:
        check_run_dir(out, resume=resume)
        yield
    except BaseException:
        lock.release()
        if out.is_dir() and all(p.name in LOCK_FILES for p in out.iterdir()):
            for name in LOCK_FILES:
                (out / name).unlink(missing_ok=True)
            if created:
                out.rmdir()
        raise
    else:
        lock.release()


def check_run_dir(out: Path, *, resume: bool) -> None:
    """A new run needs a new or empty folder; never overwrite a finished or foreign folder."""
    if resume:
        if not (out / CONFIG_FILE).is_file():
            raise ConfigError(f"--resume {out}: not a medtransfer run (no {CONFIG_FILE}); pass the --out folder of the run")
        if RunDir(out).finished():
            raise ConfigError(
                f"--resume {out}: the run already finished (metrics.json and report.html are written); nothing to "
                "resume. Read its results there, or start a new run with --out NEW_FOLDER"
            )
        return
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out}: exists and is a file; choose a new folder")
        if (out / CONFIG_FILE).is_file():
            raise ConfigError(
                f"--out {out}: already holds a run; use --resume {out} to continue it, or choose a new folder"
            )
        if any(p.name not in LOCK_FILES for p in out.iterdir()):
            raise ConfigError(f"--out {out}: exists, is not empty and is not a medtransfer run; choose a new folder")



def check_resumable(out: Path, config: TrainConfig, console: Console) -> None:
    """Fail (one line) when the run cannot continue where it stopped; make history.csv and the best
    weights agree with the checkpoint (:func:`restore_epoch_files`); say where it continues."""
    if uses_feature_probe(config):  # trained on features computed once: nothing to continue, it reruns
        console.print(f"Resuming {out}: the linear probe on cached features trains again from the start (seconds)")
        return
    console.print(f"Resuming {out}: {restore_epoch_files(out)} of {config.epochs}")
    saved = TrainConfig.from_sources(out / CONFIG_FILE) if (out / CONFIG_FILE).is_file() else config
    if (saved.batch_size, saved.accumulate) != (config.batch_size, config.accumulate):
        console.print(
            f"Batches of {config.batch_size} x {config.accumulate} accumulated (the run took {saved.batch_size} x "
            f"{saved.accumulate}): the same images per optimizer step and the same schedule, but BatchNorm statistics "
            "over smaller batches and another summation order, so the numbers differ from an uninterrupted run"
        )


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """``config`` with its data, cache and weights-file paths absolute (a relative path would
    break ``--resume`` from another folder). Values that are not existing paths stay as given."""
    changes = {}
    for name in ("data", "weights", "cache_dir", "split_file"):
        value = getattr(config, name)
        if value and (name == "cache_dir" or Path(value).exists()):
            changes[name] = os.path.abspath(os.path.expanduser(value))
    return dataclasses.replace(config, **changes)
