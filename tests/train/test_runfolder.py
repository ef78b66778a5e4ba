"""The run folder around training: one writer, checked checkpoints, finished runs, absolute paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from medtransfer.config import TrainConfig
from medtransfer.errors import ConfigError, DataError
from medtransfer.rundir import FolderLock
from medtransfer.train.callbacks import write_history
from medtransfer.train.checkpointing import checkpoint_to_resume
from medtransfer.train.runfolder import check_resumable, check_run_dir, hold_run_folder, with_absolute_paths

ROOT = Path(__file__).resolve().parents[2]
ROW = {"train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.5, "lr": 0.1, "seconds": 1.0}


def test_a_second_writer_of_a_run_folder_fails_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    code = f"from medtransfer.rundir import FolderLock; import time; lock = FolderLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"^--resume {run}: the run is in use by process {holder.pid} \(still training\?\)"):
            with hold_run_folder(run, resume=True):
                pass
    finally:
        holder.kill()
        holder.wait()
    with FolderLock(run):  # the kernel released the dead holder's lock
        pass


def test_a_new_folder_that_fails_its_checks_is_removed_again(tmp_path):
    with pytest.raises(RuntimeError):
        with hold_run_folder(tmp_path / "new", resume=False):
            raise RuntimeError("a later check failed")
    assert not (tmp_path / "new").exists()


def test_resuming_a_finished_run_says_so(tmp_path):
    for name in ("config.yaml", "metrics.json", "report.html"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(ConfigError, match=r"the run already finished .* nothing to resume"):
        check_run_dir(tmp_path, resume=True)


def test_a_missing_checkpoint_after_finished_epochs_is_one_line(tmp_path):
    assert checkpoint_to_resume(tmp_path, epochs_done=0) is None  # killed before epoch 1 ended: starts over, and says so
    with pytest.raises(DataError, match=r"^--resume .*: 2 epoch\(s\) finished but .*last.ckpt is missing"):
        checkpoint_to_resume(tmp_path, epochs_done=2)


def test_a_truncated_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": {"w": torch.ones(1000)}, "loops": {}}, path)
    assert checkpoint_to_resume(tmp_path, epochs_done=1) == path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"last.ckpt is truncated or unreadable .*; start again with `medtransfer train --config"):
        checkpoint_to_resume(tmp_path, epochs_done=1)


def test_check_resumable_says_where_it_continues(tmp_path):
    console = Console(record=True, width=200)
    check_resumable(tmp_path, TrainConfig(epochs=3), console)
    write_history([{"epoch": 1, **ROW}], tmp_path / "history.csv")
    with pytest.raises(DataError, match="1 epoch"):
        check_resumable(tmp_path, TrainConfig(epochs=3), console)
    assert "no epoch had finished; training starts at epoch 1" in console.export_text()


def test_recorded_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    config = with_absolute_paths(TrainConfig(data="data", cache_dir="cache", weights="imagenet"))
    assert (config.data, config.cache_dir, config.weights) == (str(tmp_path / "data"), str(tmp_path / "cache"), "imagenet")


def test_a_second_train_out_of_a_run_still_training_names_the_holder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 1\n")
    with FolderLock(run):  # this process is "training"
        with pytest.raises(ConfigError, match=rf"^--out {run}: the run is in use by process {os.getpid()}"):
            with hold_run_folder(run, resume=False):
                pass
