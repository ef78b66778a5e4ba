"""`experiment` with `folds: K`: every cell a cross-validation on the same folds, paired out-of-fold tests, and the
best configuration by out-of-fold AUC labelled as chosen on out-of-fold results."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from tests.e2e.test_resume import DATA, cli

SETTINGS = {
    "backbone": "resnet18", "weights": "none", "image_size": 32, "cache_size": 40, "batch_size": 8, "bootstrap": 20,
    "num_workers": 0, "progress": False, "epochs": 1, "patience": 5, "precision": "32-true", "accelerator": "cpu",
    "augment": "none", "folds": 2, "grid": {"lr": [0.003, 0.01]},
}
CELLS = ["lr=0.003", "lr=0.01"]


def folds(path) -> dict[str, str]:
    with path.open(newline="") as handle:
        return {r["path"]: r["fold"] for r in csv.DictReader(handle)}


def test_cells_cross_validate_on_one_set_of_folds_and_are_compared_out_of_fold(demo_data, tmp_path):
    data = demo_data(**DATA)
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(SETTINGS, sort_keys=False))
    exp = tmp_path / "exp"
    done = cli("experiment", "--config", config, "--data", data, "--out", exp, "--cache-dir", tmp_path / "cache",
               "--bootstrap", "50")
    assert done.returncode == 0, done.stderr[-3000:]
    shared = folds(exp / "split.csv")
    assert set(shared.values()) == {"1", "2", ""}
    for name in CELLS:
        assert folds(exp / "cells" / name / "split.csv") == shared  # the same folds in every cell
        assert (exp / "cells" / name / "folds" / "fold-2" / "report.html").is_file()
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["folds"] == 2 and [c["status"] for c in summary["cells"]] == ["trained", "trained"]
    oof = [c for c in summary["comparisons"] if c["set"] == "oof"]
    assert len(oof) == 1 and "auc_diff" in oof[0]["per_seed"][0], oof
    aucs = {name: json.loads((exp / "cells" / name / "metrics.json").read_text())["val"]["auc"] for name in CELLS}
    assert oof[0]["per_seed"][0]["auc_diff"] == pytest.approx(aucs["lr=0.003"] - aucs["lr=0.01"], abs=1e-9)
    chosen = summary["selection"]
    assert chosen["configuration"] == max(aucs, key=aucs.get) and chosen["chosen_on"] == "out-of-fold"
    markdown = (exp / "summary.md").read_text()
    assert "Best by out-of-fold results" in markdown and "oof (pooled out-of-fold predictions" in markdown
