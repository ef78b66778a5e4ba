"""--border-crop end to end: one crop in train, predict, export; a border marker never reaches the model;
the shortcut check (border evidence) lands in metrics.json, the report and `medtransfer shortcuts`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from medtransfer.artifacts import load_model
from tests.e2e.test_train_predict import FAST, invoke, read_csv, run_cli, tiny_data  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def cropped_run(tiny_data, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("runs") / "cropped"
    code = invoke(["train", "--data", tiny_data, "--out", run, "--cache-dir", tmp_path_factory.mktemp("cache"),
                   "--strategy", "freeze", "--epochs", "1", "--border-crop", "0.1", "--skip-bad-images", *FAST])
    assert code == 0
    return run


def test_border_crop_is_saved_and_predict_and_onnx_match_training(cropped_run, tmp_path, monkeypatch, capsys):
    run = cropped_run
    assert json.loads((run / "model" / "model.json").read_text())["border_crop"] == 0.1
    assert yaml.safe_load((run / "config.yaml").read_text())["border_crop"] == 0.1
    reference = {r["path"]: float(r["prob_PNEUMONIA"]) for r in read_csv(run / "predictions_test.csv")}
    images = sorted(reference)[:6]
    code, _, err = run_cli(["predict", "--run", run, *images, "--csv", tmp_path / "p.csv"], monkeypatch, capsys)
    assert code == 0, err
    for row in read_csv(tmp_path / "p.csv"):
        assert float(row["prob_PNEUMONIA"]) == pytest.approx(reference[row["path"]], abs=2e-3)

    onnxruntime = pytest.importorskip("onnxruntime")
    code, _, err = run_cli(["export", "--run", run, "--out", tmp_path / "m.onnx"], monkeypatch, capsys)
    assert code == 0, err
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    saved = load_model(run)
    batch = np.stack([saved.preprocess(p).numpy() for p in images])
    probabilities = session.run(["probabilities"], {"image": batch})[0]
    positive = saved.positive_index
    fp32 = saved.decide(saved.model(torch.from_numpy(batch)).detach()).probabilities[:, positive]
    assert probabilities[:, positive] == pytest.approx(fp32, abs=1e-4)  # the crop is outside the graph: same input
    # training evaluated under bf16 autocast on this CPU: about 3 significant digits
    assert probabilities[:, positive] == pytest.approx([reference[p] for p in images], abs=1e-2)
    metadata = json.loads(session.get_modelmeta().custom_metadata_map["medtransfer"])
    assert metadata["border_crop"] == 0.1


def test_a_marker_in_the_border_does_not_change_a_cropped_models_prediction(cropped_run, tiny_data, tmp_path):  # noqa: F811
    saved = load_model(cropped_run)
    image = sorted((tiny_data / "test" / "NORMAL").glob("*.png"))[0]
    pixels = np.array(Image.open(image).convert("L"))
    marked = pixels.copy()
    edge = max(1, round(0.05 * pixels.shape[0]))  # half the cropped band: resizing cannot carry it inwards
    marked[:edge, :] = 255
    marked[:, -edge:] = 255
    assert (saved.preprocess(marked) == saved.preprocess(pixels)).all()
    logits = [saved.model(saved.preprocess(x)[None]).detach() for x in (pixels, marked)]
    assert saved.decide(logits[0]).probabilities == pytest.approx(saved.decide(logits[1]).probabilities, abs=0)
    uncropped = saved.info.__class__(**{**saved.info.__dict__, "border_crop": 0.0})
    plain = type(saved)(model=saved.model, info=uncropped)
    assert not (plain.preprocess(marked) == plain.preprocess(pixels)).all()  # without the crop the marker is seen


def test_border_evidence_is_in_metrics_report_and_the_shortcuts_command(cropped_run, monkeypatch, capsys):
    run = cropped_run
    block = json.loads((run / "metrics.json").read_text())["border_evidence"]
    assert block["band"] == 0.1 and block["band_area_share"] == pytest.approx(0.36, abs=0.01)
    assert block["n_images"] == len(read_csv(run / "predictions_test.csv")) and 0 <= block["mean_band_share"] <= 1
    assert block["gallery"] and all((run / g["image"]).is_file() for g in block["gallery"])
    assert "Shortcut check" in (run / "report.html").read_text()
    code, out, err = run_cli(["shortcuts", "--run", run, "--limit", "3"], monkeypatch, capsys)
    assert code == 0, err
    again = json.loads((run / "metrics.json").read_text())["border_evidence"]
    assert again["n_images"] == 3 and again["limit"] == 3 and "Border evidence (3 test images)" in out.replace("\n", " ")
    code, _, err = run_cli(["shortcuts", "--run", run, "--limit", "0"], monkeypatch, capsys)
    assert code == 1 and "--limit: got 0" in err
