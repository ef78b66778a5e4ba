"""EXPERIMENT.yaml -> named, validated cells; a bad grid is one ConfigError line."""

from __future__ import annotations

import pytest
import yaml

from medtransfer.errors import ConfigError
from medtransfer.experiment.grid import cell_name, read_experiment, with_split


def write(tmp_path, values) -> str:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"weights": "none", "accelerator": "cpu", **values}, sort_keys=False))
    return str(path)


def test_the_grid_expands_into_the_cartesian_product_in_yaml_order(tmp_path):
    path = write(tmp_path, {"epochs": 3, "val_fraction": 0.3, "grid": {"strategy": ["finetune", "linear-probe"], "seed": [0, 1]}})
    plan = read_experiment(path, data="somewhere", cache_dir=str(tmp_path / "cache"))
    assert [c.name for c in plan.cells] == ["strategy=finetune__seed=0", "strategy=finetune__seed=1",
                                            "strategy=linear-probe__seed=0", "strategy=linear-probe__seed=1"]
    assert plan.configurations == ["strategy=finetune", "strategy=linear-probe"]
    assert [(c.config.strategy, c.config.seed, c.config.epochs) for c in plan.cells] == [
        ("finetune", 0, 3), ("finetune", 1, 3), ("linear-probe", 0, 3), ("linear-probe", 1, 3)]
    assert plan.base.val_fraction == 0.3  # draws the split ...
    assert all(c.config.val_fraction == 0.2 for c in plan.cells)  # ... which the cells then read as it is
    cell = with_split(plan.cells[0], tmp_path / "split.csv")
    assert cell.config.split_file == str((tmp_path / "split.csv").resolve())


def test_cell_names_are_filesystem_safe():
    assert cell_name({"weights": "/models/my weights.pth", "crop_scale": [0.5, 1.0], "lr": 0.001}) == (
        "weights=my-weights__crop_scale=0.5-1.0__lr=0.001")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"epochs": 1}, "needs grid: (or variants:), a mapping of setting: [values]"),
        ({"grid": {"stratgy": ["finetune"]}}, "grid: unknown setting 'stratgy'; did you mean 'strategy'?"),
        ({"grid": {"seed": []}}, "grid: seed got []; expected a non-empty list of values"),
        ({"grid": {"seed": 3}}, "grid: seed got 3; expected a non-empty list of values"),
        ({"grid": {"seed": [1, 1]}}, "grid: seed lists 1 twice"),
        ({"grid": {"test_fraction": [0.1, 0.2]}}, "grid: test_fraction cannot vary"),
        ({"seed": 2, "grid": {"seed": [0, 1]}}, "seed is set both outside and inside grid:"),
        ({"grid": {"lr": [0.1, "fast"]}}, "grid cell lr=fast: setting 'lr' got 'fast'; expected a number"),
        ({"grid": {"strategy": ["finetune", "nope"]}}, "grid cell strategy=nope: --strategy: got 'nope'"),
        ({"grid": {"freeze_children": [1]}}, "grid cell freeze_children=1: --freeze-children: got 1, but only --strategy freeze"),
    ],
)
def test_a_bad_grid_is_refused_naming_the_file_and_the_setting(tmp_path, values, message):
    path = write(tmp_path, values)
    with pytest.raises(ConfigError) as error:
        read_experiment(path, data="somewhere", cache_dir=str(tmp_path))
    assert str(error.value).startswith(f"--config {path}: ")
    assert message in str(error.value)
