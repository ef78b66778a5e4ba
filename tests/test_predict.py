"""predict: inputs expanded, images preprocessed as evaluation does, one row per image at the saved threshold."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from medtransfer.artifacts import load_model, model_info, save_model
from medtransfer.errors import DataError
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import TransferModel
from medtransfer.predict import Classifier, expand_inputs, load_batch, predict_files, write_rows


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(1)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    model = TransferModel(net, spec)
    run = tmp_path_factory.mktemp("predict") / "run"
    save_model(model, model_info(model, classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", threshold=0.5,
                                 temperature=0.25, image_size=40, decode_size=48), run)
    return load_model(run)


@pytest.fixture
def images(tmp_path, make_image) -> list[Path]:
    return [make_image(tmp_path / "in" / name, mode, size=(60, 50)) for name, mode in
            [("a.png", "L"), ("b.jpg", "RGB"), ("c.png", "RGB"), ("d.jpeg", "L"), ("e.png", "L")]]


def test_expand_inputs_takes_files_as_given_and_folders_sorted_without_hidden_or_other_files(tmp_path, make_image):
    first = make_image(tmp_path / "z.png")
    make_image(tmp_path / "folder" / "sub" / "b.jpg")
    make_image(tmp_path / "folder" / "a.png")
    make_image(tmp_path / "folder" / ".hidden.png")
    (tmp_path / "folder" / "notes.txt").write_text("not an image")
    assert expand_inputs([first, tmp_path / "folder"]) == [first, tmp_path / "folder" / "a.png",
                                                          tmp_path / "folder" / "sub" / "b.jpg"]


def test_expand_inputs_names_a_missing_path_and_an_empty_folder(tmp_path):
    with pytest.raises(DataError, match="nope.png: no such file or folder"):
        expand_inputs([tmp_path / "nope.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        expand_inputs([tmp_path / "empty"])


def test_load_batch_preprocesses_each_image_as_the_saved_model_does(saved, images):
    batch, kept, bad = load_batch(saved, images)
    assert kept == images and bad == []
    assert torch.equal(batch, torch.stack([saved.preprocess(p) for p in images]))


def test_load_batch_lists_unreadable_files_or_leaves_them_out(saved, images, tmp_path):
    broken = tmp_path / "in" / "broken.png"
    broken.write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match=r"1 unreadable image\(s\): .*broken\.png: not a readable image.*--skip-bad-images"):
        load_batch(saved, [images[0], broken])
    batch, kept, bad = load_batch(saved, [images[0], broken], skip_bad=True)
    assert kept == [images[0]] and len(bad) == 1 and batch.shape == (1, 3, 40, 40)


def test_predict_files_rows_are_the_saved_models_decision(saved, images):
    rows = predict_files(saved, images, batch_size=2, accelerator="cpu", precision="32-true")
    with torch.no_grad():
        decision = saved.decide(saved.model.eval()(torch.stack([saved.preprocess(p) for p in images])))
    assert [r["path"] for r in rows] == [str(p) for p in images]
    for i, row in enumerate(rows):
        assert list(row) == ["path", "prob_NORMAL", "prob_PNEUMONIA", "pred"]
        assert row["prob_PNEUMONIA"] == pytest.approx(decision.probabilities[i, 1], abs=1e-5)
        assert row["prob_NORMAL"] + row["prob_PNEUMONIA"] == pytest.approx(1, abs=1e-12)
        assert row["pred"] == ("PNEUMONIA" if row["prob_PNEUMONIA"] >= 0.5 else "NORMAL")
    whole = predict_files(saved, images, batch_size=8, accelerator="cpu", precision="32-true")
    assert [r["pred"] for r in whole] == [r["pred"] for r in rows]
    assert np.allclose([r["prob_PNEUMONIA"] for r in whole], [r["prob_PNEUMONIA"] for r in rows], atol=1e-5)


def test_classifier_on_cpu_fp32_equals_the_plain_forward_pass(saved, images):
    batch = torch.stack([saved.preprocess(p) for p in images])
    decision = Classifier.on(saved, accelerator="cpu", precision="32-true")(batch)
    with torch.no_grad():
        logits = saved.model.eval()(batch.contiguous())
    np.testing.assert_allclose(decision.probabilities, saved.decide(logits).probabilities, atol=1e-5)


def test_write_rows_writes_six_decimals_and_the_header(tmp_path):
    out = tmp_path / "predictions.csv"
    write_rows([{"path": "a.png", "prob_NORMAL": 0.25, "prob_PNEUMONIA": 0.75, "pred": "PNEUMONIA"}], out)
    with out.open(newline="") as handle:
        assert list(csv.reader(handle)) == [["path", "prob_NORMAL", "prob_PNEUMONIA", "pred"],
                                            ["a.png", "0.250000", "0.750000", "PNEUMONIA"]]
