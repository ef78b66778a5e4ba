"""evaluation.external: `medtransfer evaluate` on several devices gives the one-device predictions and metrics,
and metrics.json records what ran the inference."""

from __future__ import annotations

import json

import torch

from medtransfer.evaluation.external import evaluate_saved_model
from tests.serving.live import save_random_model


def test_two_devices_give_the_one_device_evaluation_and_the_hardware_is_recorded(tmp_path, make_kaggle_tree):
    run = save_random_model(tmp_path / "run", ["NORMAL", "PNEUMONIA"], threshold=0.5, image_size=40, decode_size=48)
    data = make_kaggle_tree({"test": {"NORMAL": 5, "PNEUMONIA": 6}})
    results = {}
    for name, devices in (("one", None), ("two", [torch.device("cpu")] * 2)):
        out = tmp_path / name
        evaluate_saved_model(run, data, out, cache_dir=tmp_path / "cache", bootstrap=0, accelerator="cpu",
                             precision="32-true", devices=devices)
        results[name] = ((out / "predictions.csv").read_text(), json.loads((out / "metrics.json").read_text()))
        assert "(world size 1, " + ("threads" if devices else "none") + ", precision 32-true)" in (out / "report.html").read_text()
    assert results["one"][0] == results["two"][0]  # same rows, same order, same digits
    assert results["one"][1]["test"] == results["two"][1]["test"]
    assert results["one"][1]["hardware"]["devices"] == 1 and results["two"][1]["hardware"]["devices"] == 2
    assert results["two"][1]["hardware"] | {"devices": 1, "distributed": "none"} == results["one"][1]["hardware"]
    assert results["two"][1]["hardware"]["precision"] == "32-true" and results["two"][1]["hardware"]["world_size"] == 1
    assert results["two"][1]["hardware"]["distributed"] == "threads"  # one process, a model copy per device


def test_the_evaluation_folder_names_the_run_and_the_data_without_local_folders(tmp_path, monkeypatch):
    from rich.console import Console

    from medtransfer.data.discover import discover
    from tests.tiny_runs import fake_home, kermany_set, local_mentions, local_needles, tiny_run, write_test_predictions

    home = fake_home(tmp_path, monkeypatch)
    run = tiny_run(home / "runs" / "demo", discover(kermany_set(home / "xr")))
    write_test_predictions(run)  # the shift summary's reference: the run's own test split
    (run / "split.csv").unlink()  # the label-free shift tests are skipped with a message that names the run
    site, out = kermany_set(home / "site", splits={"test": 3}), home / "evaluations" / "site"

    metrics = evaluate_saved_model(run, site, out, cache_dir=home / "cache", bootstrap=20, accelerator="cpu",
                                   precision="32-true", console=Console(quiet=True))

    written = json.loads((out / "metrics.json").read_text())
    assert (written["run"], written["data"]) == (metrics["run"], metrics["data"]) == ("../../runs/demo", "site")
    assert written["shift"]["reference"]["name"] == "test split of demo"
    assert written["label_free_shift"]["skipped"].startswith("--run demo: no split.csv")
    assert local_mentions(out, *local_needles(tmp_path, home)) == []
