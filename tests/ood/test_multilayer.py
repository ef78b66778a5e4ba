"""ood multilayer: stage statistics catch inverted synthetic radiographs, every registered backbone gets stages
whose score equals the captured one, and version-2 files round-trip while version-1 files still load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medtransfer.data.phantom import random_anatomy, render_phantom
from medtransfer.models.backbones import create_backbone, list_backbones
from medtransfer.models.strategies import TransferModel, backbone_children
from medtransfer.ood import (
    ACCEPT_FRACTION, FORMAT_VERSION, OOD_JSON, PENULTIMATE, ScoredModel, collect_features, fit_detector, load_detector,
    pick_layers, save_detector,
)
from medtransfer.ood.scores import channel_statistics

SIZE = 64


def radiographs(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """The demo's synthetic chest films as normalised 3-channel batches, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    pixels = np.stack([render_phantom(rng, random_anatomy(rng, pneumonia=bool(y), virus=False), SIZE).pixels
                       for y in labels]).astype(np.float32) / 255.0
    images = torch.from_numpy((pixels - 0.45) / 0.25)[:, None].repeat(1, 3, 1, 1)
    return images, labels


def model_of(name: str) -> TransferModel:
    torch.manual_seed(0)
    net, spec = create_backbone(name, num_classes=2, weights="none")
    return TransferModel(net, spec).eval()


def collect(model: TransferModel, images: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    return collect_features(model, images.split(32), layers, device=torch.device("cpu"), precision="32-true")


@pytest.fixture(scope="module")
def fitted():
    model = model_of("resnet18")
    layers = pick_layers(model, backbone_children(model.net, model.spec), SIZE)
    (train, labels), (val, _), (test, _) = radiographs(160, 0), radiographs(100, 1), radiographs(60, 2)
    features = {name: collect(model, images, layers) for name, images in
                {"train": train, "val": val, "test": test, "inverted": 0.4 - test}.items()}  # pixels 1 - p
    return model, layers, fit_detector(features["train"], labels, features["val"], layers=layers), features


def test_stages_are_the_last_layer_at_each_resolution_but_the_final_one(fitted):
    _, layers, detector, _ = fitted
    assert layers == ["relu", "layer1", "layer2", "layer3"] and detector.layers == tuple(layers)
    assert detector.method == "multilayer" and detector.methods == ("mahalanobis", "knn", "multilayer")


def test_multilayer_flags_inverted_synthetic_radiographs_and_accepts_95_percent_of_validation(fitted):
    _, _, detector, features = fitted
    test, inverted = detector.score(features["test"]).numpy(), detector.score(features["inverted"]).numpy()
    auroc = roc_auc_score(np.r_[np.zeros(len(test)), np.ones(len(inverted))], np.r_[test, inverted])
    assert auroc >= 0.99
    assert detector.flags(inverted).mean() >= 0.95 and detector.flags(test).mean() <= 0.2
    accepted = (detector.score(features["val"]).numpy() <= detector.threshold).mean()
    assert accepted == pytest.approx(ACCEPT_FRACTION, abs=0.01)


def test_multilayer_is_the_largest_standardised_component(fitted):
    _, layers, detector, features = fitted
    components = detector.components(features["test"])
    reference = ((components - detector.tensors["multilayer.centre"]) / detector.tensors["multilayer.scale"]).max(1)
    torch.testing.assert_close(detector.score(features["test"]), reference.values)
    first = features["test"][layers[0]].double().numpy()  # the first stage's Gaussian, against numpy
    train = fitted[3]["train"][layers[0]].double().numpy()
    covariance = np.cov(train, rowvar=False)
    covariance = 0.9 * covariance + 0.1 * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    delta = first - train.mean(0)
    expected = np.sqrt(np.einsum("nd,de,ne->n", delta, np.linalg.inv(covariance), delta) / first.shape[1])
    np.testing.assert_allclose(components[:, 1].numpy(), expected, rtol=2e-3, atol=1e-4)


def test_channel_statistics_are_mean_and_standard_deviation():
    maps = torch.randn(2, 3, 5, 4)
    expected = torch.cat([maps.mean((2, 3)), maps.std((2, 3), unbiased=False)], 1)
    torch.testing.assert_close(channel_statistics(maps), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", [*list_backbones(), "mobilenetv3_small_050"])
def test_every_backbone_gets_stages_and_scores_in_its_own_forward_pass(name):
    model = model_of(name)
    layers = pick_layers(model, backbone_children(model.net, model.spec), SIZE)
    assert len(layers) >= 2, layers
    images = torch.randn(24, 3, SIZE, SIZE)
    features = collect(model, images, layers)
    detector = fit_detector({k: v[:16] for k, v in features.items()}, np.arange(16) % 2,
                            {k: v[16:] for k, v in features.items()}, layers=layers, k=3)
    with torch.no_grad():
        logits, scores = ScoredModel(model, detector)(images[:4])
        torch.testing.assert_close(logits, model(images[:4]))
    torch.testing.assert_close(scores, detector.score({k: v[:4] for k, v in features.items()}), rtol=1e-4, atol=1e-4)


def test_version_2_round_trips_and_a_version_1_detector_still_loads(fitted, tmp_path):
    _, layers, detector, features = fitted
    save_detector(detector, tmp_path)
    saved = json.loads((tmp_path / OOD_JSON).read_text())
    assert saved["version"] == FORMAT_VERSION and saved["layers"] == layers and saved["method"] == "multilayer"
    loaded = load_detector(tmp_path)
    assert loaded.layers == tuple(layers) and loaded.thresholds == detector.thresholds
    torch.testing.assert_close(loaded.score(features["test"]), detector.score(features["test"]))
    old = tmp_path / "old"  # the first guard's files: no version, no layers, penultimate tensors only
    penultimate_only = fit_detector(features["train"][PENULTIMATE], np.arange(160) % 2, features["val"][PENULTIMATE])
    save_detector(penultimate_only, old)
    payload = json.loads((old / OOD_JSON).read_text())
    for key in ("version", "layers"):
        payload.pop(key)
    (old / OOD_JSON).write_text(json.dumps(payload))
    legacy = load_detector(old)
    assert legacy.method == "knn" and legacy.layers == () and legacy.methods == ("mahalanobis", "knn")
    torch.testing.assert_close(legacy.score(features["test"]), penultimate_only.score(features["test"][PENULTIMATE]))
    (tmp_path / OOD_JSON).write_text(json.dumps({**saved, "version": FORMAT_VERSION + 1}))
    with pytest.raises(Exception, match="format version 3 is newer than this medtransfer reads"):
        load_detector(tmp_path)
