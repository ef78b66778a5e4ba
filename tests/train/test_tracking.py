"""--logger: each logger writes its files under RUN/logs/, with the settings and per-epoch losses and AUC."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from rich.console import Console

from medtransfer.config import TrainConfig
from medtransfer.errors import ConfigError
from medtransfer.train.callbacks import read_history
from medtransfer.train.pipeline import run_training
from medtransfer.train.tracking import check_logger, epoch_auc
from medtransfer.train.validate import validate_config

TINY = dict(backbone="resnet18", weights="none", image_size=32, cache_size=40, batch_size=8, bootstrap=0, num_workers=0,
            progress=False, epochs=2, patience=5, precision="32-true", accelerator="cpu")


@pytest.fixture(scope="module")
def data(demo_data) -> Path:
    return demo_data(test_patients_per_class=2, image_size=40)


def train(data: Path, out: Path, **settings) -> list[dict]:
    config = TrainConfig(data=str(data), cache_dir=str(out.parent / "cache"), **{**TINY, **settings})
    run_training(config, out, console=Console(quiet=True))
    return read_history(out / "history.csv")


def test_csv_logger_writes_settings_and_epochs_next_to_history(data, tmp_path):
    history = train(data, tmp_path / "run", lr=0.002)
    logs = tmp_path / "run" / "logs" / "csv"
    assert "lr: 0.002" in (logs / "hparams.yaml").read_text()
    with (logs / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    val = [r for r in rows if r["val/loss"]]
    assert [float(r["val/loss"]) for r in val] == pytest.approx([r["val_loss"] for r in history], abs=1e-6)
    assert all(0 <= float(r["val/auc"]) <= 1 for r in val)
    assert len([r for r in rows if r["train/loss_epoch"]]) == 2


def test_tensorboard_logger_writes_a_readable_event_file(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = train(data, tmp_path / "run", logger="tensorboard")
    folder = tmp_path / "run" / "logs" / "tensorboard"
    assert list(folder.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(folder))
    events.Reload()
    assert {"val/loss", "val/auc", "train/loss_epoch"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("val/loss")] == pytest.approx([r["val_loss"] for r in history], abs=1e-6)


def test_mlflow_logger_keeps_a_local_file_store_in_the_run_folder(data, tmp_path):
    history = train(data, tmp_path / "run", logger="mlflow")
    store = tmp_path / "run" / "logs" / "mlruns"
    run_id = (tmp_path / "run" / "logs" / "mlflow_run_id.txt").read_text().strip()
    [run] = [p for p in store.glob(f"*/{run_id}") if p.is_dir()]
    losses = [float(line.split()[1]) for line in (run / "metrics" / "val" / "loss").read_text().splitlines()]
    assert losses == pytest.approx([r["val_loss"] for r in history], abs=1e-6)
    assert (run / "metrics" / "val" / "auc").is_file()
    assert (run / "params" / "backbone").read_text() == "resnet18"


def test_the_feature_probe_logs_its_epochs_too(data, tmp_path):
    history = train(data, tmp_path / "run", strategy="linear-probe", augment=False, epochs=3)
    with (tmp_path / "run" / "logs" / "csv" / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["val/loss"]) for r in rows] == pytest.approx([r["val_loss"] for r in history])


def test_an_unknown_logger_is_refused_before_the_run():
    with pytest.raises(ConfigError, match=r"^--logger: got 'wandb'; choose one of csv, tensorboard, mlflow$"):
        validate_config(TrainConfig(logger="wandb"))
    check_logger("csv")


def test_epoch_auc_is_the_binary_auc_and_none_for_one_class():
    import numpy as np

    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.2, 0.8]])
    assert epoch_auc(np.array([0, 1, 0, 1]), probs) == 1.0
    assert epoch_auc(np.array([0, 1, 1, 0]), probs) == 0.5
    assert epoch_auc(np.array([1, 1, 1, 1]), probs) is None
