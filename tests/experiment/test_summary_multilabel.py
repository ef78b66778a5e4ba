"""The experiment summary of multi-label cells: macro AUC as the headline, paired macro AUC tests, no crash
on metrics.json without positive_class or threshold."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from medtransfer.config import TrainConfig
from medtransfer.experiment.grid import Cell, ExperimentPlan
from medtransfer.experiment.summary import CELLS, CellOutcome, cell_results, write_summary
from tests.evaluation.multilabel_fixtures import cohort, write_run_folder


def _plan(tmp_path) -> tuple[ExperimentPlan, dict[str, CellOutcome]]:
    paths, targets, patients, good, noisy = cohort(n_patients=20)
    base = TrainConfig(data=str(tmp_path / "data.csv"))
    cells = []
    for name, logits in (("head=linear", good), ("head=mlp", noisy)):
        write_run_folder(tmp_path / "exp" / CELLS / f"{name}_seed=0", paths, targets, patients, logits, bootstrap=50)
        cells.append(Cell(f"{name}_seed=0", {"head": name.split("=")[1], "seed": 0}, base, name))
    return ExperimentPlan(base, {"head": ["linear", "mlp"], "seed": [0]}, cells), {
        c.name: CellOutcome(c.name, "trained", None) for c in cells}


def test_a_multi_label_cell_reads_macro_auc_and_mean_ece(tmp_path):
    plan, _ = _plan(tmp_path)
    folder = tmp_path / "exp" / CELLS / plan.cells[0].name
    test = json.loads((folder / "metrics.json").read_text())["test"]
    result = cell_results(folder, [])
    assert "positive_class" not in json.loads((folder / "metrics.json").read_text())
    assert result["task"] == "multi-label"
    block = result["sets"]["test"]
    assert block["auc"] == test["macro_auc"] and list(block["auc_ci"]) == pytest.approx(test["macro_auc_ci"])
    assert block["ece"] == test["calibration"]["ece_after_mean"]
    assert block["sensitivity"] == test["sensitivity"]


def test_the_summary_says_macro_auc_and_tests_the_macro_difference(tmp_path):
    plan, outcomes = _plan(tmp_path)
    summary, files = write_summary(plan, tmp_path / "exp", outcomes, [], bootstrap=100, console=Console(quiet=True))
    assert summary["task"] == "multi-label" and summary["headline"] == "macro AUC"
    comparison = next(c for c in summary["comparisons"] if c["set"] == "test")
    per_seed = comparison["per_seed"][0]
    assert "error" not in per_seed and per_seed["auc_diff"] > 0 and per_seed["p_delong"] is None
    assert per_seed["bootstrap_unit"] == "patient"
    markdown = (tmp_path / "exp" / "summary.md").read_text()
    assert "| configuration | runs | macro AUC | sensitivity (macro) | specificity (macro) | ECE (mean over findings) |" in markdown
    assert "Paired comparisons: macro AUC(a) - macro AUC(b)" in markdown
    assert "macro AUC per configuration" in (tmp_path / "exp" / "summary.html").read_text()
    assert all(path.exists() for path in files)
