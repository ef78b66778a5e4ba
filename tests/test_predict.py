"""predict: inputs expanded, images preprocessed as evaluation does, one row per image at the saved threshold,
streamed in input order as batches finish (torch or onnxruntime), the CSV written from the stream."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from medtransfer.artifacts import load_model, model_info, save_model
from medtransfer.errors import ConfigError, DataError
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import TransferModel
from medtransfer.predict import Classifier, expand_inputs, predict_files, predict_with_progress, stream_predictions, write_rows


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(1)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    model = TransferModel(net, spec)
    run = tmp_path_factory.mktemp("predict") / "run"
    save_model(model, model_info(model, classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", threshold=0.5,
                                 temperature=0.25, image_size=40, decode_size=48), run)
    saved = load_model(run)
    saved.run = run  # for the ONNX export below
    return saved


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


# ----------------------------------------------------------------- streaming


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

    onnx_path = export_onnx(saved.run, tmp_path / "model.onnx")
    torch_rows = list(stream_predictions(saved, files, batch_size=4, accelerator="cpu", precision="32-true"))
    onnx_rows = list(stream_predictions(saved, files, batch_size=4, accelerator="cpu", onnx_path=onnx_path))
    assert [r["path"] for r in onnx_rows] == [r["path"] for r in torch_rows]
    assert max(abs(a["prob_PNEUMONIA"] - b["prob_PNEUMONIA"]) for a, b in zip(torch_rows, onnx_rows)) < 1e-4
    with pytest.raises(ConfigError, match="does not exist; run `medtransfer export"):
        list(stream_predictions(saved, files, onnx_path=tmp_path / "missing.onnx"))


def test_two_devices_give_the_single_device_rows_in_input_order(saved, files, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    paths = files[:3] + [bad] + files[3:]
    options = dict(batch_size=2, accelerator="cpu", precision="32-true", skip_bad=True)
    one = list(stream_predictions(saved, paths, **options))
    seen = []
    two = list(stream_predictions(saved, paths, **options, progress=seen.append,
                                  devices=[torch.device("cpu"), torch.device("cpu")]))
    assert [r["path"] for r in two] == [str(f) for f in files] and seen == [2, 2, 2, 2]
    assert two == one  # the same values, not only close: the copies are exact
    out = tmp_path / "two.csv"
    predict_with_progress(saved, files, csv_path=out, batch_size=3, accelerator="cpu", num_workers=0,
                          devices=[torch.device("cpu")] * 2)
    assert [r["path"] for r in csv.DictReader(out.open())] == [str(f) for f in files]
    with pytest.raises(DataError, match="broken.png"):  # a bad file still stops the stream at its place
        list(stream_predictions(saved, paths, batch_size=2, accelerator="cpu", devices=[torch.device("cpu")] * 2))


def test_a_wrong_runtime_or_an_onnx_file_without_it_is_refused_in_one_line(saved, tmp_path):
    from medtransfer.predict import onnx_file

    assert onnx_file("torch", saved.run) is None
    assert onnx_file("onnxruntime", saved.run) == saved.run / "model" / "model.onnx"
    assert onnx_file("onnxruntime", saved.run, tmp_path / "x.onnx") == tmp_path / "x.onnx"
    with pytest.raises(ConfigError, match="--runtime: got 'tvm'; choose torch or onnxruntime"):
        onnx_file("tvm", saved.run)
    with pytest.raises(ConfigError, match="--onnx .*x.onnx: only used with --runtime onnxruntime"):
        onnx_file("torch", saved.run, tmp_path / "x.onnx")


# ----------------------------------------------------------------- multi-label


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory):
    from tests.saved_multilabel import save_multilabel_model

    run = save_multilabel_model(tmp_path_factory.mktemp("predict-multilabel") / "run")
    saved = load_model(run)
    saved.run = run
    return saved


def test_multilabel_rows_give_each_findings_probability_decision_and_the_called_findings(multilabel, images, tmp_path):
    from tests.saved_multilabel import FINDINGS, TEMPERATURES, THRESHOLDS

    rows = predict_files(multilabel, images, batch_size=2, accelerator="cpu", precision="32-true")
    with torch.no_grad():
        logits = multilabel.model.eval()(torch.stack([multilabel.preprocess(p) for p in images])).double().numpy()
    expected = 1 / (1 + np.exp(-logits / np.asarray(TEMPERATURES)))
    columns = ["path", *(f"prob_{f}" for f in FINDINGS), *(f"pred_{f}" for f in FINDINGS), "findings"]
    for i, row in enumerate(rows):
        assert list(row) == columns and row["path"] == str(images[i])
        np.testing.assert_allclose([row[f"prob_{f}"] for f in FINDINGS], expected[i], rtol=0, atol=1e-5)
        assert [row[f"pred_{f}"] for f in FINDINGS] == [int(p >= t) for p, t in zip(expected[i], THRESHOLDS)]
        called = sorted((f for f in FINDINGS if row[f"pred_{f}"]), key=lambda f: -row[f"prob_{f}"])
        assert row["findings"] == "|".join(called) and "Atelectasis" in called and "Mass" not in called
    assert any(r["findings"].count("|") >= 1 for r in rows)  # several findings in one row, most probable first


def test_multilabel_csv_has_the_columns_and_the_decisions_as_0_or_1(multilabel, images, tmp_path):
    from tests.saved_multilabel import FINDINGS, THRESHOLDS

    out = tmp_path / "predictions.csv"
    kept = predict_with_progress(multilabel, images, csv_path=out, batch_size=2, accelerator="cpu", num_workers=0)
    written = list(csv.DictReader(out.open()))
    assert list(written[0]) == ["path", *(f"prob_{f}" for f in FINDINGS), *(f"pred_{f}" for f in FINDINGS), "findings"]
    for row, line in zip(kept, written):
        assert line["path"] == row["path"] and line["findings"] == row["findings"]
        assert [line[f"prob_{f}"] for f in FINDINGS] == [f"{row[f'prob_{f}']:.6f}" for f in FINDINGS]
        assert [line[f"pred_{f}"] for f in FINDINGS] == [str(row[f"pred_{f}"]) for f in FINDINGS]
        assert all(line[f"pred_{f}"] == str(int(row[f"prob_{f}"] >= t)) for f, t in zip(FINDINGS, THRESHOLDS))


def test_multilabel_console_table_names_the_findings_called(multilabel, images):
    from rich.console import Console

    from medtransfer.predict import operating_point_text, prediction_table

    rows = predict_files(multilabel, images[:2], accelerator="cpu", precision="32-true")
    console = Console(width=200, record=True)
    console.print(prediction_table(multilabel, rows))
    text = console.export_text()
    for row in rows:
        first = row["findings"].split("|")[0]
        assert f"{first} {row[f'prob_{first}']:.3f}" in text and "Mass 0." not in text
    assert operating_point_text(multilabel) == ("thresholds per finding on p(finding): Atelectasis 0.000, "
                                                "Effusion 0.450, Mass 1.000, Nodule 0.550")


def test_single_label_console_table_and_operating_point_are_as_before(saved, images):
    from rich.console import Console

    from medtransfer.predict import operating_point_text, prediction_table

    rows = predict_files(saved, images[:1], accelerator="cpu", precision="32-true")
    console = Console(width=200, record=True)
    console.print(prediction_table(saved, rows))
    text = console.export_text()
    assert "p(PNEUMONIA)" in text and f"{rows[0]['prob_PNEUMONIA']:.4f}" in text and rows[0]["pred"] in text
    assert operating_point_text(saved) == "threshold 0.500 on p(PNEUMONIA)"


def test_multilabel_onnxruntime_rows_equal_torch_rows(multilabel, files, tmp_path):
    pytest.importorskip("onnxruntime")
    from medtransfer.export import export_onnx

    onnx_path = export_onnx(multilabel.run, tmp_path / "model.onnx")
    torch_rows = list(stream_predictions(multilabel, files, batch_size=4, accelerator="cpu", precision="32-true"))
    onnx_rows = list(stream_predictions(multilabel, files, batch_size=4, accelerator="cpu", onnx_path=onnx_path))
    for a, b in zip(torch_rows, onnx_rows):
        assert a.keys() == b.keys()
        assert max(abs(a[k] - b[k]) for k in a if k.startswith("prob_")) < 1e-5


def test_a_file_name_that_is_not_utf8_is_kept_byte_for_byte_in_the_csv(saved, tmp_path, make_image):
    import os

    image = tmp_path / os.fsdecode(b"r\xe9sum\xe9.png")  # Latin-1 bytes: not UTF-8
    try:
        make_image(tmp_path / "plain.png", size=(40, 36)).rename(image)
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    out = tmp_path / "predictions.csv"
    predict_with_progress(saved, [image], csv_path=out, accelerator="cpu", num_workers=0)
    assert os.fsencode(str(image)) in out.read_bytes()
