"""`evaluate` with a multi-label model: findings matched by name, per-finding figures against scikit-learn,
a finding the external set lacks masked and reported, the shift summary per finding."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from rich.console import Console
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score

from medtransfer.artifacts import load_model
from medtransfer.errors import DataError
from medtransfer.evaluation.external import evaluate_saved_model
from medtransfer.evaluation.multilabel_external import discover_multilabel_external
from medtransfer.evaluation.multilabel_io import match_findings, normalise_finding, read_multilabel_predictions
from tests.evaluation.multilabel_fixtures import (
    FINDINGS, cohort, image_set, saved_multilabel_run, write_columns_csv, write_run_folder,
)


def _run_with_reference(tmp_path):
    run = saved_multilabel_run(tmp_path / "run", thresholds=[0.4, 0.5, 0.6], temperatures=[1.5, 0.8, 1.0])
    paths, targets, patients, good, _ = cohort(n_patients=15, seed=3)
    write_run_folder(run, paths, targets, patients, good)  # the run's own test predictions: the shift reference
    return run


def _read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_external_csv_with_a_missing_finding_matches_sklearn_and_reports_the_gap(tmp_path):
    run = _run_with_reference(tmp_path)
    rows = image_set(tmp_path / "ext", patients=20, per_patient=2)
    data = write_columns_csv(tmp_path / "ext" / "labels.csv", rows, {"Effusion": "effusion", "Mass": "MASS", "Nodule": None},
                             blank_every=5)
    out = tmp_path / "eval"
    metrics = evaluate_saved_model(run, data, out, cache_dir=tmp_path / "cache", bootstrap=200, accelerator="cpu",
                                   precision="32-true", console=Console(quiet=True))

    assert metrics["task"] == "multi-label" and metrics["threshold"] is None
    assert metrics["findings_match"] == {"matched": {"Effusion": "effusion", "Mass": "MASS"}, "missing": ["Nodule"], "extra": []}
    predictions = _read_rows(out / "predictions.csv")
    assert len(predictions) == 40 and all("Nodule" in r["masked"].split("|") for r in predictions)
    test = metrics["test"]
    aucs = {}
    for finding in ("Effusion", "Mass"):
        known = [r for r in predictions if finding not in r["masked"].split("|")]
        y = [int(finding in r["label"].split("|")) for r in known]
        p = [float(r[f"prob_{finding}"]) for r in known]
        aucs[finding] = roc_auc_score(y, p)
        assert test["findings"][finding]["auc"] == pytest.approx(aucs[finding], abs=1e-12)
        assert test["findings"][finding]["n_known"] == len(known)
        threshold = metrics["operating_point"]["thresholds"][finding]
        assert [int(r[f"pred_{finding}"]) for r in predictions] == [int(float(r[f"prob_{finding}"]) >= threshold) for r in predictions]
    assert test["findings"]["Mass"]["n_known"] == 32 and test["findings"]["Mass"]["n_masked"] == 8  # rows 0, 5, ..., 35 blank
    assert test["findings"]["Effusion"]["n_known"] == 40
    assert test["macro_auc"] == pytest.approx(np.mean(list(aucs.values())), abs=1e-12)
    assert test["auc"] == test["macro_auc"] and len(test["macro_auc_ci"]) == 2
    assert test["findings"]["Nodule"]["n_known"] == 0 and test["findings"]["Nodule"]["not_in_data"] is True
    assert "Nodule" in test["undefined"]
    # labels as written in the CSV: the model's names, 1 where the CSV says 1
    by_path = {str(image): labels for image, _, labels in rows}
    for r in predictions:
        assert ("Effusion" in r["label"].split("|")) == bool(by_path[r["path"]]["Effusion"])

    shift = metrics["shift"]
    assert set(shift["findings"]) == {"Effusion", "Mass"} and shift["missing"] == ["Nodule"]
    reference = read_multilabel_predictions(run / "predictions_test.csv")
    for finding in ("Effusion", "Mass"):
        k = reference.findings.index(finding)
        ref_known = ~np.isnan(reference.targets[:, k])
        known = [r for r in predictions if finding not in r["masked"].split("|")]
        s = shift["findings"][finding]
        assert s["prevalence"] == pytest.approx(np.mean([finding in r["label"].split("|") for r in known]))
        assert s["reference"]["prevalence"] == pytest.approx(reference.targets[ref_known, k].mean())
        ks = ks_2samp([float(r[f"prob_{finding}"]) for r in known], reference.probabilities[ref_known, k]).statistic
        assert s["reference"]["ks_distance"] == pytest.approx(ks)
        assert s["reference"]["name"].startswith("test split of")

    saved = json.loads((out / "metrics.json").read_text())
    assert "positive_class" not in saved and saved["test"]["findings"]["Nodule"]["not_in_data"] is True
    assert (out / "report.html").is_file() and (out / "plots" / "test_roc_findings.png").is_file()


def test_a_set_with_none_of_the_models_findings_is_a_clear_error(tmp_path):
    run = saved_multilabel_run(tmp_path / "run")
    rows = image_set(tmp_path / "ext", patients=4, per_patient=1)
    with (tmp_path / "ext" / "other.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Path", "Cardiomegaly", "Edema"])
        writer.writerows([[str(image), "1", "0"] for image, _, _ in rows])
    with pytest.raises(DataError, match="none of the model's findings"):
        evaluate_saved_model(run, tmp_path / "ext" / "other.csv", tmp_path / "eval", cache_dir=tmp_path / "cache",
                             bootstrap=0, accelerator="cpu", console=Console(quiet=True))


def test_a_single_label_set_for_a_multi_label_model_is_a_clear_error(tmp_path):
    run = saved_multilabel_run(tmp_path / "run")
    rows = image_set(tmp_path / "ext", patients=4, per_patient=1)
    with (tmp_path / "ext" / "single.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([[str(image), "A" if i % 2 else "B"] for i, (image, _, _) in enumerate(rows)])
    with pytest.raises(DataError, match="single-label"):
        discover_multilabel_external(load_model(run), tmp_path / "ext" / "single.csv", split="test", cache_dir=tmp_path / "cache")


def test_nih_style_labels_match_without_case_or_underscores(tmp_path):
    run = saved_multilabel_run(tmp_path / "run", findings=("Effusion", "Pleural Thickening"))
    rows = image_set(tmp_path / "ext", patients=3, per_patient=1)
    labels = ["Pleural_Thickening|effusion", "No Finding", "Infiltration|Pleural_Thickening"]
    with (tmp_path / "ext" / "Data_Entry.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image Index", "Finding Labels", "Patient ID"])
        writer.writerows([[image.name, label, i] for i, ((image, _, _), label) in enumerate(zip(rows, labels))])
    saved = load_model(run)
    found = discover_multilabel_external(saved, tmp_path / "ext" / "Data_Entry.csv", split="test", cache_dir=tmp_path / "cache")
    assert found.matched == {"Effusion": "effusion", "Pleural Thickening": "Pleural_Thickening"}
    assert found.missing == [] and found.extra == ["Infiltration"]
    assert found.targets(saved).tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]


def test_finding_names_match_exactly_first_then_normalised():
    assert normalise_finding(" Pleural_Thickening ") == normalise_finding("pleural-thickening") == "pleural thickening"
    assert match_findings(["Mass", "Pleural Thickening", "Hernia"], ["mass", "Mass", "Pleural_Thickening"]) == {
        "Mass": "Mass", "Pleural Thickening": "Pleural_Thickening", "Hernia": None}
    assert FINDINGS == ("Effusion", "Mass", "Nodule")


def test_a_run_trained_on_a_labels_column_reads_a_set_with_one_column_per_finding(tmp_path):
    run = saved_multilabel_run(tmp_path / "run", training={"labels_column": "Finding Labels"})
    rows = image_set(tmp_path / "ext", patients=4, per_patient=1)
    data = write_columns_csv(tmp_path / "ext" / "columns.csv", rows, {f: f for f in FINDINGS})
    found = discover_multilabel_external(load_model(run), data, split="test", cache_dir=tmp_path / "cache")
    assert found.missing == [] and found.targets(load_model(run)).tolist() == [[labels[f] for f in FINDINGS] for _, _, labels in rows]
