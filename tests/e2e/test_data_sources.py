"""End to end from the command line: plain class folders with a class map, a MedMNIST .npz,
then evaluate (with its shift summary) and recalibrate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import yaml

from medtransfer.artifacts import load_model
from tests.e2e.test_train_predict import invoke

FAST = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--set", "cache_size=40",
        "--batch-size", "8", "--bootstrap", "20", "--num-workers", "0", "--no-progress", "--epochs", "1"]


def split_rows(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "split.csv").open()))


def test_plain_class_folders_with_a_class_map_train_evaluate_and_recalibrate(make_kaggle_tree, tmp_path, capsys):
    data = make_kaggle_tree({"all": {"NORMAL": 14, "BACTERIA": 7, "VIRUS": 7}}) / "all"  # DIR/CLASS/*, no splits
    run, cache = tmp_path / "run", tmp_path / "cache"
    code = invoke(["train", "--data", data, "--out", run, "--cache-dir", cache, "--class-map", "BACTERIA=PNEUMONIA",
                   "--class-map", "VIRUS=PNEUMONIA", *FAST])
    out = capsys.readouterr().out
    assert code == 0
    assert "Leakage check on 28 images" in out and "no near-duplicate in two splits" in out
    rows = split_rows(run)
    assert {r["label"] for r in rows} == {"NORMAL", "PNEUMONIA"}
    test = [r for r in rows if r["split"] == "test"]
    assert 4 <= len(test) <= 8  # the default 0.2, drawn by patient
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["n"] == len(test) and metrics["leakage"]["clean"] is True
    assert yaml.safe_load((run / "config.yaml").read_text())["class_map"] == {"BACTERIA": "PNEUMONIA", "VIRUS": "PNEUMONIA"}
    assert "Leakage check on 28 images" in (run / "report.html").read_text()

    evaluation = tmp_path / "external"
    assert invoke(["evaluate", "--run", run, "--data", data, "--out", evaluation, "--cache-dir", cache, "--bootstrap", "20"]) == 0
    assert "KS distance" in capsys.readouterr().out
    shift = json.loads((evaluation / "metrics.json").read_text())["shift"]
    assert shift["n"] == 28 and shift["prevalence"] == 0.5  # the training class map merged the two classes
    assert shift["reference"]["n"] == len(test) and 0 <= shift["reference"]["ks_distance"] <= 1
    assert '<section id="shift">' in (evaluation / "report.html").read_text()

    recalibrated = tmp_path / "local"
    code = invoke(["recalibrate", "--run", run, "--data", data, "--out", recalibrated, "--cache-dir", cache, "--bootstrap", "20"])
    assert code == 0 and "before:" in capsys.readouterr().out
    model = load_model(recalibrated)
    assert model.info.provenance["recalibrated"]["data"] == data.name  # by its name: model.json is shared
    assert model.threshold == json.loads((recalibrated / "metrics.json").read_text())["threshold"]


def test_a_medmnist_npz_trains_from_the_command_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 24), ("val", 8), ("test", 10)):
        labels = np.arange(n) % 2
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8) + (labels * 120)[:, None, None].astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    source = tmp_path / "pneumoniamnist.npz"
    np.savez_compressed(source, **arrays)
    run = tmp_path / "run"
    code = invoke(["train", "--data", source, "--out", run, "--cache-dir", tmp_path / "cache", "--class-names",
                   "normal,pneumonia", "--positive-class", "pneumonia", *FAST])
    assert code == 0, capsys.readouterr().err
    rows = split_rows(run)
    assert sum(r["split"] == "test" for r in rows) == 10 and len(rows) == 42  # the file's own test split, kept
    assert {r["label"] for r in rows} == {"normal", "pneumonia"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["n"] == 10 and metrics["positive_class"] == "pneumonia"
    assert (run / "report.html").is_file()
