"""The output step: predictions at the operating point, the saved model, metrics.json, plots, gallery, report."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from rich.console import Console

from medtransfer.artifacts import load_model
from medtransfer.config import TrainConfig
from medtransfer.evaluation.evaluate import OperatingPoint, SplitOutputs, split_metrics
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import Strategy, build_transfer_model
from medtransfer.train.callbacks import write_history
from medtransfer.train.outputs import Evaluation, saved_model_info, write_outputs

CLASSES = ["NORMAL", "PNEUMONIA"]


@pytest.fixture
def evaluation(tmp_path, make_image) -> Evaluation:
    rng = np.random.default_rng(0)
    outputs = {}
    for name, n in (("val", 6), ("test", 8)):
        paths = [str(make_image(tmp_path / "images" / f"{name}_{i}.png", size=(20, 20))) for i in range(n)]
        labels = np.arange(n) % 2
        logits = rng.normal(size=(n, 2)) + np.eye(2)[labels]
        outputs[name] = SplitOutputs(paths, labels, [f"p{i}" for i in range(n)], logits)
    point = OperatingPoint(positive_index=1, temperature=2.0, threshold=0.55, policy="fixed:0.55")
    metrics = {k: split_metrics(v, point, CLASSES, bootstrap=0, seed=0) for k, v in outputs.items()}
    return Evaluation(CLASSES, "PNEUMONIA", outputs, point, metrics)


@pytest.mark.parametrize(("cam_method", "layer"), [("gradcam", "layer4"), ("layercam", "layer3")])
def test_write_outputs_fills_the_run_folder(tmp_path, evaluation, cam_method, layer):
    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    model = build_transfer_model(net, spec, Strategy("freeze", 4))
    config = TrainConfig(image_size=16, cache_size=24, bootstrap=0, threshold="fixed:0.55", strategy="freeze",
                         cam_method=cam_method)
    out = tmp_path / "run"
    out.mkdir()
    config.write_yaml(out / "config.yaml")
    history = [{"epoch": 1, "train_loss": 0.7, "train_acc": 0.5, "val_loss": 0.69, "val_acc": 0.5, "lr": 1e-3,
                "seconds": 1.0}]
    write_history(history, out / "history.csv")
    metrics = {"backbone": "resnet18", "threshold": 0.55, "val": evaluation.metrics["val"],
               "test": evaluation.metrics["test"], "positive_class": "PNEUMONIA", "classes": CLASSES}

    write_outputs(out, model=model, config=config, evaluation=evaluation, metrics=metrics, history=history,
                  console=Console(quiet=True))

    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    gallery = json.loads((out / "gallery.json").read_text())
    assert (gallery["method"], gallery["target_layer"], metrics["border_evidence"]["method"]) == (cam_method, layer, cam_method)
    test = evaluation.outputs["test"]
    scaled = test.logits / 2.0
    expected = np.exp(scaled) / np.exp(scaled).sum(axis=1, keepdims=True)  # temperature-scaled softmax
    rows = list(csv.DictReader((out / "predictions_test.csv").open()))
    assert [r["path"] for r in rows] == test.paths
    assert [float(r["prob_PNEUMONIA"]) for r in rows] == pytest.approx(expected[:, 1].tolist())
    assert [r["pred"] for r in rows] == ["PNEUMONIA" if p >= 0.55 else "NORMAL" for p in expected[:, 1]]
    saved = load_model(out)
    assert (saved.threshold, saved.info.temperature, list(saved.info.frozen)) == (0.55, 2.0, ["conv1", "bn1", "relu", "maxpool"])
    for name in ["predictions_val.csv", "model/weights.safetensors", "plots/history.png", "plots/val_roc.png",
                 "plots/test_confusion.png", "gallery.json", "report.html"]:
        assert (out / name).is_file(), name


def test_saved_model_info_carries_what_inference_needs(evaluation):
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    model = build_transfer_model(net, spec, Strategy("finetune"))
    config = TrainConfig(image_size=96, cache_size=112, eval_crop_fraction=0.9, in_channels=1, threshold="fixed:0.55")
    info = saved_model_info(model, config, evaluation).to_json()
    assert {k: info[k] for k in ("backbone", "classes", "positive_class", "threshold", "temperature", "image_size",
                                 "decode_size", "eval_crop_fraction", "in_channels", "threshold_policy")} == {
        "backbone": "resnet18", "classes": CLASSES, "positive_class": "PNEUMONIA", "threshold": 0.55,
        "temperature": 2.0, "image_size": 96, "decode_size": 112, "eval_crop_fraction": 0.9, "in_channels": 1,
        "threshold_policy": "fixed:0.55",
    }
    # shareable: the settings without the local cache folder (medtransfer.privacy)
    expected = {k: v for k, v in config.to_dict().items() if k != "cache_dir"}
    assert info["training_config"] == expected and info["frozen"] == []
