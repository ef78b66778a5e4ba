"""Tests for the run-folder contract (medtransfer.rundir)."""

from __future__ import annotations

import json
import os
import re
import stat

import numpy as np
import pytest
import yaml

from medtransfer.errors import DataError
from medtransfer.rundir import METRIC_KEYS, RunDir, RunMetrics, SplitMetrics, write_metrics, write_text_atomic

# The example of DESIGN.md, "The run directory": what the first versions wrote.
OLD_METRICS = {
    "backbone": "resnet18", "strategy": "freeze", "weights": "imagenet",
    "params": {"total": 11177538, "trainable": 11168002},
    "epochs_run": 12, "best_epoch": 7, "stopped_early": True, "train_seconds": 812.4,
    "positive_class": "PNEUMONIA", "threshold": 0.5,
    "val": {"n": 1043, "auc": 0.99, "accuracy": 0.97, "sensitivity": 0.98, "specificity": 0.95,
            "precision": 0.98, "f1": 0.98, "confusion_matrix": [[260, 14], [15, 754]]},
    "test": {"n": 624, "auc": 0.96, "accuracy": 0.9, "sensitivity": 0.97, "specificity": 0.8,
             "precision": 0.89, "f1": 0.93, "confusion_matrix": [[187, 47], [12, 378]]},
}


def _split(auc: float) -> dict:
    """A split block in the order the evaluation writes it, with every optional part."""
    block = {
        "n": 624, "n_positive": 390, "auc": auc, "average_precision": 0.97, "accuracy": 0.92, "sensitivity": 0.96,
        "specificity": 0.85, "precision": 0.91, "npv": 0.94, "f1": 0.94, "threshold": 0.437,
        "confusion_matrix": [[200, 34], [12, 378]],
    }
    block["at_0.5"] = {**block, "threshold": 0.5}
    block["calibration"] = {"temperature": 1.7, "ece_before": 0.08, "ece_after": 0.02, "brier_before": 0.07, "brier_after": 0.05}
    block["patients"] = 524
    block.update({f"{m}_ci": [auc - 0.01, min(auc + 0.01, 1.0)] for m in METRIC_KEYS})
    block.update(n_resamples=1000, n_valid={m: 1000 for m in METRIC_KEYS}, confidence=0.95, n_groups=524)
    return block


def current_metrics() -> dict:
    """What today's training pipeline writes: DESIGN.md's keys first, then the added ones."""
    return {
        **{k: v for k, v in OLD_METRICS.items() if k not in ("val", "test")},
        "val": _split(0.99), "test": _split(0.962),
        "classes": ["NORMAL", "PNEUMONIA"], "threshold_policy": "youden", "total_seconds": 900.1,
        "precision": "bf16-mixed", "leakage": {"clean": True, "shared_patients": 0, "duplicate_images": 0, "examples": []},
        "data_summary": {"test": {"NORMAL": {"images": 234, "patients": 200}}},
    }


def test_current_metrics_round_trip_exactly_with_key_order(tmp_path):
    document = current_metrics()
    path = write_metrics(tmp_path, document)
    assert path == tmp_path / "metrics.json"
    assert path.read_text() == json.dumps(document, indent=2) + "\n"
    metrics = RunDir(tmp_path).metrics()
    assert metrics.to_dict() == document and list(metrics.to_dict()) == list(document)
    assert list(metrics.test.to_dict()) == list(document["test"])
    assert metrics.test.interval("auc") == pytest.approx((0.952, 0.972))
    assert metrics.test.at_half.threshold == 0.5 and metrics.test.cell(0, 1) == 34
    assert metrics.headline[0] == "test" and list(metrics.splits) == ["val", "test"]


def test_typed_metrics_write_as_the_same_document():
    typed = RunMetrics.from_dict(current_metrics())
    assert RunMetrics.from_dict(typed.to_dict()) == typed
    assert isinstance(typed.test, SplitMetrics) and typed.params["trainable"] == 11168002


