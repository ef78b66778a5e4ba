"""benchmarks/adapt.py: one JSON line with each method's figures, paired differences and the label-free verdict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.adapt.conftest import brightness_image, brightness_run


def test_the_benchmark_scores_each_method_on_the_set_and_a_synthetic_prior_shift(tmp_path):
    run = brightness_run(tmp_path / "run")
    for i in range(60):
        bright = i % 3 == 0
        brightness_image(tmp_path / "data" / "test" / ("PNEUMONIA" if bright else "NORMAL") / f"person{i}_virus_{i}.png",
                         bright, seed=500 + i)
    done = subprocess.run(
        [sys.executable, "benchmarks/adapt.py", "--run", str(run), "--data", str(tmp_path / "data"), "--methods", "none,prior,bn",
         "--prevalences", "0.6", "--bootstrap", "50", "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], check=True)
    result = json.loads(done.stdout)
    everything = result["sets"]["all"]
    assert everything["images"] == 60 and abs(everything["prevalence"] - 1 / 3) < 1e-3
    prior = everything["methods"]["prior"]
    assert {"accuracy", "accuracy_ci", "specificity", "ece", "paired_vs_none"} <= set(prior)
    assert prior["paired_vs_none"]["auc"]["diff"] == 0.0  # a prior moves no image's rank
    assert abs(prior["estimated_prevalence"] - 1 / 3) < 0.08
    assert "refused" in everything["methods"]["bn"]  # a pure prevalence shift: AdaBN would confound it, and refuses
    assert everything["label_free_shift"]["kind"] in ("none", "prevalence")  # no appearance shift here
    assert abs(result["sets"]["prevalence_0.6"]["prevalence"] - 0.6) < 0.05
    assert result["best_on_all"]["method"] == "prior"
