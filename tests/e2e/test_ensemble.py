"""Test-time augmentation and seed ensembles from the command line: two tiny runs on one fixed split
(TTA crops), `ensemble`, then predict, explain, export (onnxruntime), serve, evaluate and compare on it."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from fastapi.testclient import TestClient
from sklearn.metrics import roc_auc_score

from medtransfer.artifacts import load_model
from medtransfer.predict import predict_files
from medtransfer.serving.app import create_app
from tests.e2e.test_train_predict import FAST, invoke


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_data) -> tuple[Path, Path, Path, Path]:
    """Two seeds trained on one split.csv with --tta crops, and their ensemble."""
    base = tmp_path_factory.mktemp("ensemble")
    data = demo_data(test_patients_per_class=4)
    assert invoke(["split", "--data", data, "--out", base / "split.csv", "--cache-dir", base / "cache"]) == 0
    members = []
    for seed in (1, 2):
        run = base / f"seed{seed}"
        assert invoke(["train", "--data", base / "split.csv", "--keep-official-val", "--out", run, "--seed", seed,
                       "--tta", "crops", "--epochs", "1", "--precision", "32-true", "--cache-dir", base / "cache", *FAST]) == 0
        members.append(run)
    assert invoke(["ensemble", *members, "--out", base / "ens", "--bootstrap", "50"]) == 0
    return members[0], members[1], base / "ens", data


def test_training_chooses_its_operating_point_with_the_tta_that_predict_uses(runs):
    run = runs[0]
    saved = load_model(run)
    assert saved.info.tta == "crops"
    rows = read_csv(run / "predictions_test.csv")
    predicted = predict_files(saved, [Path(r["path"]) for r in rows], accelerator="cpu", precision="32-true")
    written = np.array([float(r["prob_PNEUMONIA"]) for r in rows])
    assert np.abs(written - [p["prob_PNEUMONIA"] for p in predicted]).max() < 1e-4
    plain = predict_files(saved.with_tta("none"), [Path(r["path"]) for r in rows], accelerator="cpu", precision="32-true")
    assert np.abs(written - [p["prob_PNEUMONIA"] for p in plain]).max() > 1e-4  # the crops do change the output


def test_ensemble_is_one_model_folder_averaging_its_members(runs):
    first, second, ens, _ = runs
    info = json.loads((ens / "model" / "model.json").read_text())
    assert info["members"] == ["weights.safetensors", "member_2.safetensors"] and info["tta"] == "crops"
    assert [m["seed"] for m in info["provenance"]["ensemble"]["members"]] == [1, 2]
    for name in ("split.csv", "config.yaml", "metrics.json", "predictions_val.csv", "predictions_test.csv",
                 "report.html", "plots/test_roc.png"):
        assert (ens / name).is_file(), name
    saved, members = load_model(ens), [load_model(first), load_model(second)]
    batch = torch.stack([saved.preprocess(Path(r["path"])) for r in read_csv(ens / "predictions_test.csv")[:4]])
    with torch.no_grad():
        expected = torch.stack([m.network(batch) for m in members]).mean(0)
        torch.testing.assert_close(saved.network(batch), expected, rtol=0, atol=1e-5)


def test_ensemble_metrics_match_sklearn_and_predict(runs):
    ens = runs[2]
    metrics = json.loads((ens / "metrics.json").read_text())
    rows = read_csv(ens / "predictions_test.csv")
    y = [r["label"] == "PNEUMONIA" for r in rows]
    probabilities = np.array([float(r["prob_PNEUMONIA"]) for r in rows])
    assert metrics["test"]["auc"] == pytest.approx(roc_auc_score(y, probabilities), abs=1e-6)
    assert metrics["threshold_policy"] == "youden" and len(metrics["ensemble"]["member_test_auc"]) == 2
    assert metrics["precision"] == metrics["hardware"]["precision"] == "32-true"  # the members' --precision
    assert metrics["hardware"]["devices"] == metrics["hardware"]["world_size"] == 1
    assert "(world size 1, none, precision 32-true)" in (ens / "report.html").read_text()
    predicted = predict_files(load_model(ens), [Path(r["path"]) for r in rows], accelerator="cpu", precision="32-true")
    assert np.abs(probabilities - [p["prob_PNEUMONIA"] for p in predicted]).max() < 1e-4


def test_every_command_takes_the_ensemble_folder(runs, tmp_path):
    first, _, ens, data = runs
    image = sorted((data / "test" / "PNEUMONIA").iterdir())[0]
    assert invoke(["predict", image, "--run", ens, "--csv", tmp_path / "p.csv", "--accelerator", "cpu"]) == 0
    row = read_csv(tmp_path / "p.csv")[0]
    assert invoke(["explain", image, "--run", ens, "--out", tmp_path / "cams"]) == 0
    assert (tmp_path / "cams" / f"{image.stem}_gradcam.png").is_file()
    assert invoke(["export", "--run", ens]) == 0
    session = onnxruntime.InferenceSession(str(ens / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    saved = load_model(ens)
    onnx_probability = session.run(["probabilities"], {"image": saved.preprocess(image)[None].numpy()})[0][0, 1]
    assert abs(onnx_probability - float(row["prob_PNEUMONIA"])) < 1e-4
    answer = TestClient(create_app(saved, run_dir=ens)).post(
        "/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")}).json()
    assert answer["probabilities"]["PNEUMONIA"] == pytest.approx(float(row["prob_PNEUMONIA"]), abs=1e-4)
    assert invoke(["evaluate", "--run", ens, "--data", data, "--out", tmp_path / "ext", "--bootstrap", "20",
                   "--cache-dir", tmp_path / "cache"]) == 0
    assert json.loads((tmp_path / "ext" / "metrics.json").read_text())["tta"] == "crops"
    assert invoke(["compare", first, ens, "--bootstrap", "20"]) == 0


@pytest.mark.parametrize("edit,message", [
    ("split", "split.csv differs from"),
    ("image_size", "model.json image_size 40 differs from"),
])
def test_incompatible_members_are_refused_naming_the_run(runs, tmp_path, capsys, edit, message):
    first, second, _, _ = runs
    other = shutil.copytree(second, tmp_path / "other")
    if edit == "split":
        lines = (other / "split.csv").read_text().splitlines()
        lines[1] = lines[1].rsplit(",", 1)[0] + (",test" if not lines[1].endswith(",test") else ",train")
        (other / "split.csv").write_text("\n".join(lines) + "\n")
    else:
        info = json.loads((other / "model" / "model.json").read_text())
        (other / "model" / "model.json").write_text(json.dumps({**info, "image_size": 40}))
    assert invoke(["ensemble", first, other, "--out", tmp_path / "ens"]) == 1
    err = capsys.readouterr().err
    assert f"RUNS {other}:" in err and message in err and not (tmp_path / "ens").exists()
