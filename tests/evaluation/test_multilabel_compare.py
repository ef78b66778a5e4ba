"""`compare` with multi-label folders: paired tests per finding (patient bootstrap, DeLong) and of the macro AUC,
against scikit-learn and the single-label tests; a run against itself gives 0 and p = 1."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medtransfer.errors import DataError
from medtransfer.evaluation import resampling
from medtransfer.evaluation.compare import compare_runs
from medtransfer.evaluation.multilabel_compare import macro_paired_bootstrap
from medtransfer.task import Task
from tests.evaluation.multilabel_fixtures import FINDINGS, cohort, write_run_folder


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


@pytest.fixture
def two_runs(tmp_path):
    paths, targets, patients, good, noisy = cohort()
    a = write_run_folder(tmp_path / "good", paths, targets, patients, good, bootstrap=100)
    b = write_run_folder(tmp_path / "noisy", paths, targets, patients, noisy, bootstrap=100)
    return a, b, (paths, targets, patients, good, noisy)


def test_a_run_against_itself_differs_by_zero_with_p_one(two_runs):
    a, _, _ = two_runs
    result = compare_runs([a, a], n_resamples=300)
    t = result.tests[0]
    assert result.task == "multi-label" and result.findings == list(FINDINGS)
    assert t["auc_diff"] == 0.0 and t["ci"] == [0.0, 0.0] and t["p_bootstrap"] == 1.0
    for finding in FINDINGS:
        e = t["findings"][finding]
        assert e["auc_diff"] == 0.0 and e["p_bootstrap"] == 1.0 and e["p_delong"] == 1.0


def test_per_finding_and_macro_figures_match_sklearn_and_the_single_label_tests(two_runs):
    a, b, (_, targets, patients, good, noisy) = two_runs
    result = compare_runs([a, b], n_resamples=500, seed=3)
    t = result.tests[0]
    aucs_a, aucs_b = [], []
    for k, finding in enumerate(FINDINGS):
        known = ~np.isnan(targets[:, k])
        y = targets[known, k].astype(int)
        pa, pb = _sigmoid(good[known, k]), _sigmoid(noisy[known, k])
        e = t["findings"][finding]
        assert e["auc_a"] == pytest.approx(roc_auc_score(y, pa), abs=1e-12)
        assert e["auc_b"] == pytest.approx(roc_auc_score(y, pb), abs=1e-12)
        groups = [p for p, keep in zip(patients, known) if keep]
        boot = resampling.paired_bootstrap_auc_test(y, pa, pb, groups=groups, n_resamples=500, seed=3)
        assert e["ci"] == pytest.approx(boot["ci"]) and e["p_bootstrap"] == pytest.approx(boot["p_value"])
        assert e["p_delong"] == pytest.approx(resampling.delong_test(y, pa, pb)["p_value"])
        assert e["n_images"] == int(known.sum()) and e["n_patients"] == len(set(groups))
        aucs_a.append(e["auc_a"])
        aucs_b.append(e["auc_b"])
    assert t["auc_a"] == pytest.approx(np.mean(aucs_a)) and t["auc_b"] == pytest.approx(np.mean(aucs_b))
    assert t["auc_diff"] > 0 and t["ci"][0] <= t["auc_diff"] <= t["ci"][1] and t["p_delong"] is None
    assert t["bootstrap_unit"] == "patient" and t["n_patients"] == 40 and t["n_images"] == 120
    swapped = compare_runs([b, a], n_resamples=500, seed=3).tests[0]
    assert swapped["auc_diff"] == pytest.approx(-t["auc_diff"])
    assert swapped["ci"] == pytest.approx([-t["ci"][1], -t["ci"][0]])


def test_the_macro_bootstrap_of_one_finding_is_its_paired_test():
    rng = np.random.default_rng(5)
    y = (rng.random(90) < 0.4).astype(float)
    y[rng.random(90) < 0.1] = np.nan
    pa, pb = rng.random(90) + 0.3 * np.nan_to_num(y), rng.random(90)
    groups = [f"P{i // 3}" for i in range(90)]
    macro = macro_paired_bootstrap(y[:, None], pa[:, None], pb[:, None], [0], groups=groups, n_resamples=200, seed=1)
    known = ~np.isnan(y)
    single = resampling.paired_bootstrap_auc_test(y[known].astype(int), pa[known], pb[known],
                                                  groups=[g for g, k in zip(groups, known) if k], n_resamples=200, seed=1)
    assert macro["auc_diff"] == pytest.approx(single["auc_diff"])
    assert macro["ci"] == pytest.approx(single["ci"]) and macro["p_bootstrap"] == pytest.approx(single["p_value"])


def test_rows_are_matched_by_path_and_images_only_one_run_predicted_are_left_out(two_runs, tmp_path):
    a, _, (paths, targets, patients, good, _) = two_runs
    order = np.random.default_rng(1).permutation(len(paths))[:-6]  # shuffled, six images fewer
    c = write_run_folder(tmp_path / "subset", [paths[i] for i in order], targets[order], [patients[i] for i in order], good[order])
    t = compare_runs([a, c], n_resamples=200).tests[0]
    assert t["n_images"] == len(paths) - 6 and t["n_only_a"] == 6 and t["n_only_b"] == 0
    assert t["auc_diff"] == 0.0 and t["p_bootstrap"] == 1.0


def test_disagreeing_labels_mixed_tasks_and_different_findings_are_refused(two_runs, tmp_path):
    a, _, (paths, targets, patients, good, _) = two_runs
    flipped = targets.copy()
    flipped[0, 0] = 1.0 - np.nan_to_num(flipped[0, 0])
    c = write_run_folder(tmp_path / "flipped", paths, flipped, patients, good)
    with pytest.raises(DataError, match="different labels"):
        compare_runs([a, c], n_resamples=50)
    other = write_run_folder(tmp_path / "other", paths, targets[:, :2], patients, good[:, :2], findings=("Effusion", "Edema"))
    with pytest.raises(DataError, match="different findings"):
        compare_runs([a, other], n_resamples=50)
    single = tmp_path / "single"
    single.mkdir()
    (single / "metrics.json").write_text(json.dumps({"positive_class": "B", "threshold": 0.5, "test": {"n": 2, "auc": 0.5}}))
    with open(single / "predictions_test.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label", "prob_A", "prob_B", "pred"], [paths[0], "A", 0.6, 0.4, "A"]])
    with pytest.raises(DataError, match="multi-label with single-label"):
        compare_runs([a, single], n_resamples=50)


def test_the_table_shows_macro_micro_and_each_finding_and_the_files_are_written(two_runs, tmp_path):
    a, b, _ = two_runs
    result = compare_runs([a, b], out=tmp_path / "cmp", n_resamples=100)
    labels = [label for label, _ in result.rows]
    assert labels[:2] == ["Macro AUC", "Micro AUC"]
    assert all(f"{f}: AUC" in labels for f in FINDINGS)
    macro = json.loads((a / "metrics.json").read_text())["test"]["macro_auc"]
    assert result.rows[0][1][0].startswith(f"{macro:.3f}")
    assert "macro AUC (3 findings)" in result.markdown and "Nodule" in result.html
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["task"] == "multi-label" and saved["positive_class"] is None
    assert set(saved["tests"][0]["findings"]) == set(FINDINGS)
    assert Task("multi-label", FINDINGS).num_outputs == 3
