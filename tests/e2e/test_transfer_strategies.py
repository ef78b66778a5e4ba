"""Each transfer strategy, head and weight averaging from the command line: 2 epochs, then reloaded for predict.

The reloaded model (artifacts.load_model, i.e. model.json + safetensors) must give the
probabilities that evaluation wrote to predictions_test.csv.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from medtransfer.artifacts import load_model
from medtransfer.predict import predict_files
from tests.e2e.test_train_predict import FAST, invoke

CASES = {
    "lp-ft": ["--strategy", "lp-ft", "--lp-epochs", "2", "--head", "dwconv", "--wise-ft", "--weight-averaging", "swa"],
    "gradual": ["--strategy", "gradual", "--head", "mlp", "--lr-decay", "0.7", "--weight-averaging", "ema",
                "--set", "ema_decay=0.9"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_strategy_trains_from_the_cli_and_reloads_for_predict(case, demo_data, tmp_path):
    run = tmp_path / case
    code = invoke(["train", "--data", demo_data(), "--out", run, "--cache-dir", tmp_path / "cache", "--epochs", "2",
                   *CASES[case], *FAST])
    assert code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    info = json.loads((run / "model" / "model.json").read_text())
    head = CASES[case][CASES[case].index("--head") + 1]
    assert metrics["head"] == info["head"] == head and metrics["params"]["head"] > 1_026
    if case == "lp-ft":
        assert (run / "history_lp.csv").is_file()
        assert metrics["wise_ft"]["alpha"] in metrics["wise_ft"]["grid"] and metrics["wise_ft"]["criterion"] == "val_loss"
        assert info["wise_ft"] == metrics["wise_ft"]
    saved = load_model(run)
    with (run / "predictions_test.csv").open(newline="") as handle:
        expected = {r["path"]: float(r["prob_PNEUMONIA"]) for r in csv.DictReader(handle)}
    rows = predict_files(saved, [Path(p) for p in expected], accelerator="cpu")
    assert {r["path"]: r["prob_PNEUMONIA"] for r in rows} == pytest.approx(expected, abs=1e-3)
