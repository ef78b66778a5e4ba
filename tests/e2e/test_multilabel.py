"""Multi-label end to end from the command line: an NIH-style CSV of findings trains with one command,
its per-finding figures match scikit-learn on the predictions file, and the per-finding operating
points travel to predict and the saved model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score

from medtransfer.artifacts import load_model
from tests.e2e.test_train_predict import FAST, invoke

FINDINGS = ("Effusion", "Mass", "Nodule")


def write_nih_style(root: Path, *, patients: int = 36, seed: int = 0, patient_column: bool = True) -> Path:
    """Images named as NIH names them (patient_followup.png) whose findings are drawn shapes; a Data_Entry CSV."""
    rng = np.random.default_rng(seed)
    (root / "images_001" / "images").mkdir(parents=True)
    rows = []
    for patient in range(1, patients + 1):
        for visit in range(int(rng.integers(1, 3))):
            image = rng.normal(90, 15, (48, 48))
            present = [f for f, p in zip(FINDINGS, (0.45, 0.35, 0.3)) if rng.random() < p]
            if "Effusion" in present:
                image[30:, :] += 90
            if "Mass" in present:
                image[6:18, 6:18] += 100
            if "Nodule" in present:
                image[20:26, 34:40] += 120
            name = f"{patient:08d}_{visit:03d}.png"
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images_001" / "images" / name)
            rows.append([name, "|".join(present) or "No Finding", str(patient)])
    with (root / "Data_Entry.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image Index", "Finding Labels", *(["Patient ID"] if patient_column else [])])
        writer.writerows([row if patient_column else row[:2] for row in rows])
    return root / "Data_Entry.csv"


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
    manifest = write_nih_style(tmp_path_factory.mktemp("nih"), patient_column=False)
    run = tmp_path_factory.mktemp("runs") / "multilabel"
    cache = tmp_path_factory.mktemp("cache")
    code = invoke(["train", "--data", manifest, "--out", run, "--cache-dir", cache, "--epochs", "2",
                   "--class-weights", "balanced", *FAST])
    assert code == 0
    return run, manifest, cache


def _rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_the_task_is_recorded_and_auc_per_finding_equals_scikit_learn(multilabel_run):
    run, _, _ = multilabel_run
    metrics = json.loads((run / "metrics.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    info = json.loads((run / "model" / "model.json").read_text())
    assert metrics["task"] == config["task"] == info["task"] == "multi-label"
    assert metrics["classes"] == config["findings"] == info["classes"] == list(FINDINGS)
    rows = _rows(run / "predictions_test.csv")
    aucs = []
    for finding in FINDINGS:
        entry = metrics["test"]["findings"][finding]
        y = [finding in r["label"].split("|") for r in rows if finding not in r["masked"].split("|")]
        p = [float(r[f"prob_{finding}"]) for r in rows if finding not in r["masked"].split("|")]
        if "auc" in entry:
            assert entry["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
            aucs.append(entry["auc"])
        assert entry["threshold"] == pytest.approx(info["thresholds"][FINDINGS.index(finding)])
        assert entry["temperature"] == pytest.approx(info["temperatures"][FINDINGS.index(finding)])
    assert metrics["test"]["macro_auc"] == pytest.approx(np.mean(aucs))


def test_the_patients_come_from_nih_file_names_and_stay_in_one_split(multilabel_run):
    run, _, _ = multilabel_run
    rows = _rows(run / "split.csv")
    splits_of: dict[str, set] = {}
    for row in rows:
        assert row["patient_id"] == Path(row["path"]).stem.split("_")[0]
        splits_of.setdefault(row["patient_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    assert any(Path(r["path"]).stem.endswith("_001") for r in rows)  # follow-ups exist and travel with their patient


def test_predict_writes_one_probability_and_decision_per_finding(multilabel_run, tmp_path):
    run, manifest, _ = multilabel_run
    images = sorted((manifest.parent / "images_001" / "images").glob("*.png"))[:5]
    out = tmp_path / "predictions.csv"
    assert invoke(["predict", *images, "--run", run, "--csv", out]) == 0
    rows = _rows(out)
    saved = load_model(run)
    decision = saved.decide(saved.network(__import__("torch").stack([saved.preprocess(i) for i in images])))
    for row, probabilities in zip(rows, decision.probabilities):
        for k, finding in enumerate(FINDINGS):
            # predict runs under the CPU's mixed precision (bf16, 8-bit mantissa): within 0.02 of the fp32 forward pass
            assert float(row[f"prob_{finding}"]) == pytest.approx(probabilities[k], abs=2e-2)
            assert int(row[f"pred_{finding}"]) == int(float(row[f"prob_{finding}"]) >= saved.info.thresholds[k])
        assert set(filter(None, row["findings"].split("|"))) == {f for f in FINDINGS if row[f"pred_{f}"] == "1"}


def test_uncertain_needs_a_known_policy(tmp_path, capsys):
    manifest = write_nih_style(tmp_path / "nih", patients=6)
    code = invoke(["train", "--data", manifest, "--out", tmp_path / "run", "--uncertain", "maybe", *FAST])
    assert code == 1
    assert "--uncertain: got 'maybe'; expected ones, zeros or ignore" in capsys.readouterr().err