def test_old_metrics_json_still_reads(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(OLD_METRICS))
    metrics = RunDir(tmp_path).metrics()
    assert metrics.test.auc == 0.96 and metrics.test.average_precision is None and metrics.test.npv is None
    assert metrics.test.interval("auc") is None and metrics.classes is None and metrics.test.at_half is None
    assert metrics.best_epoch == 7 and metrics.stopped_early is True
    assert metrics.to_dict() == OLD_METRICS


def test_unknown_keys_are_kept_and_written_after_the_known_ones(tmp_path):
    document = {"future_key": {"a": 1}, **OLD_METRICS, "test": {**OLD_METRICS["test"], "new_metric": 0.5, "mcc_ci": [0, 1]}}
    metrics = RunMetrics.from_dict(document)
    assert metrics.extra == {"future_key": {"a": 1}}
    assert metrics.test.extra == {"new_metric": 0.5, "mcc_ci": [0, 1]}
    written = json.loads(write_metrics(tmp_path, metrics).read_text())
    assert written == document and list(written)[-1] == "future_key"


def test_a_run_without_test_split_keeps_test_null_and_an_evaluation_has_no_val():
    run = {**OLD_METRICS, "test": None}
    assert RunMetrics.from_dict(run).to_dict() == run
    evaluation = {"run": "runs/a", "data": "/ext", "split": "test", "positive_class": "PNEUMONIA", "test": OLD_METRICS["test"]}
    written = RunMetrics.from_dict(evaluation).to_dict()
    assert written == evaluation and "val" not in written
    assert list(written) == ["positive_class", "test", "run", "data", "split"]  # DESIGN.md's keys first


def test_whole_numbers_written_as_floats_by_an_older_writer_read_as_counts():
    metrics = RunMetrics.from_dict({**OLD_METRICS, "epochs_run": 12.0})
    assert metrics.epochs_run == 12 and isinstance(metrics.epochs_run, int)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"threshold": "high"}, "threshold must be a number; got 'high'"),
        ({"test": {"auc": "0.9"}}, "test.auc must be a number; got '0.9'"),
        ({"test": {"auc_ci": [0.9]}}, "test.auc_ci must be [lo, hi]; got [0.9]"),
        ({"test": {"confusion_matrix": [[1, 2], [3, "x"]]}}, "test.confusion_matrix must be a whole number; got 'x'"),
        ({"test": {"at_0.5": {"n": 1.5}}}, "test.at_0.5.n must be a whole number; got 1.5"),
        ({"val": [1, 2]}, "val must be a JSON object; got list"),
        ({"stopped_early": "yes"}, "stopped_early must be a bool; got 'yes'"),
    ],
)
def test_malformed_values_name_the_file_and_the_key(tmp_path, change, message):
    (tmp_path / "metrics.json").write_text(json.dumps({**OLD_METRICS, **change}))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'metrics.json'}: {message}")):
        RunDir(tmp_path).metrics()


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no metrics.json"), ("{not json", "metrics.json: run metrics is not valid JSON"), ("[1, 2]", "must be a JSON object; got list")],
)
def test_missing_or_unreadable_metrics_name_the_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / "metrics.json").write_text(content)
    with pytest.raises(DataError, match=re.escape(str(tmp_path)) + ".*" + re.escape(message)):
        RunDir(tmp_path).metrics()


def test_a_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope'}: not a folder")):
        RunDir(tmp_path / "nope").metrics()


def test_write_metrics_refuses_a_document_that_would_not_read_back(tmp_path):
    with pytest.raises(DataError, match="test.auc must be a number"):
        write_metrics(tmp_path, {**OLD_METRICS, "test": {"auc": "x"}})
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # a normal file, not mkstemp's 0600


