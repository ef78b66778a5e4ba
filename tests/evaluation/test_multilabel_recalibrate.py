"""`recalibrate` with a multi-label model: per-finding temperature and threshold refitted on the fit part,
before/after on the report part, a new model folder with the per-finding lists."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from rich.console import Console
from sklearn.metrics import roc_auc_score

from medtransfer.artifacts import load_model
from medtransfer.evaluation.multilabel import MultiLabelPoint, fit_multilabel_point
from medtransfer.evaluation.multilabel_recalibrate import refit_multilabel
from medtransfer.evaluation.recalibrate import SPLIT_FILE, recalibrate_model
from medtransfer.task import MULTI_LABEL, Task
from tests.evaluation.multilabel_fixtures import FINDINGS, image_set, saved_multilabel_run, write_columns_csv


def _recalibrated(tmp_path, columns=None):
    run = saved_multilabel_run(tmp_path / "run", thresholds=[0.4, 0.5, 0.6], temperatures=[1.5, 0.8, 1.2])
    rows = image_set(tmp_path / "local", patients=30, per_patient=2, seed=1)
    data = write_columns_csv(tmp_path / "local" / "labels.csv", rows, columns or {f: f for f in FINDINGS}, blank_every=6)
    out = tmp_path / "recal"
    metrics = recalibrate_model(run, data, out, cache_dir=tmp_path / "cache", bootstrap=100, accelerator="cpu",
                                console=Console(quiet=True), progress=False)
    return run, out, metrics


def test_new_model_folder_has_the_refitted_per_finding_lists_and_the_same_weights(tmp_path):
    run, out, metrics = _recalibrated(tmp_path)
    new, old = load_model(out), load_model(run)
    assert (out / "model" / "weights.safetensors").read_bytes() == (run / "model" / "weights.safetensors").read_bytes()
    r = metrics["recalibration"]
    assert list(new.info.thresholds) == pytest.approx([r["thresholds"][f] for f in FINDINGS])
    assert list(new.info.temperatures) == pytest.approx([r["temperatures"][f] for f in FINDINGS])
    assert r["original"]["thresholds"] == dict(zip(FINDINGS, old.info.thresholds))
    assert r["original"]["temperatures"] == dict(zip(FINDINGS, old.info.temperatures))
    provenance = json.loads((out / "model" / "model.json").read_text())["provenance"]
    assert provenance["trained"]["run"] == "../run" and provenance["recalibrated"]["fit_fraction"] == 0.5
    assert metrics["task"] == MULTI_LABEL and metrics["test"] == r["after"]
    assert (out / "report.html").is_file() and "Per finding" in (out / "report.html").read_text()


def test_fit_and_report_parts_split_patients_and_the_report_figures_match_sklearn(tmp_path):
    _, out, metrics = _recalibrated(tmp_path)
    with open(out / SPLIT_FILE, newline="") as handle:
        split = list(csv.DictReader(handle))
    patients = {part: {r["patient_id"] for r in split if r["split"] == part} for part in ("fit", "report")}
    assert patients["fit"] and patients["report"] and not patients["fit"] & patients["report"]
    with open(out / "predictions_test.csv", newline="") as handle:
        predictions = list(csv.DictReader(handle))
    assert {r["path"] for r in predictions} == {r["path"] for r in split if r["split"] == "report"}
    after = metrics["recalibration"]["after"]
    before = metrics["recalibration"]["before"]
    for finding in FINDINGS:
        known = [r for r in predictions if finding not in r["masked"].split("|")]
        y = [int(finding in r["label"].split("|")) for r in known]
        auc = roc_auc_score(y, [float(r[f"prob_{finding}"]) for r in known])
        assert after["findings"][finding]["auc"] == pytest.approx(auc, abs=1e-12)
        assert before["findings"][finding]["auc"] == pytest.approx(auc, abs=1e-9)  # a temperature keeps the ranking
        assert after["findings"][finding]["threshold"] == metrics["recalibration"]["thresholds"][finding]
        assert before["findings"][finding]["threshold"] == metrics["recalibration"]["original"]["thresholds"][finding]


def test_the_refit_is_the_validation_fit_on_the_fit_part_and_a_one_class_finding_keeps_its_point():
    rng = np.random.default_rng(0)
    task = Task(MULTI_LABEL, FINDINGS)
    targets = (rng.random((60, 3)) < 0.4).astype(float)
    targets[:, 2] = 0.0  # Nodule: no positive in the fit part
    logits = 2 * targets + rng.normal(size=targets.shape)
    before = MultiLabelPoint(task, [1.5, 0.8, 1.2], [0.4, 0.5, 0.6], "youden")
    after, kept = refit_multilabel(before, logits, targets, policy="youden", calibrate="temperature")
    direct = fit_multilabel_point(logits, targets, task, policy="youden", calibrate="temperature")
    assert kept == ["Nodule"]
    assert after.temperatures[:2] == direct.temperatures[:2] and after.thresholds[:2] == direct.thresholds[:2]
    assert after.temperatures[2] == 1.2 and after.thresholds[2] == 0.6
