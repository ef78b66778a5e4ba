"""The Python API (medtransfer.api): train from a DataFrame, load, predict, evaluate, explain, and what Jupyter shows.

One tiny single-label run (resnet18, random init, 48 px, 1 epoch) trained from a DataFrame is
shared by the tests of this module; a multi-label DataFrame trains its own one-epoch run.
"""

from __future__ import annotations

import csv
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import medtransfer
from medtransfer.api import Evaluation, Explanation, Model, TrainedRun
from medtransfer.errors import ConfigError, DataError
from tests.e2e.test_train_predict import invoke

pd = pytest.importorskip("pandas")

TINY = {"backbone": "resnet18", "weights": "none", "image_size": 48, "cache_size": 56, "epochs": 1, "batch_size": 8,
        "bootstrap": 50, "num_workers": 0, "progress": False}


def folder_frame(root: Path) -> pd.DataFrame:
    """The demo folder as a DataFrame: path, label, patient_id (from the Kermany-style names), split."""
    rows = []
    for path in sorted(root.glob("*/*/*.png")):
        split, label = path.parts[-3], path.parts[-2]
        if split in ("train", "val", "test"):
            rows.append({"path": str(path), "label": label, "patient_id": re.sub(r"[-_]\d+$", "", path.stem), "split": split})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def frame(demo_data) -> pd.DataFrame:
    return folder_frame(demo_data())


@pytest.fixture(scope="module")
def trained(frame, tmp_path_factory) -> tuple[TrainedRun, Path]:
    cache = tmp_path_factory.mktemp("api-cache")
    result = medtransfer.train(frame, tmp_path_factory.mktemp("api-runs") / "run", cache_dir=cache, quiet=True, **TINY)
    return result, cache


@pytest.fixture(scope="module")
def model(trained) -> Model:
    return medtransfer.load(trained[0].run)