def test_a_failed_atomic_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_config_split_and_history(tmp_path):
    run = RunDir(tmp_path)
    assert run.config() is None and run.split() is None and run.history() == []
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"backbone": "resnet18", "lr": 0.001}))
    (tmp_path / "split.csv").write_text("path,label,patient_id,split\na.png,NORMAL,p1,train\nb.png,PNEUMONIA,p2,\n")
    (tmp_path / "history.csv").write_text("epoch,train_loss,val_loss,lr\n1,0.6,0.5,0.001\n2,0.4,,0.0005\n")
    assert run.config() == {"backbone": "resnet18", "lr": 0.001}
    assert [(r.path, r.patient_id, r.split) for r in run.split()] == [("a.png", "p1", "train"), ("b.png", "p2", None)]
    assert run.history() == [
        {"epoch": 1.0, "train_loss": 0.6, "val_loss": 0.5, "lr": 0.001},
        {"epoch": 2.0, "train_loss": 0.4, "val_loss": None, "lr": 0.0005},
    ]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("config.yaml", "a: [1,\n", "config.yaml: not valid YAML"),
        ("config.yaml", "- 1\n- 2\n", "config.yaml: must hold a mapping of setting: value; got list"),
        ("split.csv", "path,label\na.png,x\n", "split.csv: missing column(s) patient_id, split"),
        ("history.csv", "epoch,val_loss\n1,low\n", "history.csv, line 2: val_loss must be a number; got 'low'"),
    ],
)
def test_malformed_documents_name_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    run = RunDir(tmp_path)
    reader = {"config.yaml": run.config, "split.csv": run.split, "history.csv": run.history}[name]
    with pytest.raises(DataError, match=re.escape(str(tmp_path / name) + message[len(name) :])):
        reader()


def test_predictions_of_a_run_and_of_an_evaluation(tmp_path):
    header = "path,label,prob_NORMAL,prob_PNEUMONIA,pred,patient_id\n"
    (tmp_path / "predictions_test.csv").write_text(header + "a.png,NORMAL,0.8,0.2,NORMAL,p1\nb.png,PNEUMONIA,0.1,0.9,PNEUMONIA,p2\n")
    run = RunDir(tmp_path).predictions("test")
    assert run.classes == ("NORMAL", "PNEUMONIA") and len(run) == 2 and run.patient_ids == ["p1", "p2"]
    np.testing.assert_allclose(run.probability("PNEUMONIA"), [0.2, 0.9])
    assert RunDir(tmp_path).predictions("val") is None
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "predictions.csv").write_text("path,label,prob_A,prob_B\nx.png,A,0.5,0.5\n")
    found = RunDir(evaluation).predictions()
    assert found.file.name == "predictions.csv" and found.patient_ids is None and found.predicted is None
    with pytest.raises(DataError, match=re.escape(f"{evaluation / 'predictions.csv'}: missing column(s) prob_C")):
        found.probability("C")


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("a.png,NORMAL,0.5\na.png,NORMAL,0.4\n", "line 3: image a.png appears twice"),
        ("a.png,NORMAL,high\n", "line 2: prob_NORMAL must be a number; got 'high'"),
        ("a.png,NORMAL,nan\n", "line 2: prob_NORMAL must be finite"),
    ],
)
def test_malformed_predictions_name_the_file_and_line(tmp_path, rows, message):
    (tmp_path / "predictions_test.csv").write_text("path,label,prob_NORMAL\n" + rows)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'predictions_test.csv'}, {message}")):
        RunDir(tmp_path).predictions()


def test_model_json_gallery_and_plots(tmp_path):
    run = RunDir(tmp_path)
    assert run.model_json() is None and run.gallery() is None and run.plots() == [] and run.plot("x.png") is None
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text('{"classes": ["a", "b"]}')
    (tmp_path / "gallery.json").write_text("{broken")
    (tmp_path / "plots").mkdir()
    for name in ("b.png", "a.png"):
        (tmp_path / "plots" / name).write_bytes(b"")
    assert run.model_json() == {"classes": ["a", "b"]}
    assert [p.name for p in run.plots()] == ["a.png", "b.png"] and run.plot("a.png") == tmp_path / "plots" / "a.png"
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'gallery.json'}: CAM gallery is not valid JSON")):
        run.gallery()


def test_split_value_accessors_reject_unknown_metric_names():
    with pytest.raises(KeyError, match="not a split metric"):
        SplitMetrics().value("mcc")
