"""Tests for the single-file HTML report (medtransfer.evaluation.report)."""

from __future__ import annotations

import base64
import copy
import html.parser
import io
import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image
from rich.console import Console

from medtransfer.errors import DataError
from medtransfer.evaluation.report import SECTION_IDS, write_report

DATA_URI = "data:image/png;base64,"
RUN_PLOTS = [
    "history.png",
    *[f"{split}_{kind}.png" for split in ("val", "test") for kind in ("roc", "pr", "confusion", "calibration")],
]


def _split(n: int, positives: int, auc: float, *, ci: bool = True) -> dict:
    tn, fp, fn, tp = 200, 34, 12, positives - 12
    result = {
        "n": n,
        "n_positive": positives,
        "auc": auc,
        "average_precision": 0.971,
        "accuracy": 0.9263,
        "sensitivity": 0.9692,
        "specificity": 0.8547,
        "precision": 0.9175,
        "npv": 0.9434,
        "f1": 0.9426,
        "threshold": 0.437,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "at_0.5": {
            "n": n, "n_positive": positives, "auc": auc, "average_precision": 0.971, "accuracy": 0.901,
            "sensitivity": 0.98, "specificity": 0.77, "precision": 0.88, "npv": 0.95, "f1": 0.93,
            "threshold": 0.5, "confusion_matrix": [[180, 54], [8, positives - 8]],
        },
        "calibration": {"temperature": 1.734, "ece_before": 0.0812, "ece_after": 0.0231, "brier_before": 0.071, "brier_after": 0.055},
        "patients": n - 100,
    }
    if ci:
        result.update(
            {
                "auc_ci": [0.948, 0.975],
                "accuracy_ci": [0.905, 0.944],
                "sensitivity_ci": [0.95, 0.985],
                "specificity_ci": [0.81, 0.893],
                "precision_ci": [0.89, 0.94],
                "npv_ci": [0.91, 0.97],
                "f1_ci": [0.925, 0.958],
                "average_precision_ci": [0.955, 0.984],
                "n_resamples": 1000,
                "confidence": 0.95,
                "n_groups": n - 100,
            }
        )
    return result


def _metrics(classes=("NORMAL", "PNEUMONIA")) -> dict:
    negative, positive = classes
    return {
        "backbone": "resnet18",
        "strategy": "freeze",
        "weights": "imagenet",
        "params": {"total": 11177538, "trainable": 11168002},
        "epochs_run": 3,
        "best_epoch": 2,
        "stopped_early": True,
        "train_seconds": 812.4,
        "positive_class": positive,
        "threshold": 0.437,
        "val": _split(1043, 770, 0.991),
        "test": _split(624, 390, 0.962),
        "threshold_policy": "youden",
        "precision": "bf16-mixed",
        "leakage": {"clean": True, "shared_patients": 0, "duplicate_images": 0, "examples": []},
        "ood": {"method": "knn", "threshold": 0.41, "flagged": 24, "flagged_fraction": 24 / 624,
                "test_without_flagged": _split(600, 380, 0.971)},
        "data_summary": {
            split: {negative: {"images": 10 * k, "patients": 7 * k}, positive: {"images": 20 * k, "patients": 9 * k}}
            for k, split in enumerate(("test", "train", "val"), start=1)
        },
    }


def _png(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), colour).save(path, format="PNG")


def _history(path: Path) -> None:
    path.write_text(
        "epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds\n"
        "1,0.61,0.71,0.52,0.78,0.001,12.3\n"
        "2,0.41,0.83,0.35,0.88,0.0009,11.9\n"
        "3,0.33,0.87,0.39,0.86,0.0005,12.1\n"
    )


