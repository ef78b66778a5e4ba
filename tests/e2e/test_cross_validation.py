"""`train --folds K` end to end on a 3-class plain folder: folds, out-of-fold figures, the fold ensemble, --refit,
resume after deleted results (with --jobs 2) and after a SIGKILL in the middle of a fold.

Every run is a real `medtransfer train` process (as in test_resume.py), so an interrupted and a whole run can be
compared figure for figure.
"""

from __future__ import annotations

import csv
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from sklearn.metrics import roc_auc_score

from benchmarks.cross_validation import make_three_class_folder
from medtransfer.artifacts import load_model
from medtransfer.evaluation.out_of_fold import paired_oof_test
from medtransfer.predict import predict_files
from medtransfer.serving.app import create_app
from tests.e2e.test_resume import cli
from tests.e2e.test_train_predict import invoke

ARGS = ["--folds", "3", "--refit", "--backbone", "resnet18", "--weights", "none", "--image-size", "32",
        "--set", "cache_size=40", "--batch-size", "8", "--bootstrap", "50", "--num-workers", "0", "--no-progress",
        "--epochs", "2", "--patience", "5", "--precision", "32-true", "--accelerator", "cpu", "--lr", "0.003"]

# SIGKILL of itself when the second training run (fold 2) starts its second epoch: fold 1 is finished by then.
KILL_IN_FOLD_2 = """
import os, signal, sys
from medtransfer.train.callbacks import HistoryWriter
original = HistoryWriter.on_train_epoch_start
seen = []
def start(self, trainer, module):
    if trainer.current_epoch == 1:
        seen.append(1)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    original(self, trainer, module)
HistoryWriter.on_train_epoch_start = start
from medtransfer.cli import main
sys.argv = ["medtransfer", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_three_class_folder(tmp_path_factory.mktemp("three") / "data", patients=8, image_size=48)


@pytest.fixture(scope="module")
def cv_run(data, tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("cv")
    done = cli("train", "--data", data, "--out", base / "cv", "--cache-dir", base / "cache", *ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    return base / "cv", base / "cache"


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def figures(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    cv = metrics["cross_validation"]
    return {"threshold": metrics["threshold"], "val_auc": metrics["val"]["auc"], "test_auc": metrics["test"]["auc"],
            "val_macro_auc": metrics["val"]["multiclass"]["macro_auc"], "test_accuracy": metrics["test"]["accuracy"],
            "folds": [(r["auc"], r["best_epoch"], r["threshold"]) for r in cv["fold_table"]],
            "refit_test_auc": cv["refit"]["test_auc"]}


def test_folds_cover_the_pool_once_by_patient_and_leave_test_alone(cv_run, data):
    run, _ = cv_run
    split = rows(run / "split.csv")
    assert {r["fold"] for r in split if r["split"] != "test"} == {"1", "2", "3"}
    assert all(r["fold"] == "" for r in split if r["split"] == "test") and any(r["split"] == "test" for r in split)
    assert len({r["path"] for r in split}) == len(split) == sum(1 for _ in data.glob("*/*.png"))
    folds_of = {}
    for r in split:
        folds_of.setdefault(r["patient_id"], set()).add(r["fold"])
    assert all(len(f) == 1 for f in folds_of.values())
    for k in (1, 2, 3):  # fold k's run validated on fold k and trained on the others; test not in it
        fold_split = rows(run / "folds" / f"fold-{k}" / "split.csv")
        assert {r["path"] for r in fold_split if r["split"] == "val"} == {r["path"] for r in split if r["fold"] == str(k)}
        assert {r["split"] for r in fold_split} == {"train", "val"}


def test_every_pool_image_has_one_out_of_fold_prediction_and_the_pooled_auc_is_scikit_learns(cv_run):
    run, _ = cv_run
    oof = rows(run / "predictions_oof.csv")
    pool = {r["path"]: r["fold"] for r in rows(run / "split.csv") if r["split"] != "test"}
    assert sorted(r["path"] for r in oof) == sorted(pool)
    assert all(r["fold"] == pool[r["path"]] for r in oof)
    metrics = json.loads((run / "metrics.json").read_text())
    classes, positive = metrics["classes"], metrics["positive_class"]
    probs = np.asarray([[float(r[f"prob_{c}"]) for c in classes] for r in oof])
    labels = [r["label"] for r in oof]
    y = np.asarray([label == positive for label in labels])
    assert metrics["val"]["auc"] == pytest.approx(roc_auc_score(y, probs[:, classes.index(positive)]), abs=1e-9)
    macro = roc_auc_score([classes.index(label) for label in labels], probs, multi_class="ovr")
    assert metrics["val"]["multiclass"]["macro_auc"] == pytest.approx(macro, abs=1e-9)
    assert metrics["val"]["multiclass"]["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == [classes.index(x) for x in labels]))
    lo, hi = metrics["val"]["auc_ci"]
    assert lo <= metrics["val"]["auc"] <= hi and "macro_auc_ci" in metrics["val"]["multiclass"]


def test_the_fold_table_holds_each_folds_own_validation_figures_and_their_spread(cv_run):
    run, _ = cv_run
    cv = json.loads((run / "metrics.json").read_text())["cross_validation"]
    assert cv["folds"] == 3 and len(cv["fold_table"]) == 3
    for k, row in enumerate(cv["fold_table"], start=1):
        own = json.loads((run / "folds" / f"fold-{k}" / "metrics.json").read_text())["val"]
        assert row["auc"] == own["auc"] and row["accuracy_argmax"] == own["multiclass"]["accuracy"]
    aucs = [row["auc"] for row in cv["fold_table"]]
    assert cv["per_fold"]["auc"]["mean"] == pytest.approx(np.mean(aucs))
    assert cv["per_fold"]["auc"]["sd"] == pytest.approx(np.std(aucs, ddof=1))
    report = (run / "report.html").read_text()
    assert 'id="cross-validation"' in report and "pooled out of fold" in report
    assert (run / "plots" / "folds_roc.png").is_file() and (run / "plots" / "folds_history.png").is_file()


def test_the_fold_ensemble_reloads_predicts_and_serves(cv_run, data):
    run, _ = cv_run
    saved = load_model(run)
    folds = [load_model(run / "folds" / f"fold-{k}") for k in (1, 2, 3)]
    assert json.loads((run / "model" / "model.json").read_text())["members"] == [
        "weights.safetensors", "member_2.safetensors", "member_3.safetensors"]
    assert saved.threshold == json.loads((run / "metrics.json").read_text())["threshold"]
    batch = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(saved.network(batch), torch.stack([m.network(batch) for m in folds]).mean(0),
                                   rtol=0, atol=1e-5)
    image = next(data.glob("VIRUS/*.png"))
    expected = predict_files(saved, [image], accelerator="cpu")[0]
    answer = TestClient(create_app(saved, run_dir=run)).post("/predict", files={"file": (image.name, image.read_bytes(),
                                                                                         "image/png")})
    assert answer.status_code == 200
    assert answer.json()["probabilities"]["VIRUS"] == pytest.approx(expected["prob_VIRUS"], abs=1e-6)


def test_refit_trains_on_all_folds_for_the_median_best_epoch_at_the_out_of_fold_operating_point(cv_run):
    run, _ = cv_run
    refit = run / "refit"
    settings = yaml.safe_load((refit / "config.yaml").read_text())
    best = sorted(r["best_epoch"] for r in json.loads((run / "metrics.json").read_text())["cross_validation"]["fold_table"])
    assert settings["epochs"] == best[1] and settings["folds"] == 0
    assert len(rows(refit / "history.csv")) == best[1]
    pool = {r["path"] for r in rows(run / "split.csv") if r["split"] != "test"}
    assert {r["path"] for r in rows(refit / "split.csv") if r["split"] == "train"} == pool
    assert load_model(refit).threshold == load_model(run).threshold
    assert load_model(refit).temperature == load_model(run).temperature
    assert (refit / "report.html").is_file() and (refit / "predictions_test.csv").is_file()


def test_paired_out_of_fold_test_of_a_run_with_itself(cv_run):
    run, _ = cv_run
    test = paired_oof_test(run, run, n_resamples=50)
    assert test["auc_diff"] == 0 and test["bootstrap_unit"] == "patient"


def test_resume_keeps_finished_folds_and_gives_the_same_figures_with_two_jobs(cv_run, tmp_path):
    whole, cache = cv_run
    run = tmp_path / "cv"
    shutil.copytree(whole, run)
    for k in (2, 3):  # as if killed while folds 2 and 3 evaluated: their training is in their checkpoints
        for name in ("metrics.json", "report.html"):
            (run / "folds" / f"fold-{k}" / name).unlink()
    for name in ("metrics.json", "report.html"):
        (run / name).unlink()
    shutil.rmtree(run / "model")
    kept = (run / "folds" / "fold-1" / "metrics.json").stat().st_mtime_ns
    done = cli("train", "--resume", run, "--jobs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Fold 1 of 3: finished earlier, kept" in done.stdout and "in their own processes" in done.stdout
    assert (run / "folds" / "fold-1" / "metrics.json").stat().st_mtime_ns == kept
    assert (run / "folds" / "fold-3.log").is_file()
    expected, got = figures(whole), figures(run)
    flat = [v for row in expected["folds"] for v in row]
    assert [v for row in got["folds"] for v in row] == pytest.approx(flat, abs=1e-4)  # fold processes: one thread each
    for key in ("threshold", "val_auc", "test_auc", "val_macro_auc", "refit_test_auc"):
        assert got[key] == pytest.approx(expected[key], abs=1e-4), key


def test_a_run_killed_in_the_middle_of_a_fold_resumes_to_the_same_figures(cv_run, data, tmp_path):
    whole, cache = cv_run
    broken = tmp_path / "cv"
    killed = cli("train", "--data", data, "--out", broken, "--cache-dir", cache, *ARGS, script=KILL_IN_FOLD_2)
    assert killed.returncode == -signal.SIGKILL
    assert (broken / "folds" / "fold-1" / "report.html").is_file()
    assert len(rows(broken / "folds" / "fold-2" / "history.csv")) == 1 and not (broken / "folds" / "fold-3").exists()
    kept = (broken / "folds" / "fold-1" / "metrics.json").stat().st_mtime_ns
    resumed = cli("train", "--resume", broken)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (broken / "folds" / "fold-1" / "metrics.json").stat().st_mtime_ns == kept
    assert "Fold 2 of 3 (resuming)" in resumed.stdout
    assert figures(broken) == figures(whole)
    assert (broken / "predictions_oof.csv").read_text() == (whole / "predictions_oof.csv").read_text()


@pytest.mark.parametrize("args,message", [
    (["--folds", "1"], "--folds: got 1; expected 0 (off: one validation split) or 2 or more folds"),
    (["--folds", "3", "--ensemble", "2"], "--folds 3 with --ensemble 2: cross-validation already saves its fold models"),
    (["--refit"], "--refit: trains one model on all folds after cross-validation; add --folds K"),
    (["--jobs", "2"], "--jobs 2: trains cross-validation folds side by side; add --folds K"),
    (["--folds", "3", "--val-fraction", "0.3"], "--val-fraction: got 0.3, but --folds 3 validates on each fold in turn"),
])
def test_settings_cross_validation_cannot_honour_are_refused_in_one_line(args, message, tmp_path, capsys):
    assert invoke(["train", "--data", tmp_path, "--out", tmp_path / "run", *args]) == 1
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
