"""Heatmaps for image files: preprocessing as prediction does, the decision, the files written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medtransfer.artifacts import load_model, model_info, save_model
from medtransfer.data.decode import decode_image
from medtransfer.data.datamodule import image_tensor
from medtransfer.errors import ConfigError
from medtransfer.explain.files import explain_files, prepare_images
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import TransferModel


def _saved(folder, classes, **settings):
    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=len(classes), weights="none")
    model = TransferModel(net, spec)
    info = model_info(model, classes=classes, image_size=64, decode_size=72, **settings)
    save_model(model, info, folder)
    return load_model(folder)


@pytest.fixture
def saved(tmp_path):
    return _saved(tmp_path / "run", ["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", threshold=0.41, temperature=1.5)


def _images(tmp_path) -> list:
    rng = np.random.default_rng(0)
    paths = [tmp_path / "a.png", tmp_path / "b.jpg"]
    Image.fromarray(rng.integers(0, 255, (90, 120), dtype=np.uint8), mode="L").save(paths[0])
    Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8), mode="RGB").save(paths[1])
    return paths


def test_explain_files_writes_overlays_and_maps(tmp_path, saved):
    paths = _images(tmp_path)

    rows = explain_files(saved, paths, tmp_path / "out", method="gradcam", batch_size=1)

    assert [r["path"] for r in rows] == [str(p) for p in paths]
    for row, stem in zip(rows, ("a", "b")):
        assert row["overlay"] == tmp_path / "out" / f"{stem}_gradcam.png"
        assert row["map"] == tmp_path / "out" / f"{stem}_gradcam.npy"
        heat = np.load(row["map"])
        assert heat.shape == (64, 64) and heat.dtype == np.float32
        assert heat.min() >= 0 and heat.max() <= 1
        picture = Image.open(row["overlay"])
        assert picture.mode == "RGB" and picture.height > 64 and picture.width >= 64
        p_pos = row["probabilities"]["PNEUMONIA"]
        assert row["predicted"] == ("PNEUMONIA" if p_pos >= 0.41 else "NORMAL")
        assert row["probability"] == pytest.approx(row["probabilities"][row["predicted"]])
    # the probability is the temperature-scaled softmax of the model's logits
    transform = saved.transform()
    x = transform(image_tensor(np.array(decode_image(paths[0], size=72))))[None]
    with torch.no_grad():
        expected = torch.softmax(saved.model(x) / 1.5, dim=1)[0, 1].item()
    assert rows[0]["probabilities"]["PNEUMONIA"] == pytest.approx(expected, abs=1e-5)


def test_repeated_stems_get_a_counter_and_batches_do_not_change_the_maps(tmp_path, saved):
    first, second = _images(tmp_path)[0], tmp_path / "other" / "a.png"
    second.parent.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 70), dtype=np.uint8), mode="L").save(second)

    rows = explain_files(saved, [first, second, first], tmp_path / "out", method="cam", batch_size=2)

    assert [r["map"].name for r in rows] == ["a_cam.npy", "a_cam-2.npy", "a_cam-3.npy"]
    assert all(r["overlay"].is_file() for r in rows)
    np.testing.assert_allclose(np.load(rows[0]["map"]), np.load(rows[2]["map"]), atol=1e-5)  # batch 1 and batch 2


def test_more_classes_explain_the_argmax(tmp_path):
    saved = _saved(tmp_path / "run", ["a", "b", "c"], positive_class="b", threshold=0.99)
    rows = explain_files(saved, _images(tmp_path), tmp_path / "out", method="gradcam++")
    for row in rows:
        assert row["predicted"] == max(row["probabilities"], key=row["probabilities"].get)


def test_batch_size_below_one_is_refused(tmp_path, saved):
    with pytest.raises(ConfigError, match="--batch-size: got 0"):
        explain_files(saved, _images(tmp_path), tmp_path / "out", batch_size=0)


def test_prepare_images_shows_what_the_model_sees(tmp_path, saved):
    paths = _images(tmp_path)
    shown, batch = prepare_images(saved, paths)
    reference = torch.stack([saved.transform()(image_tensor(np.array(decode_image(p, size=72)))) for p in paths])
    torch.testing.assert_close(batch, reference)
    assert batch.dtype == next(saved.model.parameters()).dtype
    assert [s.shape for s in shown] == [(64, 64), (64, 64)] and shown[0].dtype == np.uint8
    # the grayscale file reaches the model as three equal channels: undoing the normalisation gives the shown image
    mean, std = torch.tensor(saved.info.mean)[:, None, None], torch.tensor(saved.info.std)[:, None, None]
    seen = (batch[0] * std + mean) * 255
    assert (seen - torch.from_numpy(shown[0]).float()).abs().max() < 0.51


def test_without_a_method_the_run_draws_the_heatmap_it_was_trained_to_draw(tmp_path):
    """explain, predict --cam, shortcuts and serve follow the run's `train --cam-method`; Grad-CAM otherwise."""
    paths = _images(tmp_path)
    layercam_run = _saved(tmp_path / "layercam", ["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", threshold=0.5,
                          training_config={"cam_method": "layercam"})
    plain_run = _saved(tmp_path / "plain", ["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", threshold=0.5)
    assert (layercam_run.cam_method, plain_run.cam_method) == ("layercam", "gradcam")

    default = explain_files(layercam_run, paths[:1], tmp_path / "default")[0]
    explicit = explain_files(layercam_run, paths[:1], tmp_path / "explicit", method="layercam")[0]
    gradcam = explain_files(layercam_run, paths[:1], tmp_path / "gradcam", method="gradcam")[0]

    assert default["overlay"].name == "a_layercam.png"
    np.testing.assert_array_equal(np.load(default["map"]), np.load(explicit["map"]))
    assert not np.array_equal(np.load(default["map"]), np.load(gradcam["map"]))
    assert explain_files(plain_run, paths[:1], tmp_path / "plain-out")[0]["overlay"].name == "a_gradcam.png"
