"""benchmarks/time_to_quality.py: a smoke run on tiny synthetic data (not timed)."""

from __future__ import annotations

import json

import pytest
import yaml

from benchmarks import time_to_quality

TINY = dict(backbone="resnet18", weights="none", image_size=32, cache_size=40, batch_size=8, bootstrap=20, num_workers=0,
            progress=False, patience=5, precision="32-true", accelerator="cpu", augment=False)


def test_prints_one_json_line_with_both_aucs_the_wall_clock_ratio_and_the_difference(demo_data, tmp_path, capsys):
    data = demo_data(test_patients_per_class=2, image_size=40)
    external = demo_data("external", patients_per_class=2, val_patients_per_class=1, test_patients_per_class=4,
                         image_size=40, seed=3)
    main, fast = tmp_path / "main.yaml", tmp_path / "fast.yaml"
    main.write_text(yaml.safe_dump({**TINY, "epochs": 1, "ensemble": 2}))
    fast.write_text(yaml.safe_dump({**TINY, "epochs": 1, "strategy": "linear-probe"}))
    time_to_quality.main(["--data", str(data), "--external", str(external), "--main", str(main), "--fast", str(fast),
                          "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "50"])
    [line] = capsys.readouterr().out.strip().splitlines()
    result = json.loads(line)
    for name in ("main", "fast"):
        evaluation = json.loads((tmp_path / "out" / f"{name}-external" / "metrics.json").read_text())["test"]
        assert result[name]["external_auc"] == evaluation["auc"]
        assert result[name]["external_auc_ci"] == evaluation["auc_ci"]
        assert result[name]["external_n"] == 8
    assert result["wall_ratio"] == pytest.approx(result["main"]["wall_seconds"] / result["fast"]["wall_seconds"], rel=1e-2)
    assert result["auc_diff"] == pytest.approx(result["main"]["external_auc"] - result["fast"]["external_auc"])
    assert len(result["auc_diff_ci"]) == 2 and 0 < result["p_bootstrap"] <= 1
    members = result["main"]["members"]
    for seed in ("seed-0", "seed-1"):
        evaluation = json.loads((tmp_path / "out" / f"main-{seed}-external" / "metrics.json").read_text())["test"]
        assert members[seed]["external_auc"] == evaluation["auc"]
    paired = members["ensemble_minus_first"]
    assert paired["auc_diff"] == pytest.approx(result["main"]["external_auc"] - members["seed-0"]["external_auc"])
    assert "members" not in result["fast"]