def test_import_medtransfer_loads_no_torch_lightning_or_pandas():
    code = ("import json, sys; import medtransfer, medtransfer.api; medtransfer.train; medtransfer.load; "
            "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert not {m.split(".")[0] for m in loaded} & {"torch", "lightning", "pandas", "torchvision", "timm"}


def test_medtransfer_train_is_the_api_function_and_still_the_training_package():
    import medtransfer.train.pipeline as pipeline  # noqa: PLR0402 - the attribute chain medtransfer.train.pipeline is the point
    from medtransfer.train import seed_ensemble

    assert medtransfer.train.pipeline is pipeline and medtransfer.train.seed_ensemble is seed_ensemble
    assert callable(medtransfer.train) and medtransfer.load is medtransfer.api.load
    assert "quiet" in inspect.signature(medtransfer.train).parameters
    assert medtransfer.train.__doc__ == medtransfer.api.train.__doc__
    assert {"train", "load", "__version__"} <= set(dir(medtransfer))


def test_an_unknown_setting_names_the_closest_one_and_writes_nothing(frame, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown setting 'epoch'; did you mean 'epochs'\?"):
        medtransfer.train(frame, tmp_path / "run", epoch=2, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_data_of_another_type_is_refused_with_what_is_accepted(tmp_path):
    with pytest.raises(ConfigError, match="got dict; pass a folder, a CSV manifest or an .npz file, or a pandas DataFrame"):
        medtransfer.train({"path": []}, tmp_path / "run", cache_dir=tmp_path)


def test_a_dataframe_is_written_once_as_a_manifest_with_absolute_paths_and_joined_findings(tmp_path, monkeypatch):
    from medtransfer.api.inputs import write_manifest

    monkeypatch.chdir(tmp_path)
    frame = pd.DataFrame({"path": ["images/a.png", Path("images/b.png")], "labels": [["Mass", "Nodule"], []],
                          "patient_id": ["p1", "p2"]})
    path = write_manifest(frame, tmp_path / "manifests")
    assert write_manifest(frame.copy(), tmp_path / "manifests") == path  # named by content
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["path"], r["labels"], r["patient_id"]) for r in rows] == [
        (str(tmp_path / "images" / "a.png"), "Mass|Nodule", "p1"), (str(tmp_path / "images" / "b.png"), "", "p2")]
    assert list(frame.path) == ["images/a.png", Path("images/b.png")]  # the caller's frame is left as it was
    with pytest.raises(DataError, match="no image column"):
        write_manifest(pd.DataFrame({"file": ["a.png"]}), tmp_path)


def test_training_from_a_dataframe_records_its_manifest_and_split(trained, frame):
    result, cache = trained
    config = yaml.safe_load((result.run / "config.yaml").read_text())
    assert Path(config["data"]) == Path(result.data) and Path(result.data).parent == cache / "manifests"
    with (result.run / "split.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(Path(r["path"]), r["label"], r["patient_id"]) for r in rows} == set(
        zip(map(Path, frame.path), frame.label, frame.patient_id))
    # the DataFrame's test split is kept as it is; train and val are pooled and re-split by patient, as for a folder
    assert {Path(r["path"]) for r in rows if r["split"] == "test"} == set(map(Path, frame.path[frame.split == "test"]))


def test_the_result_is_metrics_json_and_jupyter_shows_its_aucs(trained):
    result, _ = trained
    assert result.metrics == json.loads((result.run / "metrics.json").read_text())
    assert result.report == result.run / "report.html" and result.report.is_file()
    html, text = result._repr_html_(), repr(result)
    for split in ("val", "test"):
        auc = f"{result.metrics[split]['auc']:.3f}"
        assert f"<td>{auc} (95% CI" in html and auc in text
        assert f"{result.metrics[split]['sensitivity']:.3f}" in html
    assert f"{result.metrics['threshold']:.3f}" in html
    assert TrainedRun.read(result.run).metrics == result.metrics


def test_predict_returns_the_rows_the_predict_command_writes(trained, model, tmp_path):
    result, _ = trained
    images = [row for row in pd.read_csv(result.run / "split.csv").query("split == 'test'").path]
    csv_path = tmp_path / "predictions.csv"
    assert invoke(["predict", *images, "--run", result.run, "--csv", csv_path, "--num-workers", "0"]) == 0
    expected = pd.read_csv(csv_path)
    table = model.predict(images)
    assert list(table.columns) == list(expected.columns) == ["path", "prob_NORMAL", "prob_PNEUMONIA", "pred", "ood_score", "ood"]
    assert list(table.path) == list(expected.path) and list(table.pred) == list(expected.pred)
    assert list(table.ood) == list(expected.ood)
    for column in ("prob_NORMAL", "prob_PNEUMONIA", "ood_score"):
        np.testing.assert_allclose(table[column], expected[column], atol=1e-6)


def test_images_in_memory_predict_as_their_files_do(trained, model):
    paths = [Path(p) for p in pd.read_csv(trained[0].run / "split.csv").query("split == 'test'").path][:3]
    from_files = model.predict(paths)
    for images in ([p.read_bytes() for p in paths], [np.asarray(Image.open(p)) for p in paths],
                   [Image.open(p) for p in paths], np.stack([np.asarray(Image.open(p)) for p in paths])[..., None]
                   .repeat(3, axis=-1)):
        table = model.predict(images)
        assert table.path.isna().all() and list(table.pred) == list(from_files.pred)
        np.testing.assert_allclose(table.prob_PNEUMONIA, from_files.prob_PNEUMONIA, atol=1e-5)
    one = model.predict(Image.open(paths[0]))
    assert len(one) == 1 and one.prob_PNEUMONIA[0] == pytest.approx(from_files.prob_PNEUMONIA[0], abs=1e-5)


def test_predict_refuses_a_missing_file_and_an_unknown_item(model, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        model.predict([tmp_path / "missing.png"])
    with pytest.raises(ConfigError, match="item of type int"):
        model.predict([np.zeros((8, 8), np.uint8), 3])
    with pytest.raises(ConfigError, match=r"array of shape \(5,\)"):
        model.predict(np.zeros(5))


def test_evaluate_on_a_dataframe_is_the_evaluate_commands_folder(trained, model, frame, tmp_path):
    _, cache = trained
    evaluation = model.evaluate(frame, out=tmp_path / "external", bootstrap=50, cache_dir=cache, quiet=True)
    assert isinstance(evaluation, Evaluation)
    assert evaluation.metrics == json.loads((tmp_path / "external" / "metrics.json").read_text())
    assert evaluation.metrics["test"]["n"] == int((frame.split == "test").sum())  # the data's test split
    assert evaluation.report.is_file() and len(evaluation.predictions) == evaluation.metrics["test"]["n"]
    assert f"{evaluation.metrics['test']['auc']:.3f} (95% CI" in evaluation._repr_html_()


def test_explain_gives_the_map_the_explain_command_writes(trained, model, tmp_path):
    image = Path(pd.read_csv(trained[0].run / "split.csv").query("split == 'test'").path.iloc[0])
    explanation = model.explain(image)
    heatmap, overlay = explanation
    assert isinstance(explanation, Explanation) and heatmap.shape == (48, 48) and heatmap.dtype == np.float32
    assert overlay.height > 48 and explanation.image.shape == (48, 48) and explanation._repr_png_()[:4] == b"\x89PNG"
    assert invoke(["explain", image, "--run", trained[0].run, "--out", tmp_path]) == 0
    np.testing.assert_allclose(heatmap, np.load(tmp_path / f"{image.stem}_gradcam.npy"), atol=1e-5)
    assert model.explain(Image.open(image), method="layercam").heatmap.shape == (48, 48)
    with pytest.raises(ConfigError, match="finding is for multi-label models"):
        model.explain(image, finding="PNEUMONIA")


def test_the_model_shows_how_it_decides(model):
    html = model._repr_html_()
    for text in ("resnet18", "single-label", "NORMAL, PNEUMONIA", f"{model.saved.threshold:.3f} on p(PNEUMONIA)",
                 "Test-time augmentation", "OOD guard"):
        assert text in html and text in repr(model)


def test_a_multilabel_dataframe_trains_and_predicts_per_finding(tmp_path):
    from tests.e2e.test_multilabel import FINDINGS, write_nih_style

    entries = pd.read_csv(write_nih_style(tmp_path / "nih", patients=28))
    frame = pd.DataFrame({
        "path": [str(next((tmp_path / "nih").rglob(name))) for name in entries["Image Index"]],
        "labels": [[] if text == "No Finding" else text.split("|") for text in entries["Finding Labels"]],
        "patient_id": entries["Patient ID"].astype(str),
    })
    result = medtransfer.train(frame, tmp_path / "run", cache_dir=tmp_path / "cache", quiet=True,
                               **{**TINY, "image_size": 40, "cache_size": 48})
    assert result.task == "multi-label" and result.metrics["test"]["task"] == "multi-label"
    html = result._repr_html_()
    for finding, entry in result.metrics["test"]["findings"].items():
        assert f"<th scope=\"row\">test</th><td>{finding}</td>" in html
        if "auc" in entry:
            assert f"{entry['auc']:.3f}" in html
    table = result.load().predict(frame.path[:4])
    assert list(table.columns[1:]) == [*(f"prob_{f}" for f in FINDINGS), *(f"pred_{f}" for f in FINDINGS), "findings",
                                       "ood_score", "ood"]
    explanation = result.load().explain(frame.path[0], finding="Mass")
    assert explanation.target == "Mass" and explanation.heatmap.shape == (40, 40)
