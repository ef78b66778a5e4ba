"""A run killed with SIGKILL and resumed ends exactly where the uninterrupted run ends.

The interrupted run is a real process killed by SIGKILL at the start of epoch 2 (epoch 1's
checkpoint is on disk), resumed by a fresh process with `train --resume`, as a user would.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--set", "cache_size=40",
        "--batch-size", "8", "--bootstrap", "0", "--num-workers", "0", "--no-progress", "--epochs", "3",
        "--patience", "5", "--precision", "32-true", "--accelerator", "cpu", "--lr", "0.003"]

# Runs the CLI in this process, after arranging a SIGKILL of itself when epoch 2 starts.
KILL_IN_EPOCH_2 = """
import os, signal, sys
from medtransfer.train.callbacks import HistoryWriter
original = HistoryWriter.on_train_epoch_start
def start(self, trainer, module):
    if trainer.current_epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, trainer, module)
HistoryWriter.on_train_epoch_start = start
from medtransfer.cli import main
sys.argv = ["medtransfer", *sys.argv[1:]]
main()
"""


def cli(*args, script: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-c", script, *map(str, args)] if script else [sys.executable, "-m", "medtransfer.cli", *map(str, args)]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def val_losses(run: Path) -> list[float]:
    with (run / "history.csv").open(newline="") as handle:
        return [float(row["val_loss"]) for row in csv.DictReader(handle)]


# Two images for some patients, as the kill and resume tests of `experiment` use too.
DATA = dict(patients_per_class=8, images_per_patient=(1, 2), val_patients_per_class=2, test_patients_per_class=3)


def test_a_killed_and_resumed_run_reproduces_the_uninterrupted_validation_losses(demo_data, tmp_path):
    data = demo_data(**DATA)
    cache = tmp_path / "cache"
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = cli("train", "--data", data, "--out", whole, "--cache-dir", cache, *ARGS)
    assert done.returncode == 0, done.stderr

    killed = cli("train", "--data", data, "--out", broken, "--cache-dir", cache, *ARGS, script=KILL_IN_EPOCH_2)
    assert killed.returncode == -signal.SIGKILL
    assert len(val_losses(broken)) == 1

    elsewhere = tmp_path / "elsewhere"  # resumed from another working directory
    elsewhere.mkdir()
    resumed = cli("train", "--resume", broken.resolve(), cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr
    expected = val_losses(whole)
    assert len(expected) == 3
    assert val_losses(broken) == pytest.approx(expected, abs=1e-6)


# --- killed inside an epoch, at the points of benchmarks/reliability.py -------------------------------------------

from benchmarks.reliability import KILL_ENV, KILLED_SCRIPT  # noqa: E402

TWO_EPOCHS = [*ARGS[: ARGS.index("--epochs") + 1], "2", *ARGS[ARGS.index("--epochs") + 2 :]]


@pytest.fixture(scope="module")
def uninterrupted(demo_data, tmp_path_factory):
    """(data, cache, val losses) of one uninterrupted two-epoch run, shared by the kill points below."""
    data, work = demo_data(**DATA), tmp_path_factory.mktemp("uninterrupted")
    done = cli("train", "--data", data, "--out", work / "run", "--cache-dir", work / "cache", *TWO_EPOCHS)
    assert done.returncode == 0, done.stderr
    return data, work / "cache", val_losses(work / "run")


@pytest.mark.parametrize("point, epoch", [
    ("before-checkpoint", 1),  # epoch 1's row computed, no checkpoint yet (history.csv was written here: the issue)
    ("validation", 2),
    ("checkpoint-write", 2),  # half of epoch 2's checkpoint on disk under its temporary name
])
def test_a_run_killed_inside_an_epoch_resumes_to_the_uninterrupted_validation_losses(uninterrupted, tmp_path, point,
                                                                                      epoch):
    data, cache, expected = uninterrupted
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]), KILL_ENV: f"{point}:{epoch}:0"}
    killed = subprocess.run([sys.executable, "-c", KILLED_SCRIPT, "train", "--data", str(data), "--out", str(run),
                             "--cache-dir", str(cache), *TWO_EPOCHS], env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(val_losses(run) if (run / "history.csv").is_file() else []) == epoch - 1  # only committed epochs
    resumed = cli("train", "--resume", run)
    assert resumed.returncode == 0, resumed.stderr
    assert len(expected) == 2 and val_losses(run) == pytest.approx(expected, abs=1e-6)
    assert not list((run / "checkpoints").glob(".*.tmp*"))  # the interrupted write's temporary file is gone