def make_run(root: Path, *, metrics: dict | None = None, training: bool = True, plots=RUN_PLOTS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "metrics.json").write_text(json.dumps(metrics if metrics is not None else _metrics(), indent=2))
    if training:
        config = {"data": "/data/chest_xray", "backbone": "resnet18", "lr": 0.001, "image_size": 224, "patient_regex": None}
        (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        _history(root / "history.csv")
    for name in plots:
        _png(root / "plots" / name)
    return root


def sections(text: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)">', text)


class _Parser(html.parser.HTMLParser):
    """Collects every URL-bearing attribute and counts open/close tags."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts += 1
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "action", "data") and value is not None:
                self.urls.append(value)


def parse(text: str) -> _Parser:
    parser = _Parser()
    parser.feed(text)
    return parser


def test_full_run_report_has_every_section_and_is_self_contained(tmp_path):
    run = make_run(tmp_path / "run")
    gallery = [f"plots/gallery/case{i}.png" for i in range(2)]
    for item in gallery:
        _png(run / item, colour=(10, 200, 10))
    (run / "gallery.json").write_text(
        json.dumps({"sections": [{"title": "Test: true positives", "items": [{"image": p, "caption": f"case {p}"} for p in gallery]}]})
    )
    out = io.StringIO()
    path = write_report(run, console=Console(file=out, width=500))

    assert path == run / "report.html" and path.is_file()
    assert out.getvalue().strip() == f"Report: {path}"
    text = path.read_text(encoding="utf-8")
    shown = [s for s in SECTION_IDS if s not in ("shift", "shortcut-check")]  # the shift summary belongs to `evaluate` on an external set
    assert sections(text) == shown
    for section_id in shown:
        assert re.search(rf'<section id="{section_id}">\s*<h2>', text)
    assert "0.962 (95% CI 0.948\u20130.975)" in text  # test AUC with its interval
    assert "0.991 (95% CI 0.948\u20130.975)" in text  # validation AUC
    assert "24 image(s) (3.8%) do not look like the training data" in text and "Without flagged images" in text
    parser = parse(text)
    assert parser.scripts == 0
    assert not re.search(r"https?://", text)
    assert all(url.startswith(("data:", "#")) for url in parser.urls), parser.urls
    assert text.count(DATA_URI) == len(RUN_PLOTS) + len(gallery)
    assert "url(" not in text  # no CSS fetches either
    assert "youden" in text and "PNEUMONIA" in text and "11,177,538" in text and "13 min 32 s" in text
    assert "Leakage check passed" in text


def test_metrics_section_reports_both_thresholds_and_confusion_counts(tmp_path):
    text = write_report(make_run(tmp_path / "run")).read_text()
    metrics = text[text.index('<section id="metrics">') : text.index('<section id="curves">')]
    assert "Test @ 0.437 (chosen)" in metrics and "Test @ 0.5" in metrics
    assert "0.901" in metrics  # accuracy at 0.5
    assert "<td>34</td>" in metrics  # FP at the chosen threshold
    calibration = text[text.index('<section id="calibration">') :]
    assert "1.734" in calibration and "0.0812" in calibration and "0.0231" in calibration


def test_evaluation_directory_without_training_files(tmp_path):
    metrics = _metrics()
    for key in ("epochs_run", "best_epoch", "stopped_early", "train_seconds", "params", "data_summary", "leakage"):
        del metrics[key]
    plots = [f"test_{kind}.png" for kind in ("roc", "pr", "confusion", "calibration")]
    run = make_run(tmp_path / "eval", metrics=metrics, training=False, plots=plots)
    (run / "predictions_test.csv").write_text("path,label,patient_id,prob_NORMAL,prob_PNEUMONIA,pred\n")
    text = write_report(run, title="External test set").read_text()
    assert sections(text) == [s for s in SECTION_IDS if s not in ("explanations", "shift", "shortcut-check")]
    assert "<title>External test set</title>" in text
    assert "No training history" in text and "No config.yaml" in text
    assert text.count(DATA_URI) == len(plots)


def test_run_without_test_split_reports_validation(tmp_path):
    metrics = _metrics()
    metrics["test"] = None
    plots = ["history.png", *[f"val_{kind}.png" for kind in ("roc", "pr", "confusion", "calibration")]]
    text = write_report(make_run(tmp_path / "run", metrics=metrics, plots=plots)).read_text()
    assert "Validation split (this run has no test split)" in text
    assert "0.991 (95% CI 0.948\u20130.975)" in text
    assert "Test @" not in text
    assert text.count(DATA_URI) == len(plots)


def test_values_without_intervals_are_shown_plainly(tmp_path):
    metrics = _metrics()
    metrics["test"] = _split(624, 390, 0.962, ci=False)
    text = write_report(make_run(tmp_path / "run", metrics=metrics)).read_text()
    assert "<td>0.962</td>" in text


@pytest.mark.parametrize(
    ("classes", "shown"),
    [
        (("NORMAL", "PNEUMONIA"), True),
        (("benign", "malignant"), False),
        (("NORMAL", "TUBERCULOSIS"), False),
    ],
)
def test_published_table_only_for_the_pneumonia_task(tmp_path, classes, shown):
    text = write_report(make_run(tmp_path / "run", metrics=_metrics(classes))).read_text()
    assert ('<section id="published">' in text) is shown
    assert ("not computed by this run" in text) is shown
    assert ("Kermany et al. 2018" in text) is shown
    if shown:
        assert "Published results, official Kaggle/Kermany test split; not computed by this run" in text
        assert "92.8%" in text and "0.968" in text and "81.3%" in text and "0.991" in text


def test_published_table_absent_for_three_classes(tmp_path):
    metrics = _metrics()
    metrics["data_summary"]["train"]["BACTERIA"] = {"images": 1, "patients": 1}
    text = write_report(make_run(tmp_path / "run", metrics=metrics)).read_text()
    assert '<section id="published">' not in text


def test_text_from_the_data_is_escaped(tmp_path):
    metrics = _metrics(("NORMAL", "<b>bold</b>"))
    metrics["leakage"] = {"clean": False, "shared_patients": 1, "duplicate_images": 0, "examples": ["p<script>1 in train+val"]}
    run = make_run(tmp_path / "run", metrics=metrics)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": "<img src=x onerror=alert(1)>"}))
    text = write_report(run, title="<i>title</i>").read_text()
    assert "<b>bold</b>" not in text and "&lt;b&gt;bold&lt;/b&gt;" in text
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "<script>" not in text and "p&lt;script&gt;1 in train+val" in text
    assert "<i>title</i>" not in text
    assert "Leakage check failed" in text


def test_multiclass_per_class_table(tmp_path):
    metrics = _metrics()
    names = ["NORMAL", "BACTERIA", "VIRUS"]
    multi = {
        "n": 624,
        "accuracy": 0.81,
        "macro_auc": 0.9,
        "macro_f1": 0.77,
        "per_class": {c: {"auc": 0.9, "sensitivity": 0.8, "precision": 0.7, "f1": 0.75, "support": 208} for c in names},
        "confusion_matrix": [[200, 4, 4], [10, 150, 48], [5, 50, 153]],
    }
    metrics["val"]["multiclass"] = copy.deepcopy(multi)
    metrics["test"]["multiclass"] = multi
    metrics["positive_class"] = "BACTERIA"
    text = write_report(make_run(tmp_path / "run", metrics=metrics)).read_text()
    assert "macro AUC 0.900" in text and "<th>AUC (one-vs-rest)</th>" in text and "<td>153</td>" in text
    assert '<section id="published">' not in text  # three classes from the multiclass table


def test_gallery_image_outside_the_run_is_not_embedded(tmp_path):
    outside = tmp_path / "secret.png"
    _png(outside)
    run = make_run(tmp_path / "run", plots=[])
    (run / "gallery.json").write_text(
        json.dumps({"sections": [{"title": "T", "items": [{"image": "../secret.png", "caption": "x"}, {"image": "missing.png", "caption": "y"}]}]})
    )
    text = write_report(run).read_text()
    assert '<section id="explanations">' in text
    assert DATA_URI not in text
    assert "not a file inside the run directory" in text and "missing.png does not exist" in text


def test_unknown_plots_are_still_embedded_once(tmp_path):
    run = make_run(tmp_path / "run", plots=[*RUN_PLOTS, "test_roc_classes.png", "extra_figure.png"])
    text = write_report(run).read_text()
    assert text.count(DATA_URI) == len(RUN_PLOTS) + 2
    assert '<section id="other-figures">' in text


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no metrics.json"), ("{not json", "not valid JSON"), ("[1, 2]", "JSON object")],
)
def test_bad_metrics_raise_data_error(tmp_path, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.json").write_text(content)
    with pytest.raises(DataError, match=message):
        write_report(run)


def test_malformed_gallery_raises_data_error(tmp_path):
    run = make_run(tmp_path / "run", plots=[])
    (run / "gallery.json").write_text(json.dumps({"items": []}))
    with pytest.raises(DataError, match="gallery.json"):
        write_report(run)


def _section(text: str, section_id: str) -> str:
    start = text.index(f'<section id="{section_id}">')
    return text[start : text.index("</section>", start)]


def test_first_screen_shows_key_figures_roc_with_operating_point_and_confusion_matrix(tmp_path):
    run = make_run(tmp_path / "run")
    _png(run / "plots" / "test_roc.png", colour=(1, 2, 3))  # distinct bytes: find this very image
    roc_uri = DATA_URI + base64.b64encode((run / "plots" / "test_roc.png").read_bytes()).decode("ascii")
    text = write_report(run).read_text()
    assert sections(text)[0] == "summary"
    summary = _section(text, "summary")
    assert "0.962 (95% CI 0.948\u20130.975)" in summary and "0.969 (95% CI 0.950\u20130.985)" in summary
    assert summary.count(DATA_URI) == 1 and roc_uri in summary
    assert "the dot marks the operating point at threshold 0.437 (sensitivity 0.969, specificity 0.855)" in summary
    assert "<th>predicted PNEUMONIA</th>" in summary
    assert '<th scope="row">true NORMAL</th><td>200</td><td>34</td>' in summary
    assert '<th scope="row">true PNEUMONIA</th><td>12</td><td>378</td>' in summary
    assert summary.index("table") < summary.index(roc_uri)  # figures left, curve right
    assert text.count(roc_uri) == 1  # the curves section does not repeat it
    curves = _section(text, "curves")
    assert "Validation: ROC curve" in curves and "Test: ROC curve" not in curves


def test_configuration_is_folded_and_training_curves_span_the_page(tmp_path):
    text = write_report(make_run(tmp_path / "run")).read_text()
    configuration = _section(text, "configuration")
    assert re.search(r"<details><summary>[^<]*5 settings from config.yaml</summary><table class=\"config\">", configuration)
    assert "<details open" not in text
    training = _section(text, "training")
    assert '<div class="figures wide"><figure>' in training
    assert "<details><summary>Values per epoch (3 epochs)</summary>" in training
    assert '<tr class="best"><td>2</td>' in training and "<td>9.00e-04</td>" in training


def test_evaluation_report_names_what_was_evaluated(tmp_path):
    metrics = {"run": "runs/a", "data": "/external/set", "split": "test", "positive_class": "PNEUMONIA",
               "threshold": 0.437, "test": _split(624, 390, 0.962)}
    run = make_run(tmp_path / "eval", metrics=metrics, training=False, plots=[])
    (run / "predictions.csv").write_text("path,label,patient_id,prob_NORMAL,prob_PNEUMONIA,pred\n")
    summary = _section(write_report(run).read_text(), "summary")
    assert "set (test split) with the model of a" in summary  # folder names only: no absolute paths in a shared page
    assert "/external/set" not in summary
    assert "Classes</th><td>NORMAL, PNEUMONIA</td>" in summary  # from the header of predictions.csv


def test_the_run_facts_name_the_hardware_and_distributed_setup(tmp_path):
    metrics = _metrics()
    metrics["hardware"] = {"accelerator": "gpu", "devices": 4, "num_nodes": 2, "world_size": 8, "distributed": "ddp",
                           "precision": "bf16-mixed", "gpu": "NVIDIA H100 80GB HBM3", "cpu": "x", "cores": 32}
    text = write_report(make_run(tmp_path / "run", metrics=metrics)).read_text()
    assert "4 x NVIDIA H100 80GB HBM3 on 2 nodes (world size 8, ddp, precision bf16-mixed)" in text
    assert "Numeric precision" not in text  # said once, in the hardware line
