"""Tests for side-by-side run comparison and paired AUC tests (medtransfer.evaluation.compare)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation import metrics, resampling
from medtransfer.evaluation.compare import OUTPUT_FILES, compare_runs

CLASSES = ("NORMAL", "PNEUMONIA")
N_RESAMPLES = 400  # enough for stable p-values on 100 patients, fast on one core


def _cohort(seed: int = 0) -> tuple[list[str], np.ndarray, list[str]]:
    """150 images of 100 patients (50 with two images); the label belongs to the patient."""
    rng = np.random.default_rng(seed)
    patient_label = rng.integers(0, 2, size=100)
    paths, labels, patients = [], [], []
    for p in range(100):
        for k in range(2 if p < 50 else 1):
            paths.append(f"/data/test/{CLASSES[patient_label[p]]}/person{p:03d}_{k}.jpeg")
            labels.append(int(patient_label[p]))
            patients.append(f"person{p:03d}")
    return paths, np.asarray(labels), patients


def _scores(y: np.ndarray, separation: float, seed: int) -> np.ndarray:
    """Probabilities whose ranking is informative in proportion to `separation`."""
    noise = np.random.default_rng(seed).normal(size=y.shape[0])
    return 1.0 / (1.0 + np.exp(-(separation * (2 * y - 1) + noise)))


def _write_folder(
    root: Path,
    name: str,
    cohort: tuple[list[str], np.ndarray, list[str]],
    prob: np.ndarray,
    *,
    kind: str = "run",
    order: np.ndarray | None = None,
    positive: str = "PNEUMONIA",
    backbone: str = "resnet18",
) -> Path:
    """A fake run (metrics.json + predictions_test.csv) or evaluation folder (predictions.csv)."""
    paths, y, patients = cohort
    folder = root / name
    folder.mkdir(parents=True)
    test = metrics.binary_metrics(y, prob, threshold=0.5)
    test.update(resampling.bootstrap_ci(y, prob, threshold=0.5, groups=patients, n_resamples=50))
    test["patients"] = len(set(patients))
    test["calibration"] = {"temperature": 1.2, "ece_before": 0.08, "ece_after": 0.031}
    data = {"backbone": backbone, "strategy": "freeze", "positive_class": positive, "threshold": 0.5, "test": test}
    if kind == "run":
        data["params"] = {"total": 11177538, "trainable": 11168002}
    else:
        data.update(run="runs/x", data="/external", split="test")
    (folder / "metrics.json").write_text(json.dumps(data))
    filename = "predictions_test.csv" if kind == "run" else "predictions.csv"
    rows = range(len(paths)) if order is None else order
    with (folder / filename).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id", "prob_NORMAL", "prob_PNEUMONIA", "pred"])
        for i in rows:
            writer.writerow(
                [paths[i], CLASSES[y[i]], patients[i], repr(1 - float(prob[i])), repr(float(prob[i])), CLASSES[int(prob[i] >= 0.5)]]
            )
    return folder


@pytest.fixture
def cohort():
    return _cohort()


@pytest.fixture
def good_and_noisy(tmp_path, cohort):
    y = cohort[1]
    a = _write_folder(tmp_path, "good", cohort, _scores(y, 1.2, seed=1))
    b = _write_folder(tmp_path, "noisy", cohort, _scores(y, 0.4, seed=2))
    return a, b


def test_table_has_one_column_per_run_and_auc_cell_from_metrics_json(good_and_noisy):
    a, b = good_and_noisy
    result = compare_runs([a, b], n_resamples=N_RESAMPLES)
    assert result.names == ["good", "noisy"]
    rows = dict(result.rows)
    assert all(len(cells) == 2 for cells in rows.values())
    for column, folder in enumerate((a, b)):
        test = json.loads((folder / "metrics.json").read_text())["test"]
        lo, hi = test["auc_ci"]
        assert rows["ROC AUC"][column] == f"{test['auc']:.3f} (95% CI {lo:.3f}\u2013{hi:.3f})"
    assert rows["Trainable params"] == ["11,168,002", "11,168,002"]
    assert rows["ECE after calibration"] == ["0.031", "0.031"]
    header = next(line for line in result.markdown.splitlines() if line.startswith("| Metric"))
    assert header == "| Metric | good | noisy |"
    assert "## Paired tests" in result.markdown


def test_informative_run_beats_noisy_one_and_swapping_flips_the_sign(good_and_noisy):
    a, b = good_and_noisy
    (forward,) = compare_runs([a, b], n_resamples=N_RESAMPLES).tests
    (backward,) = compare_runs([b, a], n_resamples=N_RESAMPLES).tests
    assert forward["auc_diff"] > 0.1
    assert forward["p_bootstrap"] < 0.05 and forward["p_delong"] < 0.05
    assert forward["ci"][0] > 0
    assert forward["bootstrap_unit"] == "patient" and forward["n_patients"] == 100 and forward["n_images"] == 150
    assert backward["auc_diff"] == pytest.approx(-forward["auc_diff"])
    assert (backward["a"], backward["b"]) == ("noisy", "good")
    assert backward["p_delong"] == pytest.approx(forward["p_delong"])
    assert forward["auc_a"] == pytest.approx(json.loads((a / "metrics.json").read_text())["test"]["auc"])


def test_identical_predictions_give_zero_difference_and_large_p(tmp_path, cohort):
    prob = _scores(cohort[1], 1.0, seed=3)
    a = _write_folder(tmp_path / "x", "model", cohort, prob)
    b = _write_folder(tmp_path / "y", "model", cohort, prob, kind="evaluation")
    result = compare_runs([a, b], n_resamples=N_RESAMPLES)
    (test,) = result.tests
    assert result.names == ["x/model", "y/model"]  # duplicate folder names disambiguated by parent
    assert test["auc_diff"] == 0.0
    assert test["p_bootstrap"] >= 0.5 and test["p_delong"] >= 0.5


def test_rows_in_different_order_are_matched_by_path(tmp_path, cohort):
    prob = _scores(cohort[1], 1.0, seed=4)
    shuffled = np.random.default_rng(5).permutation(len(cohort[0]))
    a = _write_folder(tmp_path, "a", cohort, prob)
    b = _write_folder(tmp_path, "b", cohort, prob, order=shuffled)
    (test,) = compare_runs([a, b], n_resamples=N_RESAMPLES).tests
    assert test["auc_diff"] == 0.0
    assert test["auc_b"] == test["auc_a"]


@pytest.mark.parametrize(
    "change, message",
    [
        ("drop", r"a and .*b were evaluated on different test images \(12 only in .*a, 0 only in .*b; "),
        ("relabel", r"give different labels to 3 of 150 test images"),
    ],
)
def test_different_test_images_are_refused(tmp_path, cohort, change, message):
    paths, y, patients = cohort
    prob = _scores(y, 1.0, seed=6)
    a = _write_folder(tmp_path, "a", cohort, prob)
    if change == "drop":
        keep = np.arange(12, len(paths))
        b = _write_folder(tmp_path, "b", ([paths[i] for i in keep], y[keep], [patients[i] for i in keep]), prob[keep])
    else:
        flipped = y.copy()
        flipped[:3] = 1 - flipped[:3]
        b = _write_folder(tmp_path, "b", (paths, flipped, patients), prob)
    with pytest.raises(DataError, match=message) as info:
        compare_runs([a, b], n_resamples=N_RESAMPLES)
    assert "same test set" in str(info.value)


def test_missing_metrics_json_names_the_folder(tmp_path, good_and_noisy):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(DataError, match=re.escape(f"{empty}: no metrics.json")):
        compare_runs([good_and_noisy[0], empty])


def test_positive_classes_must_agree(tmp_path, cohort):
    prob = _scores(cohort[1], 1.0, seed=7)
    a = _write_folder(tmp_path, "a", cohort, prob)
    b = _write_folder(tmp_path, "b", cohort, prob, positive="NORMAL")
    with pytest.raises(DataError, match="disagree on the positive class"):
        compare_runs([a, b])


def test_fewer_than_two_folders_is_a_config_error(good_and_noisy):
    with pytest.raises(ConfigError, match="at least 2"):
        compare_runs([good_and_noisy[0]])


def test_more_than_two_runs_are_each_tested_against_the_first(tmp_path, good_and_noisy, cohort):
    c = _write_folder(tmp_path, "third", cohort, _scores(cohort[1], 1.0, seed=8))
    result = compare_runs([*good_and_noisy, c], n_resamples=100)
    assert [(t["a"], t["b"]) for t in result.tests] == [("good", "noisy"), ("good", "third")]
    assert all(len(cells) == 3 for _, cells in result.rows)


def test_out_files_written_and_html_is_self_contained(tmp_path, cohort):
    y = cohort[1]
    a = _write_folder(tmp_path, "good", cohort, _scores(y, 1.2, seed=1), backbone="<script>alert(1)</script>")
    b = _write_folder(tmp_path, "noisy", cohort, _scores(y, 0.4, seed=2), kind="evaluation")
    out = tmp_path / "report" / "cmp"
    result = compare_runs([a, b], out=out, n_resamples=100)
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    assert (out / "comparison.md").read_text() == result.markdown
    html = (out / "comparison.html").read_text()
    assert html == result.html
    assert "http://" not in html and "https://" not in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["positive_class"] == "PNEUMONIA"
    assert saved["tests"][0]["auc_diff"] == pytest.approx(result.tests[0]["auc_diff"])
    assert saved["table"]["columns"] == ["good", "noisy"]
    assert [r["path"] for r in saved["runs"]] == ["../../good", "../../noisy"]  # relative: no local folder named
    assert str(tmp_path) not in (out / "comparison.json").read_text()
    compare_runs([a, b], out=out, n_resamples=100)  # rerun overwrites its own files
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
