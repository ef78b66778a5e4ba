"""run_cell: a failing cell becomes an outcome with its one-line error; the grid goes on."""

from __future__ import annotations

import pytest
from rich.console import Console

from medtransfer.config import TrainConfig
from medtransfer.errors import ConfigError, DataError
from medtransfer.experiment import runner
from medtransfer.experiment.grid import Cell


def cell() -> Cell:
    return Cell("lr=0.1", {"lr": 0.1}, TrainConfig(data="d", lr=0.1), "lr=0.1")


@pytest.mark.parametrize(
    "error, expected",
    [
        (DataError("--data d: no images\nsecond line"), "--data d: no images"),
        (RuntimeError("CUDA out of memory"), "RuntimeError: CUDA out of memory"),
    ],
)
def test_a_failing_cell_is_reported_in_one_line(tmp_path, monkeypatch, error, expected):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(runner, "train_run", fail)
    outcome = runner.run_cell(cell(), tmp_path / "cell", {}, console=Console(quiet=True))
    assert (outcome.status, outcome.error) == ("failed", expected)


def test_external_sets_get_unique_safe_names(tmp_path):
    for name in ("a/site one", "b/site one"):
        (tmp_path / name).mkdir(parents=True)
    sets = runner.external_sets([tmp_path / "a/site one", tmp_path / "b/site one"])
    assert list(sets) == ["site-one", "site-one-2"]
    with pytest.raises(ConfigError, match=r"^--external .*missing: no such folder or file"):
        runner.external_sets([tmp_path / "missing"])


def test_a_cell_run_with_other_settings_says_it_keeps_them(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "train_run", lambda *args, **kwargs: None)
    monkeypatch.setattr(runner, "resolve_train_config", lambda **kwargs: (None, None))
    folder = tmp_path / "cell"
    folder.mkdir()
    TrainConfig(data="elsewhere", lr=0.01).write_yaml(folder / "config.yaml")
    console = Console(record=True, width=300)
    outcome = runner.run_cell(cell(), folder, {}, console=console)
    assert outcome.status == "resumed"
    assert "keeps the settings it was run with (lr: 0.01 -> 0.1)" in console.export_text()
