"""Aggregates over seeds against numpy and scipy; a failed cell is listed with its error."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from medtransfer.experiment.summary import _paired_t, spread, tables


def test_spread_is_mean_sample_sd_and_range_of_the_finite_values():
    values = [0.8, 0.9, 0.75, None, float("nan")]
    assert spread(values) == pytest.approx(
        {"n": 3, "mean": np.mean([0.8, 0.9, 0.75]), "sd": np.std([0.8, 0.9, 0.75], ddof=1), "min": 0.75, "max": 0.9})
    assert spread([0.7]) == {"n": 1, "mean": 0.7, "sd": None, "min": 0.7, "max": 0.7}
    assert spread([])["n"] == 0


def test_paired_t_matches_scipy_and_needs_two_seeds():
    a, b = [0.81, 0.85, 0.79], [0.78, 0.80, 0.80]
    assert _paired_t(a, b) == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert _paired_t([0.8], [0.7]) is None


def test_a_failed_cell_appears_with_its_error_in_the_tables():
    summary = {
        "cells": [{"name": "lr=1", "configuration": "lr=1", "seed": 0, "status": "failed", "error": "boom"}],
        "configurations": {"lr=1": {"runs": 0, "train_seconds": spread([]),
                                    "sets": {"test": {m: spread([]) for m in ("auc", "sensitivity", "specificity", "ece")}}}},
        "comparisons": [],
    }
    title, header, rows = tables(summary, ["test"])[0]
    assert rows == [["lr=1", "lr=1", "0", "failed", "boom"]]


def _comparison(seeds: list[int], diffs: list[float]) -> dict:
    per_seed = [{"seed": s, "auc_diff": d, "ci": (d - 0.01, d + 0.01), "p_bootstrap": 0.5, "p_delong": 0.5}
                for s, d in zip(seeds, diffs)]
    return {"set": "test", "a": "A", "b": "B", "per_seed": per_seed,
            "across_seeds": {**spread(diffs), "p_paired_t": None if len(diffs) < 2 else 0.2}}


def test_the_across_seeds_row_appears_only_with_two_or_more_seeds():
    base = {"cells": [], "configurations": {}}
    one = tables({**base, "comparisons": [_comparison([0], [0.011])]}, [])[-1][2]
    two = tables({**base, "comparisons": [_comparison([0, 1], [0.011, 0.005])]}, [])[-1][2]
    assert [row[3] for row in one] == ["0"]  # a one-seed "all" row would only repeat seed 0
    assert [row[3] for row in two] == ["0", "1", "all (2)"]
    assert two[-1][4] == "+0.008 ± 0.004 [+0.005, +0.011]" and two[-1][5] == "paired t: 0.200"
