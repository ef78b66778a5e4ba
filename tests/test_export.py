"""export: the saved model as ONNX; onnxruntime's outputs equal PyTorch fp32 and predict, metadata carries model.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from medtransfer.artifacts import load_model, model_info, save_model
from medtransfer.errors import ConfigError, WeightsError
from medtransfer.export import export_onnx, verify
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import TransferModel
from medtransfer.predict import predict_files


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A random-weight model (temperature 1.6, threshold 0.37) exported to RUN/model/model.onnx."""
    torch.manual_seed(2)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    model = TransferModel(net, spec)
    run = tmp_path_factory.mktemp("export") / "run"
    save_model(model, model_info(model, classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", threshold=0.37,
                                 temperature=1.6, image_size=48, decode_size=56, threshold_policy="youden"), run)
    assert export_onnx(run) == run / "model" / "model.onnx"
    return run


def test_onnx_outputs_equal_torch_fp32_and_predict(exported, tmp_path, make_image):
    saved = load_model(exported)
    paths = [make_image(tmp_path / f"{i}.png", mode, size=(80, 64)) for i, mode in enumerate(["L", "RGB", "L"])]
    batch = torch.stack([saved.preprocess(p) for p in paths])
    session = onnxruntime.InferenceSession(str(exported / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, probabilities = session.run(None, {"image": batch.numpy()})
    with torch.no_grad():
        torch_logits = saved.model.eval()(batch)
    np.testing.assert_allclose(logits, torch_logits.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(probabilities, saved.decide(torch_logits).probabilities, rtol=0, atol=1e-4)
    rows = predict_files(saved, paths, accelerator="cpu", precision="32-true")
    np.testing.assert_allclose(probabilities[:, 1], [r["prob_PNEUMONIA"] for r in rows], rtol=0, atol=1e-4)


def test_onnx_metadata_carries_what_preprocessing_and_the_decision_need(exported):
    graph = onnx.load(str(exported / "model" / "model.onnx"))
    metadata = json.loads({p.key: p.value for p in graph.metadata_props}["medtransfer"])
    stored = json.loads((exported / "model" / "model.json").read_text())
    assert metadata == {k: stored[k] for k in metadata}
    assert set(metadata) == {"backbone", "classes", "positive_class", "threshold", "threshold_policy", "temperature",
                             "image_size", "decode_size", "eval_crop_fraction", "mean", "std", "in_channels",
                             "output_stride", "tta"}
    assert metadata["threshold"] == 0.37 and metadata["classes"] == ["NORMAL", "PNEUMONIA"]


def test_export_refuses_a_file_name_that_is_not_onnx(exported, tmp_path):
    with pytest.raises(ConfigError, match="name a .onnx file"):
        export_onnx(exported, tmp_path / "model.txt")


def test_verify_refuses_an_export_that_differs_from_pytorch(exported):
    saved = load_model(exported)
    path = exported / "model" / "model.onnx"
    assert verify(saved, path, onnxruntime, tolerance=1e-4) <= 1e-4
    with pytest.raises(WeightsError, match="ONNX probabilities differ from PyTorch"):
        verify(saved, path, onnxruntime, tolerance=-1.0)


@pytest.mark.parametrize("tta,members", [("crops", 2), ("flip", 1)])
def test_onnx_graph_averages_tta_views_and_ensemble_members_as_torch_does(tmp_path, make_image, tta, members):
    models = []
    for seed in range(members):
        torch.manual_seed(seed)
        net, spec = create_backbone("resnet18", num_classes=2, weights="none")
        models.append(TransferModel(net, spec).eval())
    info = model_info(models[0], classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", threshold=0.4,
                      temperature=1.3, image_size=48, decode_size=56, tta=tta)
    save_model(models[0], info, tmp_path / "run", extra=tuple(models[1:]))
    path = export_onnx(tmp_path / "run")
    saved = load_model(tmp_path / "run")
    images = [make_image(tmp_path / f"{i}.png", size=(70, 60)) for i in range(3)]
    batch = torch.stack([saved.preprocess(p) for p in images])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities = session.run(["probabilities"], {"image": batch.numpy()})[0]
    with torch.no_grad():
        single = saved.decide(saved.model(batch)).probabilities
    rows = predict_files(saved, images, accelerator="cpu", precision="32-true")
    assert np.abs(probabilities[:, 1] - [r["prob_PNEUMONIA"] for r in rows]).max() < 1e-4
    assert np.abs(probabilities - single).max() > 1e-3  # the views and members change the output
    metadata = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["medtransfer"])
    assert metadata["tta"] == tta


# ---------------------------------------------------------------------- multi-label


def test_multilabel_onnx_gives_each_findings_calibrated_sigmoid_and_carries_the_thresholds(tmp_path, make_image):
    from tests.saved_multilabel import FINDINGS, TEMPERATURES, THRESHOLDS, save_multilabel_model

    run = save_multilabel_model(tmp_path / "run", threshold_policy="youden")
    path = export_onnx(run)
    saved = load_model(run)
    images = [make_image(tmp_path / f"{i}.png", mode, size=(70, 60)) for i, mode in enumerate(["L", "RGB", "L"])]
    batch = torch.stack([saved.preprocess(p) for p in images])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, probabilities = session.run(["logits", "probabilities"], {"image": batch.numpy()})
    assert probabilities.shape == (3, len(FINDINGS))
    with torch.no_grad():
        torch_logits = saved.network.eval()(batch)
    decision = saved.decide(torch_logits)
    assert np.abs(probabilities - decision.probabilities).max() <= 1e-5  # temperatures applied inside the graph
    hand = 1 / (1 + np.exp(-logits.astype(np.float64) / np.asarray(TEMPERATURES)))
    assert np.abs(probabilities - hand).max() <= 1e-6 and np.abs(probabilities - 1 / (1 + np.exp(-logits))).max() > 1e-3
    assert verify(saved, path, onnxruntime, tolerance=1e-5) <= 1e-5
    metadata = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["medtransfer"])
    assert (metadata["task"], metadata["classes"]) == ("multi-label", FINDINGS)
    assert (metadata["thresholds"], metadata["temperatures"]) == (THRESHOLDS, TEMPERATURES)
    assert not {"positive_class", "threshold", "temperature"} & set(metadata)
    assert metadata["threshold_policy"] == "youden"
    # what a deployment does with the file alone: call each finding at its threshold, as predict does
    np.testing.assert_array_equal(probabilities >= np.asarray(metadata["thresholds"]), decision.predicted == 1)


def test_single_label_onnx_metadata_has_no_task_keys(exported):
    metadata = json.loads({p.key: p.value for p in onnx.load(str(exported / "model" / "model.onnx")).metadata_props}
                          ["medtransfer"])
    assert not {"task", "thresholds", "temperatures"} & set(metadata)
