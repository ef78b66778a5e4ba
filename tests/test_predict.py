"""Streaming predict: rows in input order as batches finish, bad files, the CSV written from a stream."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from medtransfer.artifacts import load_model, model_info, save_model
from medtransfer.errors import ConfigError, DataError
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import TransferModel
from medtransfer.predict import predict_with_progress, stream_predictions, write_rows


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    model = TransferModel(net, spec)
    folder = tmp_path_factory.mktemp("model")
    save_model(model, model_info(model, classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", threshold=0.5,
                                 image_size=32, decode_size=32), folder)
    loaded = load_model(folder)
    loaded.folder = folder  # for export
    return loaded


@pytest.fixture
def files(tmp_path, make_image) -> list[Path]:
    return [make_image(tmp_path / f"img{i}.png", size=(40, 36)) for i in range(7)]


def test_the_stream_yields_one_row_per_file_in_order_with_the_same_values_in_any_batching(saved, files):
    one = list(stream_predictions(saved, files, batch_size=7, accelerator="cpu", precision="32-true"))
    seen = []
    streamed = list(stream_predictions(saved, files, batch_size=3, accelerator="cpu", precision="32-true",
                                       num_workers=1, progress=seen.append))
    assert [r["path"] for r in streamed] == [str(f) for f in files] and seen == [3, 3, 1]
    for a, b in zip(one, streamed):
        assert a["pred"] == b["pred"] and a["prob_PNEUMONIA"] == pytest.approx(b["prob_PNEUMONIA"], abs=1e-5)


def test_a_bad_file_stops_the_stream_with_its_name_unless_skipped(saved, files, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    paths = files[:2] + [bad] + files[2:]
    with pytest.raises(DataError, match=r"1 unreadable image\(s\): .*broken.png.*--skip-bad-images"):
        list(stream_predictions(saved, paths, batch_size=4, accelerator="cpu"))
    rows = list(stream_predictions(saved, paths, batch_size=4, accelerator="cpu", skip_bad=True))
    assert [r["path"] for r in rows] == [str(f) for f in files]


def test_the_csv_is_written_from_the_stream_and_only_the_asked_rows_are_kept(saved, files, tmp_path):
    out = tmp_path / "predictions.csv"
    kept = predict_with_progress(saved, files, csv_path=out, batch_size=2, accelerator="cpu", num_workers=0, keep=3)
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(f) for f in files] and list(rows[0]) == ["path", "prob_NORMAL",
                                                                                    "prob_PNEUMONIA", "pred"]
    assert [r["path"] for r in kept] == [str(f) for f in files[:3]]
    assert write_rows(iter([]), tmp_path / "empty.csv") == 0


def test_onnxruntime_gives_the_probabilities_torch_gives(saved, files, tmp_path):
    pytest.importorskip("onnxruntime")
    from medtransfer.export import export_onnx

    onnx_path = export_onnx(saved.folder, tmp_path / "model.onnx")
    torch_rows = list(stream_predictions(saved, files, batch_size=4, accelerator="cpu", precision="32-true"))
    onnx_rows = list(stream_predictions(saved, files, batch_size=4, accelerator="cpu", onnx_path=onnx_path))
    assert [r["path"] for r in onnx_rows] == [r["path"] for r in torch_rows]
    assert max(abs(a["prob_PNEUMONIA"] - b["prob_PNEUMONIA"]) for a, b in zip(torch_rows, onnx_rows)) < 1e-4
    with pytest.raises(ConfigError, match="does not exist; run `medtransfer export"):
        list(stream_predictions(saved, files, onnx_path=tmp_path / "missing.onnx"))
