"""The train pipeline's steps: a tiny real run end to end, and what is refused before anything is written."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from medtransfer.config import TrainConfig
from medtransfer.errors import ConfigError, DataError, WeightsError
from medtransfer.models.backbones import create_backbone
from medtransfer.data.split import write_split_csv
from medtransfer.rundir import CONFIG_FILE
from medtransfer.runtime import resolve_precision
from medtransfer.train.pipeline import (
    TrainResult,
    cache_splits,
    check_run_dir,
    draw_split,
    load_labelled_data,
    prebuild_cache,
    run_training,
    train_dataset,
    eval_datasets,
    write_split,
)

METRICS_HEAD = ["backbone", "strategy", "weights", "params", "epochs_run", "best_epoch", "stopped_early",
                "train_seconds", "positive_class", "threshold", "val", "test"]


@pytest.fixture
def data(make_kaggle_tree) -> Path:
    test = {"NORMAL": [f"IM-01{i:02d}-0001.jpeg" for i in range(3)],  # patients of their own: no leakage
            "PNEUMONIA": [f"person1{i:02d}_virus_1.jpeg" for i in range(3)]}
    return make_kaggle_tree({"train": {"NORMAL": 8, "PNEUMONIA": 8}, "test": test})


def tiny(data: Path, tmp_path: Path, **values) -> TrainConfig:
    settings = dict(data=str(data), backbone="resnet18", weights="none", image_size=16, cache_size=16, epochs=2,
                    batch_size=4, bootstrap=0, num_workers=0, progress=False, cache_dir=str(tmp_path / "cache"))
    return TrainConfig.from_dict({**settings, **values})


def quiet() -> Console:
    return Console(quiet=True)


def test_a_tiny_run_returns_its_typed_result_and_writes_the_run_folder(data, tmp_path):
    out = tmp_path / "run"
    result = run_training(tiny(data, tmp_path, strategy="freeze"), out, console=quiet())

    assert isinstance(result, TrainResult)
    assert (result.backbone, result.strategy, result.weights) == ("resnet18", "freeze", "none")
    assert result.params == {"total": 11_177_538, "trainable": 11_168_002, "head": 1_026}
    assert result.epochs_run == 2 and 1 <= result.best_epoch <= 2 and result.stopped_early is False
    assert result.classes == ["NORMAL", "PNEUMONIA"] and result.positive_class == "PNEUMONIA"
    assert 0.0 <= result.threshold <= 1.0 and result.threshold_policy == "youden"
    train_images = sum(c["images"] for c in result.data_summary["train"].values())
    assert result.test["n"] == 6 and result.val["n"] + train_images == 16
    assert result.leakage["clean"] is True
    assert result.train_seconds <= result.total_seconds

    metrics = json.loads((out / "metrics.json").read_text())
    border = metrics.pop("border_evidence")  # written after the result, by the shortcut check
    assert border["n_images"] == result.test["n"] and 0 <= border["mean_band_share"] <= 1
    assert metrics == json.loads(json.dumps(result.to_metrics()))  # metrics.json is the result, field for field
    assert list(metrics) == [f.name for f in dataclasses.fields(TrainResult)] and list(metrics)[:12] == METRICS_HEAD
    resolved = resolve_precision("auto", metrics["hardware"]["accelerator"])  # what training and evaluation ran at, not the requested "auto"
    assert metrics["precision"] == metrics["hardware"]["precision"] == resolved != "auto"
    assert (metrics["hardware"]["devices"], metrics["hardware"]["num_nodes"], metrics["hardware"]["world_size"]) == (1, 1, 1)
    assert f"on 1 node (world size 1, none, precision {resolved})</td>" in (out / "report.html").read_text()
    model_json = json.loads((out / "model" / "model.json").read_text())
    assert model_json["threshold"] == result.threshold and model_json["frozen"] == ["conv1", "bn1", "relu", "maxpool"]
    for name in [CONFIG_FILE, "split.csv", "history.csv", "predictions_val.csv", "predictions_test.csv", "report.html",
                 "gallery.json", "plots/history.png", "plots/test_roc.png", "checkpoints/best.safetensors"]:
        assert (out / name).is_file(), name


def test_feature_probe_run_without_a_test_split(make_kaggle_tree, tmp_path):
    root = make_kaggle_tree({"train": {"NORMAL": 8, "PNEUMONIA": 8}})
    out = tmp_path / "probe"
    config = tiny(root, tmp_path, strategy="linear-probe", augment=False, epochs=3, test_fraction=0)
    result = run_training(config, out, console=quiet())
    assert result.test is None and json.loads((out / "metrics.json").read_text())["test"] is None
    assert result.params["trainable"] == 1_026 and result.epochs_run <= 3
    assert not (out / "checkpoints").exists()  # no Lightning: the head trained on cached features
    history = list(csv.DictReader((out / "history.csv").open()))
    assert len(history) == result.epochs_run


@pytest.mark.parametrize(
    ("values", "error", "fragment"),
    [
        ({"strategy": "linear-probe", "augment": False, "label_smoothing": 0.1}, ConfigError, "--label-smoothing"),
        ({"threshold": "median"}, ConfigError, "--threshold"),
        ({"positive_class": "COVID"}, ConfigError, "--positive-class: got 'COVID'; classes are NORMAL, PNEUMONIA"),
        ({"strategy": "freeze", "freeze_children": 12}, ConfigError, "--freeze-children: got 12"),
        ({"weights": "WRONG"}, WeightsError, "does not fit backbone resnet18"),
    ],
)
def test_refusals_come_before_the_run_folder_exists(data, tmp_path, values, error, fragment):
    if values.get("weights") == "WRONG":
        wrong, _ = create_backbone("resnet50", num_classes=2, weights="none")
        values = {"weights": str(tmp_path / "resnet50.pth")}
        torch.save(wrong.state_dict(), values["weights"])
    out = tmp_path / "run"
    with pytest.raises(error, match=fragment):
        run_training(tiny(data, tmp_path, **values), out, console=quiet())
    assert not out.exists() and not (tmp_path / "cache").exists()  # nothing decoded either


@pytest.mark.parametrize(
    ("setup", "resume", "fragment"),
    [
        (lambda out: out.write_text("x"), False, "exists and is a file"),
        (lambda out: (out.mkdir(), (out / CONFIG_FILE).write_text("epochs: 1\n")), False, "already holds a run"),
        (lambda out: (out.mkdir(), (out / "notes.txt").write_text("mine")), False, "is not empty and is not a medtransfer run"),
        (lambda out: out.mkdir(), True, "not a medtransfer run (no config.yaml)"),
        (lambda out: None, True, "not a medtransfer run"),
    ],
)
def test_run_folder_checks(tmp_path, setup, resume, fragment):
    out = tmp_path / "run"
    setup(out)
    with pytest.raises(ConfigError, match=r"^--(out|resume) .*" + fragment.replace("(", r"\(").replace(")", r"\)")):
        check_run_dir(out, resume=resume)


def test_run_folder_check_accepts_a_new_or_empty_folder_and_creates_nothing(tmp_path):
    check_run_dir(tmp_path / "new", resume=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    check_run_dir(tmp_path / "empty", resume=False)


def test_split_command_writes_the_split_train_draws(data, tmp_path):
    config = tiny(data, tmp_path, val_fraction=0.25)
    write_split(config, tmp_path / "split.csv", quiet())
    rows = list(csv.DictReader((tmp_path / "split.csv").open()))
    assert [(r["path"], r["split"]) for r in rows] == [(str(r.path), r.split) for r in draw_split(config)]
    assert sum(r["split"] == "val" for r in rows) == 4 and sum(r["split"] == "test" for r in rows) == 6
    with pytest.raises(ConfigError, match="is a folder; name a CSV file"):
        write_split(config, tmp_path, quiet())


def test_strict_split_refuses_leakage(make_kaggle_tree, tmp_path):
    root = make_kaggle_tree({"train": {"NORMAL": 4, "PNEUMONIA": 4}, "test": {"NORMAL": 2, "PNEUMONIA": 2}})
    leaked = root / "test" / "NORMAL" / "IM-0001-0001.jpeg"
    leaked.write_bytes((root / "train" / "NORMAL" / "IM-0001-0001.jpeg").read_bytes())
    with pytest.raises(DataError, match="^--strict: "):
        write_split(tiny(root, tmp_path, strict=True), tmp_path / "split.csv", quiet())
    assert not (tmp_path / "split.csv").exists()


def test_near_duplicates_are_reported_with_the_summary_and_fail_under_strict(make_kaggle_tree, tmp_path):
    test = {"NORMAL": ["IM-0050-0001.jpeg", "IM-0051-0001.jpeg"], "PNEUMONIA": ["person50_virus_1.jpeg", "person51_virus_2.jpeg"]}
    root = make_kaggle_tree({"train": {"NORMAL": 4, "PNEUMONIA": 4}, "test": test})
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (8, 8)), np.ones((16, 16))).astype(np.uint8)  # survives re-encoding
    Image.fromarray(smooth).save(root / "train" / "NORMAL" / "IM-0001-0001.jpeg", quality=95)
    Image.fromarray(smooth).resize((100, 100)).save(root / "test" / "NORMAL" / "IM-0077-0001.jpeg", quality=60)
    console = Console(record=True, width=400)
    write_split(tiny(root, tmp_path), tmp_path / "split.csv", console)  # a new patient ID: only content finds it
    text = console.export_text()
    assert "Leakage check on 13 images" in text and "1 near-duplicate pair(s) in two splits" in text
    assert "Leakage: 1 near-duplicate image pair(s) by content" in text
    with pytest.raises(DataError, match="^--strict: 1 near-duplicate image pair"):
        write_split(tiny(root, tmp_path, strict=True), tmp_path / "strict.csv", quiet())


def test_class_map_and_test_fraction_reach_the_split(make_kaggle_tree, tmp_path):
    root = make_kaggle_tree({"all": {"NORMAL": 10, "BACTERIA": 5, "VIRUS": 5}}) / "all"
    config = tiny(root, tmp_path, class_map={"BACTERIA": "PNEUMONIA", "VIRUS": "PNEUMONIA"}, test_fraction=0.3)
    records = draw_split(config)
    assert {r.label for r in records} == {"NORMAL", "PNEUMONIA"}
    assert sum(r.split == "test" for r in records) == 6


def test_prebuild_cache_decodes_once(data, tmp_path, capsys):
    console = Console(file=None, force_terminal=False, width=200)
    for expected in ("22 images cached (22 decoded now)", "22 images cached (0 decoded now)"):
        prebuild_cache(data, cache_dir=tmp_path / "cache", size=16, workers=1, skip_bad=False, console=console)
        assert expected in capsys.readouterr().out


@pytest.mark.parametrize("augment", [True, False, "none", "radiograph", "trivial"])
def test_training_images_are_augmented_unless_augment_is_none(data, tmp_path, augment):
    config = tiny(data, tmp_path, augment=augment)
    records = draw_split(config)
    splits = cache_splits(records, ["NORMAL", "PNEUMONIA"], config, quiet())
    _, spec = create_backbone("resnet18", num_classes=2, weights="none")
    train = train_dataset(splits["train"], config, spec)
    evaluated = eval_datasets(splits, config, spec)["train"]
    torch.manual_seed(0)
    first = torch.stack([train[i][0] for i in range(4)])
    second = torch.stack([train[i][0] for i in range(4)])
    as_evaluated = torch.stack([evaluated[i][0] for i in range(4)])
    augmented = augment not in (False, "none")
    assert torch.equal(first, as_evaluated) is (not augmented)
    assert torch.equal(first, second) is (not augmented)


def test_a_split_file_is_used_as_it_is_instead_of_drawing(data, tmp_path):
    drawn = draw_split(tiny(data, tmp_path, seed=1))
    write_split_csv(drawn, tmp_path / "split.csv")
    config = tiny(data, tmp_path, seed=0, split_file=str(tmp_path / "split.csv"))  # seed 0 would draw another split
    assert [(r.path, r.split) for r in draw_split(tiny(data, tmp_path, seed=0))] != [(r.path, r.split) for r in drawn]
    loaded = load_labelled_data(config, tmp_path / "run", quiet(), resume=False)
    assert sorted((str(r.path), r.split) for r in loaded.records) == sorted((str(r.path), r.split) for r in drawn)
