"""train --ensemble N: members on one split, one ensemble model folder, resume that keeps finished members."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from medtransfer.artifacts import load_model
from medtransfer.config import TrainConfig
from medtransfer.data.synthetic import generate_demo_dataset
from medtransfer.errors import ConfigError
from medtransfer.train.seed_ensemble import check_single_process, member_seeds
from tests.e2e.test_train_predict import FAST, invoke


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("seed-ensemble")
    data = base / "chest_xray"
    generate_demo_dataset(data, patients_per_class=6, images_per_patient=(1, 1), val_patients_per_class=3,
                          test_patients_per_class=4, image_size=48, seed=0)
    out = base / "ens"
    assert invoke(["train", "--data", data, "--out", out, "--ensemble", "2", "--seed", "3", "--epochs", "1",
                   "--precision", "32-true", "--cache-dir", base / "cache", *FAST]) == 0
    return out


def test_members_train_on_one_split_and_the_folder_is_one_ensemble_model(ensemble_run):
    members = [ensemble_run / "members" / "seed-3", ensemble_run / "members" / "seed-4"]
    for run in members:
        assert (run / "metrics.json").is_file() and (run / "report.html").is_file()
    assert (members[0] / "split.csv").read_text() == (members[1] / "split.csv").read_text()
    assert (ensemble_run / "split.csv").read_text() == (members[0] / "split.csv").read_text()
    assert yaml.safe_load((ensemble_run / "config.yaml").read_text())["ensemble"] == 2  # --resume reads it
    metrics = json.loads((ensemble_run / "metrics.json").read_text())
    assert [m["seed"] for m in metrics["ensemble"]["members"]] == [3, 4]
    member_seconds = [json.loads((run / "metrics.json").read_text())["train_seconds"] for run in members]
    assert metrics["train_seconds"] == pytest.approx(sum(member_seconds))
    saved, loaded = load_model(ensemble_run), [load_model(run) for run in members]
    batch = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(saved.network(batch), torch.stack([m.network(batch) for m in loaded]).mean(0),
                                   rtol=0, atol=1e-5)


def test_resume_keeps_finished_members_and_completes_the_rest(ensemble_run, tmp_path):
    run = tmp_path / "ens"
    shutil.copytree(ensemble_run, run)
    # as if killed while the second member evaluated: it and the ensemble are unfinished
    for name in ("metrics.json", "report.html"):
        (run / name).unlink()
        (run / "members" / "seed-4" / name).unlink()
    shutil.rmtree(run / "model")
    kept = (run / "members" / "seed-3" / "metrics.json").stat().st_mtime_ns
    assert invoke(["train", "--resume", run, "--no-progress"]) == 0
    assert (run / "members" / "seed-3" / "metrics.json").stat().st_mtime_ns == kept
    assert (run / "members" / "seed-4" / "metrics.json").is_file()
    assert json.loads((run / "model" / "model.json").read_text())["members"] == ["weights.safetensors",
                                                                                 "member_2.safetensors"]
    assert (run / "report.html").is_file()


def test_member_seeds_count_up_from_the_seed():
    assert member_seeds(TrainConfig(seed=5, ensemble=3)) == [5, 6, 7]
    assert member_seeds(TrainConfig()) == [0]


@pytest.mark.parametrize("settings", [{"devices": "2"}, {"num_nodes": 2}, {"distributed": "ddp"}])
def test_several_processes_per_member_are_refused_in_one_line(settings):
    with pytest.raises(ConfigError, match=r"^--ensemble 3: members train one after another in one process") as error:
        check_single_process(TrainConfig(ensemble=3, **settings))
    assert "medtransfer ensemble" in str(error.value) and "\n" not in str(error.value)


def test_an_ensemble_of_less_than_one_is_refused(capsys):
    assert invoke(["train", "--data", "x", "--out", "y", "--ensemble", "0"]) == 1
    assert "--ensemble: got 0; expected 1 (one model) or the number of seed-ensemble members" in capsys.readouterr().err


def test_a_refused_setting_leaves_no_run_folder_behind(tmp_path, capsys):
    out = tmp_path / "ens"
    assert invoke(["train", "--data", tmp_path, "--out", out, "--ensemble", "2", "--backbone", "nosuch"]) == 1
    assert "--backbone: unknown backbone 'nosuch'" in capsys.readouterr().err
    assert not out.exists()  # a second try with --out ens is not told the folder holds a run
