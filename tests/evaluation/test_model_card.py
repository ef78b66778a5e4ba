"""MODEL_CARD.md (medtransfer.evaluation.model_card): the sections of Mitchell et al. (2019), the report's
figures with their intervals, thresholds per finding, and nothing that names a machine, a user or a patient.

The run folders are the report tests' fixtures (tests/evaluation/test_report.py, test_report_multilabel.py),
with a model/model.json, a split.csv and a config.yaml whose data path is absolute."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from medtransfer.evaluation import html as h
from medtransfer.evaluation.model_card import CARD_FILE, SECTIONS, model_card, write_model_card
from medtransfer.rundir import RunDir
from tests.evaluation.test_report import _metrics, make_run
from tests.evaluation.test_report_multilabel import FINDINGS, make_multilabel_run

HOME = "/home/alice/datasets"
ABSOLUTE = re.compile(r"(?<![\w.])(?:/|~/|[A-Za-z]:\\)[^\s/]+[/\\]")


def _config(root: Path, data: str) -> None:
    config = {"data": data, "cache_dir": "/home/alice/.cache/medtransfer", "backbone": "resnet18", "epochs": 5,
              "batch_size": 32, "lr": 0.001, "labels": "folder", "calibrate": "temperature", "keep_identifiers": False}
    (root / "config.yaml").write_text(yaml.safe_dump(config))


def _split_csv(root: Path, data: str, rows: list[tuple[str, str, str, str]]) -> None:
    lines = ["path,label,patient_id,split"] + [f"{data}/{path},{label},{patient},{split}" for path, label, patient, split in rows]
    (root / "split.csv").write_text("\n".join(lines) + "\n")


def _model_json(root: Path, **fields) -> None:
    (root / "model").mkdir(parents=True, exist_ok=True)
    info = {"format_version": 1, "backbone": "resnet18", "image_size": 224, "decode_size": 256, "eval_crop_fraction": 0.875,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "in_channels": 3, "threshold_policy": "youden",
            "strategy": "freeze", "head": "linear", "tta": "none",
            "versions": {"medtransfer": "0.2.0", "torch": "2.5.0"}, **fields}
    (root / "model" / "model.json").write_text(json.dumps(info))


def _single(root: Path, metrics: dict | None = None) -> Path:
    make_run(root, metrics=metrics if metrics is not None else _metrics(), plots=[])
    data = f"{HOME}/chest_xray"
    _config(root, data)
    _split_csv(root, data, [("train/NORMAL/IM-0117-0001.jpeg", "NORMAL", "IM-0117", "train"),
                            ("test/PNEUMONIA/person1_virus_6.jpeg", "PNEUMONIA", "person1", "test")])
    _model_json(root, classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", threshold=0.437, temperature=1.734)
    (root / "model" / "ood.json").write_text(json.dumps({"version": 2, "method": "knn", "accept_fraction": 0.95}))
    return root


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, str]:
    root = _single(tmp_path_factory.mktemp("card") / "resnet18")
    return root, write_model_card(root).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> tuple[Path, str]:
    root = make_multilabel_run(tmp_path_factory.mktemp("card_ml") / "nih_run")
    data = f"{HOME}/nih/Data_Entry.csv"
    _config(root, data)
    _split_csv(root, f"{HOME}/nih/images", [("00000001_000.png", "Effusion|Mass", "1", "train")])
    point = json.loads((root / "metrics.json").read_text())["operating_point"]
    _model_json(root, task="multi-label", classes=list(FINDINGS), thresholds=list(point["thresholds"].values()),
                temperatures=list(point["temperatures"].values()))
    return root, write_model_card(root).read_text(encoding="utf-8")


def _no_identifiers(root: Path, text: str) -> None:
    assert str(root.resolve()) not in text and str(root.parent) not in text
    assert not ABSOLUTE.search(text), ABSOLUTE.search(text)
    assert "alice" not in text and HOME not in text


@pytest.mark.parametrize("run", ["single", "multi"])
def test_every_section_is_present_in_order(run, request):
    root, text = request.getfixturevalue(run)
    positions = [text.index(f"\n## {title}\n") for title in SECTIONS]
    assert positions == sorted(positions)
    assert text.startswith(f"# Model card: {root.name}\n")
    assert (root / CARD_FILE).is_file() and not list(root.glob(".*.tmp*"))  # written atomically, nothing left behind


@pytest.mark.parametrize("run", ["single", "multi"])
def test_no_absolute_path_user_name_or_patient_id(run, request):
    root, text = request.getfixturevalue(run)
    _no_identifiers(root, text)
    for patient in ("IM-0117", "person1", "00000001"):
        assert patient not in text


def test_single_label_card_shows_the_reports_figures(single):
    root, text = single
    metrics = RunDir(root).metrics()
    figures = _section(text, "Quantitative analyses")
    for split in (metrics.val, metrics.test):
        for key in ("auc", "sensitivity", "specificity"):
            assert h.split_value(split, key) in figures
    assert "0.962 (95% CI 0.948–0.975)" in figures  # the report's rounding and dash
    details = _section(text, "Model details")
    assert "resnet18" in details and "freeze" in details and "NORMAL, PNEUMONIA" in details and "bf16-mixed" in details
    assert "| Best epoch (lowest val loss) | 2 |" in details and "medtransfer 0.2.0" in details
    assert "chest_xray" in _section(text, "Factors") and ".jpeg (2)" in _section(text, "Factors")
    assert "0.437" in _section(text, "Threshold provenance") and "youden" in _section(text, "Threshold provenance")
    calibration = _section(text, "Calibration")
    assert "1.734" in calibration and "0.0812" in calibration and "0.0231" in calibration
    assert "624 images, 524 patients" in _section(text, "Evaluation data")
    training = _section(text, "Training data")
    assert "| Train | PNEUMONIA | 40 | 18 |" in training and "patient-level" in training
    caveats = _section(text, "Caveats and recommendations")
    assert "OOD guard" in caveats and "knn" in caveats and "not localisation evidence" in caveats
    assert "not a diagnostic device" in _section(text, "Intended use")


def test_multilabel_card_shows_each_finding_with_its_auc_and_threshold(multi):
    root, text = multi
    metrics = json.loads((root / "metrics.json").read_text())
    figures = _section(text, "Quantitative analyses")
    test = metrics["test"]
    assert h.format_with_ci(test["macro_auc"], test["macro_auc_ci"], confidence=test.get("confidence", 0.95)) in figures
    for finding, entry in test["findings"].items():
        if h.is_number(entry.get("auc")):
            assert h.format_with_ci(entry["auc"], entry.get("auc_ci"), confidence=test.get("confidence", 0.95)) in figures
        else:
            assert re.search(rf"\| {finding} \|[^\n]*no AUC", figures)
    provenance = _section(text, "Threshold provenance")
    for finding, threshold in metrics["operating_point"]["thresholds"].items():
        assert f"| {finding} | {h.format_number(threshold)} |" in provenance
    for finding, temperature in metrics["operating_point"]["temperatures"].items():
        assert f"| {finding} | {h.format_number(temperature)} |" in _section(text, "Calibration")
    assert "multi-label" in _section(text, "Model details") and "Data_Entry.csv" in _section(text, "Factors")
    assert "| Test | No Finding |" in _section(text, "Training data")
    assert "No OOD guard" in _section(text, "Caveats and recommendations")


def test_a_run_without_a_test_split(tmp_path):
    metrics = _metrics()
    metrics["test"] = None
    metrics["data_summary"].pop("test")
    root = _single(tmp_path / "no_test", metrics)
    text = model_card(root)
    assert all(f"\n## {title}\n" in text for title in SECTIONS)
    assert "No test split" in _section(text, "Evaluation data")
    assert "| Metric | Validation |\n" in _section(text, "Quantitative analyses")
    assert "every figure is a validation figure" in _section(text, "Caveats and recommendations")
    _no_identifiers(root, text)


def test_shift_cross_validation_and_sparse_documents(tmp_path):
    metrics = _metrics()
    metrics["shift"] = {"verdict": "appearance shift: label 200 images and run recalibrate"}
    metrics["cross_validation"] = {"folds": 5, "pooled_images": 1600, "per_fold": {"auc": {"mean": 0.95, "sd": 0.01}}}
    metrics["ensemble"] = {"members": [{"run": "/home/alice/runs/cv/folds/fold-1", "fold": 1}]}
    root = _single(tmp_path / "cv", metrics)
    text = model_card(root)
    assert "appearance shift" in _section(text, "Caveats and recommendations")
    assert "Out-of-fold (pooled validation)" in _section(text, "Quantitative analyses")
    assert "0.950 ± 0.010" in text and "pooled out-of-fold predictions" in _section(text, "Threshold provenance")
    _no_identifiers(root, text)

    sparse = tmp_path / "sparse"  # metrics.json alone, an older document: stated, never guessed
    sparse.mkdir()
    (sparse / "metrics.json").write_text(json.dumps({"backbone": "resnet18", "val": copy.deepcopy(_metrics()["val"])}))
    text = model_card(sparse)
    assert all(f"\n## {title}\n" in text for title in SECTIONS) and "not recorded" in text
