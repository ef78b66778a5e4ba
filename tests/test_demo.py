"""Tests for the demo's run reuse and comparison table (medtransfer.demo); training itself is tested end to end."""

from __future__ import annotations

import io
import json

from rich.console import Console

from medtransfer.demo import SCENARIOS, comparison_table, run_demo
from medtransfer.rundir import RunMetrics


def _metrics(auc: float, trainable: int) -> dict:
    test = {"n": 60, "auc": auc, "accuracy": 0.9, "sensitivity": 0.95, "specificity": 0.85, "f1": 0.91,
            "confusion_matrix": [[17, 3], [2, 38]], "auc_ci": [auc - 0.05, auc + 0.02], "confidence": 0.95}
    return {"backbone": "efficientnet_lite0", "params": {"total": 3_373_474, "trainable": trainable}, "epochs_run": 6,
            "best_epoch": 4, "train_seconds": 81.6, "positive_class": "PNEUMONIA", "threshold": 0.4123, "val": test, "test": test}


def _render(table) -> str:
    out = io.StringIO()
    Console(file=out, width=200).print(table)
    return out.getvalue()


def test_comparison_table_shows_each_run_with_intervals():
    results = {"finetune": RunMetrics.from_dict(_metrics(0.93, 3_373_474)), "freeze-4": RunMetrics.from_dict(_metrics(0.9, 3_372_000))}
    text = _render(comparison_table(results))
    assert "finetune" in text and "freeze-4" in text
    assert "0.930 (95% CI 0.880\u20130.950)" in text and "0.900 (95% CI 0.850\u20130.920)" in text
    assert "3,373,474 / 3,373,474" in text and "6 (4)" in text and "0.412" in text and " 82 " in text


def test_finished_scenarios_are_reused_not_retrained(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "README.txt").write_text("already generated")
    for name in SCENARIOS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(_metrics(0.9, 1_000)))
    out = io.StringIO()
    results = run_demo(tmp_path, console=Console(file=out, width=200))
    assert list(results) == list(SCENARIOS) and all(isinstance(m, RunMetrics) for m in results.values())
    text = out.getvalue()
    assert all(f"{name}: already done" in text for name in SCENARIOS)
    assert f"Report: {tmp_path / 'finetune' / 'report.html'}" in text


def test_demo_runs_draw_layercam_and_stay_valid(tmp_path):
    from medtransfer.demo import demo_config
    from medtransfer.train.validate import validate_config

    for settings in SCENARIOS.values():
        config = demo_config(tmp_path / "data", tmp_path / "cache", epochs=6, **settings)
        validate_config(config)
        assert (config.cam_method, config.image_size) == ("layercam", 160)  # README: pointing game 0.95 vs Grad-CAM's 0.18
