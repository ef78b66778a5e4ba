"""Every YAML under configs/ loads and passes the checks `train` and `experiment` run before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtransfer.config import TrainConfig
from medtransfer.experiment.grid import read_experiment
from medtransfer.train.validate import validate_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TRAIN = sorted(CONFIGS.glob("*.yaml"))
EXPERIMENTS = sorted((CONFIGS / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", TRAIN, ids=[p.name for p in TRAIN])
def test_training_configs_validate(path, tmp_path):
    validate_config(TrainConfig.from_sources(path, {"data": str(tmp_path)}))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_experiment_configs_expand_into_valid_cells(path, tmp_path):
    plan = read_experiment(path, data=str(tmp_path))
    assert len(plan.cells) >= 2
    for cell in plan.cells:
        validate_config(cell.config)


def test_the_main_recipe_is_a_seed_ensemble_and_the_fast_one_is_its_first_member():
    main = TrainConfig.from_sources(CONFIGS / "chest_xray_pneumonia.yaml")
    fast = TrainConfig.from_sources(CONFIGS / "chest_xray_pneumonia_fast.yaml")
    assert main.ensemble == 3 and fast.ensemble == 1
    assert {**main.to_dict(), "ensemble": 1} == fast.to_dict()
