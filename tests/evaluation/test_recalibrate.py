"""`recalibrate`: temperature and threshold refitted on a patient-level part of a local set."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from medtransfer.artifacts import load_model, model_info, save_model
from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation.recalibrate import SPLIT_FILE, recalibrate_model
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import Strategy, build_transfer_model


def saved_run(folder: Path, *, policy: str = "youden", threshold: float = 0.5, calibrate: str = "temperature") -> Path:
    """A run folder with an untrained ResNet-18 (random outputs suffice to check the mechanics)."""
    import torch

    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    model = build_transfer_model(net, spec, Strategy("finetune", 0))
    info = model_info(
        model, classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", threshold=threshold, temperature=1.7,
        image_size=32, decode_size=40, threshold_policy=policy,
        training_config={"calibrate": calibrate, "threshold": policy, "labels": "folder"},
    )
    save_model(model, info, folder)
    return folder


def local_set(make_kaggle_tree, tmp_path: Path) -> Path:
    return make_kaggle_tree({"test": {"NORMAL": 12, "PNEUMONIA": 12}}, tmp_path / "local")


def recalibrated(run: Path, data: Path, tmp_path: Path, **options) -> tuple[Path, dict]:
    out = tmp_path / "recal"
    metrics = recalibrate_model(
        run, data, out, cache_dir=tmp_path / "cache", bootstrap=50, accelerator="cpu", console=Console(quiet=True), **options
    )
    return out, metrics


def test_new_model_folder_holds_the_same_weights_the_refit_and_both_provenances(make_kaggle_tree, tmp_path):
    run = saved_run(tmp_path / "run")
    data = local_set(make_kaggle_tree, tmp_path)
    out, metrics = recalibrated(run, data, tmp_path)

    new = load_model(out)
    assert (out / "model" / "weights.safetensors").read_bytes() == (run / "model" / "weights.safetensors").read_bytes()
    recal = metrics["recalibration"]
    assert new.threshold == pytest.approx(recal["threshold"]) and new.temperature == pytest.approx(recal["temperature"])
    assert recal["original"] == {"threshold": 0.5, "temperature": 1.7, "policy": "youden"}
    provenance = json.loads((out / "model" / "model.json").read_text())["provenance"]
    assert provenance["trained"]["run"] == "../run"  # relative to the new folder, the data by its name: shareable
    assert provenance["recalibrated"]["data"] == "local" and provenance["recalibrated"]["fit_fraction"] == 0.5
    assert (out / "report.html").is_file() and "Run as trained" in (out / "report.html").read_text()


def test_a_seed_ensemble_keeps_every_member_and_its_tta(make_kaggle_tree, tmp_path):
    import torch

    run = saved_run(tmp_path / "run")
    first = load_model(run)
    torch.manual_seed(1)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    second = build_transfer_model(net, spec, Strategy("finetune", 0))
    ensemble = tmp_path / "ens"
    save_model(first.model, dataclasses.replace(first.info, tta="flip"), ensemble, extra=(second,))
    out, _ = recalibrated(ensemble, local_set(make_kaggle_tree, tmp_path), tmp_path)
    new = load_model(out)
    assert len(new.extra) == 1 and new.info.tta == "flip"
    assert (out / "model" / "member_2.safetensors").read_bytes() == (ensemble / "model" / "member_2.safetensors").read_bytes()


def test_fit_and_report_parts_split_patients_and_metrics_come_from_the_report_part(make_kaggle_tree, tmp_path):
    run = saved_run(tmp_path / "run")
    out, metrics = recalibrated(run, local_set(make_kaggle_tree, tmp_path), tmp_path, fit_fraction=0.5, seed=3)

    rows = list(csv.DictReader((out / SPLIT_FILE).open()))
    patients = {part: {r["patient_id"] for r in rows if r["split"] == part} for part in ("fit", "report")}
    assert not patients["fit"] & patients["report"] and len(rows) == 24
    assert 8 <= len(patients["fit"]) <= 16
    predictions = list(csv.DictReader((out / "predictions_test.csv").open()))
    assert {Path(p["path"]).name for p in predictions} == {Path(r["path"]).name for r in rows if r["split"] == "report"}
    accuracy = np.mean([p["pred"] == p["label"] for p in predictions])  # the recalibrated decisions, counted here
    assert metrics["recalibration"]["after"]["accuracy"] == pytest.approx(accuracy)
    assert metrics["recalibration"]["after"]["n"] == metrics["recalibration"]["before"]["n"] == len(predictions)


def test_the_runs_own_policy_is_kept(make_kaggle_tree, tmp_path):
    run = saved_run(tmp_path / "run", policy="fixed:0.3", threshold=0.3, calibrate="none")
    _, metrics = recalibrated(run, local_set(make_kaggle_tree, tmp_path), tmp_path)
    assert metrics["recalibration"]["threshold"] == 0.3 and metrics["recalibration"]["temperature"] == 1.0


def test_bad_options_are_one_clear_line(make_kaggle_tree, tmp_path):
    run = saved_run(tmp_path / "run")
    data = local_set(make_kaggle_tree, tmp_path)
    with pytest.raises(ConfigError, match=r"^--fit-fraction: got 1\.0; use a number between 0 and 1"):
        recalibrated(run, data, tmp_path, fit_fraction=1.0)
    with pytest.raises(ConfigError, match="^--out .*must differ from the run folder"):
        recalibrate_model(run, data, run / "model", cache_dir=tmp_path / "cache")
    few = make_kaggle_tree({"test": {"NORMAL": 2, "PNEUMONIA": 1}}, tmp_path / "few")  # one pneumonia patient
    with pytest.raises(DataError, match="needs both classes in each part"):
        recalibrated(run, few, tmp_path)


def test_the_new_folder_names_its_runs_relative_to_itself_and_no_local_folder(tmp_path, monkeypatch):
    from medtransfer.data.discover import discover
    from medtransfer.evaluation.site_shift import run_root
    from tests.tiny_runs import fake_home, kermany_set, local_mentions, local_needles, tiny_run

    home = fake_home(tmp_path, monkeypatch)
    run = tiny_run(home / "runs" / "demo", discover(kermany_set(home / "xr")))
    site = kermany_set(home / "site", splits={"test": 10})
    options = dict(cache_dir=home / "cache", bootstrap=20, accelerator="cpu", progress=False, console=Console(quiet=True))
    first, second = home / "runs" / "demo-site", home / "derived" / "again"

    metrics = recalibrate_model(run, site, first, **options)
    recalibrate_model(first, site, second, **options)  # a recalibrated model recalibrated again

    provenance = json.loads((first / "model" / "model.json").read_text())["provenance"]
    assert provenance["trained"]["run"] == provenance["recalibrated"]["run"] == metrics["run"] == "../demo"
    assert provenance["recalibrated"]["data"] == metrics["data"] == "site"
    again = json.loads((second / "model" / "model.json").read_text())["provenance"]
    assert again["trained"]["run"] == "../../runs/demo" and again["recalibrated"]["run"] == "../../runs/demo-site"
    for folder in (first, second):
        assert run_root(folder).resolve() == run.resolve()  # the shift tests find the trained run's validation images
        assert local_mentions(folder, *local_needles(tmp_path, home)) == []
