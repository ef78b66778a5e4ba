"""`medtransfer experiment` end to end: a 2 x 2 grid on synthetic data with an external set.

The first process is killed (SIGKILL) in the first cell's second epoch; the second resumes
that cell and runs the rest; the third skips every finished cell. The summary's numbers are
checked against each cell's own metrics.json and scipy.
"""

from __future__ import annotations

import json
import signal

import pytest
import yaml
from scipy import stats

from tests.e2e.test_resume import DATA, KILL_IN_EPOCH_2, cli  # the same data, SIGKILL at the start of epoch 2 and CLI runner

SETTINGS = {
    "backbone": "resnet18", "weights": "none", "image_size": 32, "cache_size": 40, "batch_size": 8, "bootstrap": 20,
    "num_workers": 0, "progress": False, "epochs": 2, "patience": 5, "precision": "32-true", "accelerator": "cpu",
    "augment": False, "lr": 0.003,
    "grid": {"strategy": ["finetune", "linear-probe"], "seed": [0, 1]},
}
CELLS = ["strategy=finetune__seed=0", "strategy=finetune__seed=1", "strategy=linear-probe__seed=0",
         "strategy=linear-probe__seed=1"]


def test_a_grid_runs_on_one_split_resumes_skips_and_compares(demo_data, tmp_path):
    data = demo_data(**DATA)
    external = demo_data("external", patients_per_class=2, val_patients_per_class=1, test_patients_per_class=4, seed=7)
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(SETTINGS, sort_keys=False))
    exp = tmp_path / "exp"
    args = ["experiment", "--config", config, "--data", data, "--external", external, "--out", exp,
            "--cache-dir", tmp_path / "cache", "--bootstrap", "200"]

    killed = cli(*args, script=KILL_IN_EPOCH_2)
    assert killed.returncode == -signal.SIGKILL
    first = exp / "cells" / CELLS[0]
    assert (first / "config.yaml").is_file() and not (first / "metrics.json").exists()

    done = cli(*args)
    assert done.returncode == 0, done.stderr
    assert f"Cell {CELLS[0]} (resuming)" in done.stdout
    summary = json.loads((exp / "summary.json").read_text())
    assert [(c["name"], c["status"]) for c in summary["cells"]] == [
        (CELLS[0], "resumed"), *((name, "trained") for name in CELLS[1:])]
    assert len((first / "history.csv").read_text().splitlines()) == 1 + 2  # both epochs, the first one once

    # one split for every cell
    split = sorted((exp / "split.csv").read_text().splitlines())
    assert all(sorted((exp / "cells" / name / "split.csv").read_text().splitlines()) == split for name in CELLS)

    metrics = {name: json.loads((exp / "cells" / name / "metrics.json").read_text()) for name in CELLS}
    external_auc = {name: json.loads((exp / "cells" / name / "external" / "external" / "metrics.json").read_text())["test"]["auc"]
                    for name in CELLS}
    test_auc = {name: m["test"]["auc"] for name, m in metrics.items()}
    finetune = summary["configurations"]["strategy=finetune"]
    assert finetune["runs"] == 2
    assert finetune["sets"]["test"]["auc"]["mean"] == pytest.approx((test_auc[CELLS[0]] + test_auc[CELLS[1]]) / 2)
    assert finetune["train_seconds"]["max"] == max(metrics[n]["train_seconds"] for n in CELLS[:2])

    comparisons = {c["set"]: c for c in summary["comparisons"]}
    assert set(comparisons) == {"test", "external"}
    for eval_set, auc in (("test", test_auc), ("external", external_auc)):
        comparison = comparisons[eval_set]
        assert (comparison["a"], comparison["b"]) == ("strategy=finetune", "strategy=linear-probe")
        diffs = [auc[CELLS[s]] - auc[CELLS[2 + s]] for s in (0, 1)]
        assert [t["auc_diff"] for t in comparison["per_seed"]] == pytest.approx(diffs)
        assert all(0 < t["p_bootstrap"] <= 1 and t["bootstrap_unit"] == "patient" for t in comparison["per_seed"])
        assert comparison["across_seeds"]["mean"] == pytest.approx(sum(diffs) / 2)
        if diffs[0] != diffs[1]:
            expected = stats.ttest_rel([auc[CELLS[0]], auc[CELLS[1]]], [auc[CELLS[2]], auc[CELLS[3]]]).pvalue
            assert comparison["across_seeds"]["p_paired_t"] == pytest.approx(expected)
    markdown = (exp / "summary.md").read_text()
    assert "## Paired comparisons" in markdown and "## external: mean" in markdown
    assert "data:image/png;base64," in (exp / "summary.html").read_text()
    assert (exp / "summary_auc.png").stat().st_size > 1000

    stamps = {name: (exp / "cells" / name / "metrics.json").stat().st_mtime_ns for name in CELLS}
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert all(f"Cell {name}: finished earlier, skipped" in again.stdout for name in CELLS)
    assert stamps == {name: (exp / "cells" / name / "metrics.json").stat().st_mtime_ns for name in CELLS}


def test_a_bad_grid_fails_with_one_line_before_anything_runs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({"weights": "none", "accelerator": "cpu", "grid": {"strategy": ["finetune", "nope"]}}, sort_keys=False))
    result = cli("experiment", "--config", config, "--data", data, "--out", tmp_path / "exp")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: --config {config}: grid cell strategy=nope: --strategy: got 'nope'; choose one of finetune, freeze, "
        "linear-probe, lp-ft, gradual"
    )
    assert not (tmp_path / "exp").exists()


def test_variants_run_in_parallel_processes_on_the_one_split(demo_data, tmp_path):
    data = demo_data(**DATA)
    settings = {k: v for k, v in SETTINGS.items() if k != "grid"}
    settings["variants"] = {"baseline": {}, "probe": {"strategy": "linear-probe"}}
    config = tmp_path / "variants.yaml"
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    exp = tmp_path / "exp"
    done = cli("experiment", "--config", config, "--data", data, "--out", exp, "--cache-dir", tmp_path / "cache",
               "--bootstrap", "50", "--jobs", "2")
    assert done.returncode == 0, done.stderr
    summary = json.loads((exp / "summary.json").read_text())
    assert [(c["name"], c["status"]) for c in summary["cells"]] == [("variant=baseline", "trained"),
                                                                    ("variant=probe", "trained")]
    strategies = [yaml.safe_load((exp / "cells" / n / "config.yaml").read_text())["strategy"]
                  for n in ("variant=baseline", "variant=probe")]
    assert strategies == ["finetune", "linear-probe"]
    assert all((exp / "cells" / f"{n}.log").read_text() for n in ("variant=baseline", "variant=probe"))
    split = sorted((exp / "split.csv").read_text().splitlines())
    assert all(sorted((exp / "cells" / n / "split.csv").read_text().splitlines()) == split
               for n in ("variant=baseline", "variant=probe"))
    assert len(summary["comparisons"]) >= 1
    assert summary["variants"] == {"baseline": {}, "probe": {"strategy": "linear-probe"}}
    assert "variants: {\"baseline\": {}" in (exp / "summary.md").read_text()


def test_a_variant_that_sets_a_split_setting_is_refused(tmp_path):
    settings = {k: v for k, v in SETTINGS.items() if k != "grid"}
    settings["variants"] = {"other": {"val_fraction": 0.3}}
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    done = cli("experiment", "--config", config, "--data", tmp_path, "--out", tmp_path / "exp")
    assert done.returncode == 1
    assert done.stderr.strip().endswith("variant other: val_fraction cannot vary (every cell uses the experiment's one "
                                        "split and cache); set it once outside variants:")
