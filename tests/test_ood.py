"""ood: Mahalanobis and kNN scores equal a numpy reference, the threshold accepts 95% of validation,
the detector round-trips without pickle, and predict, export and serve give the score and flag."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from fastapi.testclient import TestClient

from medtransfer.artifacts import load_model, model_info, save_model
from medtransfer.errors import ConfigError, WeightsError
from medtransfer.export import export_onnx
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import TransferModel, backbone_children
from medtransfer.ood import (
    ACCEPT_FRACTION, OOD_JSON, OOD_WEIGHTS, ScoredModel, collect_features, fit_detector, load_detector, pick_layers,
    save_detector,
)
from medtransfer.predict import predict_files, write_rows
from medtransfer.serving.app import create_app
from medtransfer.serving.replicas import OOD_MESSAGE


def features(n: int, d: int = 12, shift: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    means = 3.0 * np.stack([np.arange(d) < d // 2, np.arange(d) >= d // 2])  # two classes, two directions
    x = rng.normal(size=(n, d)) + (means[labels] if not shift else -shift)  # shifted: the opposite direction
    return x.astype(np.float32), labels


def reference_mahalanobis(train: np.ndarray, labels: np.ndarray, x: np.ndarray, shrinkage: float = 0.1) -> np.ndarray:
    means = np.stack([train[labels == c].mean(0) for c in (0, 1)]).astype(np.float64)
    centred = train - means[labels]
    cov = centred.T @ centred / (len(train) - 2)
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))
    precision = np.linalg.inv(cov)
    d2 = np.stack([np.einsum("nd,de,ne->n", x - m, precision, x - m) for m in means], axis=1)
    return np.sqrt(d2.min(1) / x.shape[1])


def reference_knn(train: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    bank = train / np.linalg.norm(train, axis=1, keepdims=True)
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    distances = np.linalg.norm(z[:, None, :] - bank[None], axis=2)
    return np.sort(distances, axis=1)[:, k - 1]


def test_scores_equal_numpy_reference_and_threshold_accepts_95_percent_of_validation():
    train, labels = features(300)
    val, _ = features(200, seed=1)
    test, _ = features(50, seed=2)
    detector = fit_detector(train, labels, val, k=5)
    np.testing.assert_allclose(detector.score(torch.from_numpy(test), "mahalanobis").numpy(),
                               reference_mahalanobis(train, labels, test), rtol=1e-4, atol=1e-5)
    # kNN against the stored bank (each row the mean of KNN_GROUP training images' features: no single image kept)
    bank = detector.tensors["knn.bank"].numpy().astype(np.float64)
    np.testing.assert_allclose(detector.score(torch.from_numpy(test), "knn").numpy(),
                               reference_knn(bank, test, detector.k), rtol=1e-3, atol=1e-4)
    for method in ("mahalanobis", "knn"):
        accepted = (detector.score(torch.from_numpy(val), method).numpy() <= detector.thresholds[method]).mean()
        assert accepted == pytest.approx(ACCEPT_FRACTION, abs=0.01)


def test_a_shifted_set_scores_higher_and_is_flagged():
    train, labels = features(300)
    val, _ = features(200, seed=1)
    shifted, _ = features(100, shift=4.0, seed=3)
    detector = fit_detector(train, labels, val)
    for method in ("mahalanobis", "knn"):
        d = detector.using(method)
        assert d.score(torch.from_numpy(shifted)).min() > np.quantile(d.score(torch.from_numpy(val)).numpy(), 0.9)
        assert d.flags(d.score(torch.from_numpy(shifted)).numpy()).mean() > 0.9


def test_save_load_round_trip_without_pickle(tmp_path):
    train, labels = features(120)
    detector = fit_detector(train, labels, features(60, seed=1)[0], method="mahalanobis")
    save_detector(detector, tmp_path)
    assert (tmp_path / OOD_WEIGHTS).read_bytes()[8:9] == b"{"  # safetensors: a length, then a JSON header
    saved = json.loads((tmp_path / OOD_JSON).read_text())
    assert saved["method"] == "mahalanobis" and set(saved["thresholds"]) == {"mahalanobis", "knn"}
    loaded = load_detector(tmp_path)
    x = torch.from_numpy(features(10, seed=5)[0])
    assert loaded.method == "mahalanobis" and loaded.thresholds == detector.thresholds
    torch.testing.assert_close(loaded.score(x), detector.score(x))
    assert load_detector(tmp_path / "absent") is None
    (tmp_path / OOD_JSON).write_text(json.dumps({**saved, "method": "energy"}))
    with pytest.raises(WeightsError, match="field 'method' must be one of mahalanobis, knn; got 'energy'"):
        load_detector(tmp_path)


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory) -> Path:
    """A random-weight resnet18 run with a multilayer detector fitted on its own features of random images."""
    torch.manual_seed(4)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    model = TransferModel(net, spec).eval()
    run = tmp_path_factory.mktemp("ood") / "run"
    model_dir = save_model(model, model_info(model, classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA",
                                             threshold=0.5, image_size=48, decode_size=56), run)
    layers = pick_layers(model, backbone_children(net, spec), 48)
    train, val = (collect_features(model, [torch.randn(n, 3, 48, 48) * 0.2], layers, device=torch.device("cpu"),
                                   precision="32-true") for n in (40, 20))
    save_detector(fit_detector(train, np.arange(40) % 2, val, layers=layers, k=3), model_dir)
    return run


def test_scored_model_features_are_the_heads_input(guarded_run):
    saved = load_model(guarded_run)
    assert saved.ood.method == "multilayer" and saved.ood.layers
    images = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        logits, scores = ScoredModel(saved.model, saved.ood)(images)
        torch.testing.assert_close(logits, saved.model(images))
        saved.model.net.fc, head = torch.nn.Identity(), saved.model.net.fc
        for method in ("knn", "mahalanobis"):  # the penultimate methods read the head's input alone
            torch.testing.assert_close(ScoredModel(saved.model, saved.ood.using(method))(images)[1],
                                       saved.ood.score(saved.model(images), method))
        saved.model.net.fc = head


def test_predict_csv_has_ood_columns_and_an_old_model_has_none(guarded_run, tmp_path, make_image):
    paths = [make_image(tmp_path / f"{i}.png", "L", size=(64, 64)) for i in range(2)]
    rows = predict_files(load_model(guarded_run), paths, accelerator="cpu", precision="32-true")
    write_rows(rows, tmp_path / "p.csv")
    with (tmp_path / "p.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0])[-2:] == ["ood_score", "ood"]
    assert all(float(r["ood_score"]) >= 0 and r["ood"] in ("in", "out") for r in table)
    old = tmp_path / "old"
    save_model(load_model(guarded_run).model, load_model(guarded_run).info, old)
    assert "ood_score" not in predict_files(load_model(old), paths, accelerator="cpu", precision="32-true")[0]


def test_onnx_has_an_ood_score_output_equal_to_torch(guarded_run):
    saved = load_model(guarded_run)
    path = export_onnx(guarded_run)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities", "ood_score"]
    batch = torch.randn(4, 3, 48, 48) * 0.2  # like the images the detector was fitted on: scores of order 1
    onnx_scores = session.run(["ood_score"], {"image": batch.numpy()})[0]
    with torch.no_grad():
        torch_scores = ScoredModel(saved.model, saved.ood)(batch)[1].numpy()
    np.testing.assert_allclose(onnx_scores, torch_scores, rtol=0, atol=1e-4)


def test_predict_on_onnxruntime_gives_the_same_ood_columns_and_refuses_a_graph_without_them(guarded_run, tmp_path,
                                                                                            make_image):
    saved = load_model(guarded_run)
    paths = [make_image(tmp_path / f"{i}.png", "L", size=(64, 64)) for i in range(3)]
    torch_rows = predict_files(saved, paths, accelerator="cpu", precision="32-true")
    onnx_rows = predict_files(saved, paths, accelerator="cpu", onnx_path=export_onnx(guarded_run, tmp_path / "m.onnx"))
    for a, b in zip(torch_rows, onnx_rows):
        assert a["ood"] == b["ood"] and b["ood_score"] == pytest.approx(a["ood_score"], abs=1e-3)
    old = tmp_path / "old"
    save_model(saved.model, saved.info, old)
    plain = export_onnx(old, tmp_path / "plain.onnx")  # exported without the guard: no ood_score output
    with pytest.raises(ConfigError, match="has no ood_score output; run `medtransfer export"):
        predict_files(saved, paths, accelerator="cpu", onnx_path=plain)


def test_serve_answers_with_the_score_and_says_when_an_image_looks_foreign(guarded_run, tmp_path, make_image):
    saved = load_model(guarded_run)
    saved.ood.thresholds[saved.ood.method] = -1.0  # every image is foreign now
    client = TestClient(create_app(saved, max_concurrent=2))
    image = make_image(tmp_path / "upload.png", size=(64, 64))
    for _ in range(2):  # the second request runs on the second model copy, which must carry the guard too
        answer = client.post("/predict", files={"file": ("upload.png", image.read_bytes(), "image/png")}).json()
        assert answer["ood"] is True and answer["ood_score"] >= 0 and answer["ood_message"] == OOD_MESSAGE
    assert "does not look like the training data" in OOD_MESSAGE and "answer.ood_message" in client.get("/").text


def test_evaluate_reports_the_flagged_share_and_metrics_without_flagged_images(guarded_run, tmp_path, make_kaggle_tree):
    from medtransfer.evaluation.external import evaluate_saved_model

    data = make_kaggle_tree({"test": {"NORMAL": 6, "PNEUMONIA": 6}})
    metrics = evaluate_saved_model(guarded_run, data, tmp_path / "eval", cache_dir=tmp_path / "cache", bootstrap=0,
                                   accelerator="cpu", precision="32-true")
    ood = metrics["ood"]
    saved = load_model(guarded_run)
    assert ood["method"] == saved.ood.method and ood["threshold"] == pytest.approx(saved.ood.threshold)
    assert ood["flagged_fraction"] == pytest.approx(ood["flagged"] / 12)
    if "test_without_flagged" in ood:
        assert ood["test_without_flagged"]["n"] == 12 - ood["flagged"]
    stored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert stored["ood"]["flagged"] == ood["flagged"]
    assert "Foreign inputs" in (tmp_path / "eval" / "report.html").read_text()
