"""The report of a multi-label run (medtransfer.evaluation.report_multilabel, via report.write_report).

The run folder is built as training writes one: per-finding metrics from
``multilabel_split_metrics`` on synthetic logits and targets (a masked label, a finding
without positives on test), the ROC grid and co-occurrence figures from
``write_multilabel_plots``, metrics.json through ``rundir.write_metrics``.

tests/evaluation/test_report.py does not open the single-label report in a browser (that is
tests/e2e's job), so neither does this file.
"""

from __future__ import annotations

import html.parser
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from medtransfer.evaluation import html as h
from medtransfer.evaluation.multilabel import fit_multilabel_point, multilabel_split_metrics
from medtransfer.evaluation.plots import plot_history
from medtransfer.evaluation.plots_multilabel import write_multilabel_plots
from medtransfer.evaluation.report import write_report
from medtransfer.evaluation.report_multilabel import MULTILABEL_SECTION_IDS
from medtransfer.rundir import write_metrics
from medtransfer.task import Task

FINDINGS = ("Effusion", "Mass", "Nodule", "Pneumothorax")
ABSENT_ON_TEST = "Pneumothorax"
SINGLE_LABEL_ONLY = ("published", "explanations", "shortcut-check", "metrics")


def _split(rng: np.random.Generator, n: int, *, absent: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    targets = (rng.random((n, len(FINDINGS))) < [0.4, 0.3, 0.2, 0.25]).astype(np.float64)
    if absent is not None:
        targets[:, FINDINGS.index(absent)] = 0.0
    targets[3, FINDINGS.index("Mass")] = np.nan  # one unknown label (blank, or uncertain under --uncertain ignore)
    targets[7, FINDINGS.index("Effusion")] = np.nan
    logits = rng.normal(size=targets.shape) + 2.0 * np.nan_to_num(targets) - 1.0
    patients = [f"p{i // 2}" for i in range(n)]  # two images per patient
    return logits, targets, patients


def _history(path: Path) -> list[dict]:
    rows = [
        {"epoch": 1, "train_loss": 0.61, "train_acc": 0.71, "val_loss": 0.52, "val_acc": 0.78, "lr": 0.001, "seconds": 12.3},
        {"epoch": 2, "train_loss": 0.41, "train_acc": 0.83, "val_loss": 0.35, "val_acc": 0.88, "lr": 0.0009, "seconds": 11.9},
    ]
    path.write_text("epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds\n" + "".join(",".join(map(str, r.values())) + "\n" for r in rows))
    return rows


def make_multilabel_run(root: Path) -> Path:
    rng = np.random.default_rng(7)
    task = Task("multi-label", FINDINGS)
    data = {"val": _split(rng, 80), "test": _split(rng, 90, absent=ABSENT_ON_TEST)}
    point = fit_multilabel_point(data["val"][0], data["val"][1], task, policy="youden", calibrate="temperature")
    splits = {}
    for name, (logits, targets, patients) in data.items():
        splits[name] = multilabel_split_metrics(logits, targets, patients, point, bootstrap=60, seed=0)
        write_multilabel_plots(logits, targets, point, splits[name], root / "plots", prefix=name)
    summary = {
        name: {f: {"images": int(np.nansum(t[:, k])), "patients": 5 + k, "known": int((~np.isnan(t[:, k])).sum())}
               for k, f in enumerate(FINDINGS)} | {"No Finding": {"images": 3, "patients": 3, "known": len(t)}}
        for name, (_, t, _) in data.items()
    }
    metrics = {
        "backbone": "resnet18", "strategy": "finetune", "weights": "none", "params": {"total": 11178051, "trainable": 11178051},
        "epochs_run": 2, "best_epoch": 2, "stopped_early": False, "train_seconds": 5.6,
        "val": splits["val"], "test": splits["test"], "classes": list(FINDINGS), "threshold_policy": "youden",
        "precision": "bf16-mixed", "data_summary": summary,
        "leakage": {"clean": True, "shared_patients": 0, "duplicate_images": 0, "examples": []},
        "hardware": {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "world_size": 1, "distributed": "none",
                     "precision": "bf16-mixed", "gpu": None, "cpu": "AMD EPYC", "cores": 2},
        "task": "multi-label", "operating_point": point.to_dict(),
    }
    write_metrics(root, metrics)
    (root / "config.yaml").write_text(yaml.safe_dump({"data": "nih/Data_Entry.csv", "backbone": "resnet18", "epochs": 2}))
    plot_history(_history(root / "history.csv"), root / "plots" / "history.png")
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str, dict]:
    root = make_multilabel_run(tmp_path_factory.mktemp("ml") / "run")
    path = write_report(root)
    return root, path.read_text(encoding="utf-8"), json.loads((root / "metrics.json").read_text())


class _Images(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.alts: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs.get("src") or "")
            self.alts.append(attrs.get("alt") or "")


def _findings_table(text: str, split: str) -> str:
    """The per-finding table under the split's heading in the Findings section."""
    section = text[text.index('<section id="findings">'):]
    start = section.index(f"<h3>{split}:")
    return section[start:section.index("</table>", start)]


def _row(table: str, finding: str) -> list[str]:
    match = re.search(rf'<tr><th scope="row">{re.escape(finding)}</th>(.*?)</tr>', table)
    assert match, f"no row for {finding}"
    return re.findall(r"<td>(.*?)</td>", match.group(1))  # escaped, as in the page


def test_multilabel_page_has_its_sections_and_none_of_the_single_label_ones(report):
    _, text, _ = report
    shown = re.findall(r'<section id="([^"]+)">', text)
    assert shown == [s for s in MULTILABEL_SECTION_IDS if s not in ("shift", "foreign-inputs")]
    assert not set(SINGLE_LABEL_ONLY) & set(shown)
    assert "confusion" not in text.split("<main>")[1].lower()  # no two-class confusion matrix


@pytest.mark.parametrize("split,label", [("test", "Test"), ("val", "Validation")])
def test_every_finding_is_shown_with_its_auc_as_in_metrics_json(report, split, label):
    _, text, metrics = report
    table = _findings_table(text, label)
    for finding, entry in metrics[split]["findings"].items():
        cells = _row(table, finding)
        assert cells[0] == h.escape(f"{entry['n_positive']} / {entry['n_known']}")
        assert cells[2] == h.format_number(entry["n_masked"])
        if "auc" in entry:
            assert cells[3] == h.escape(h.format_with_ci(entry["auc"], entry["auc_ci"]))
            assert cells[3].startswith(f"{entry['auc']:.3f} (95% CI ")
            assert cells[5] == h.escape(h.format_with_ci(entry["sensitivity"], entry["sensitivity_ci"]))
            assert cells[7] == h.format_number(entry["threshold"])
        else:
            assert cells[3] == "no AUC (see below)"
    masked = {f: e["n_masked"] for f, e in metrics[split]["findings"].items()}
    assert masked["Mass"] == 1 and masked["Effusion"] == 1


def test_macro_and_micro_auc_are_shown_with_their_intervals(report):
    _, text, metrics = report
    summary = text[text.index('<section id="summary">'):text.index("</section>")]
    for split in ("val", "test"):
        block = metrics[split]
        assert h.escape(h.format_with_ci(block["macro_auc"], block["macro_auc_ci"])) in summary
        assert h.escape(h.format_with_ci(block["micro_auc"], block["micro_auc_ci"])) in summary
    assert "Macro AUC" in summary and "Micro AUC" in summary
    assert "one per finding" in summary  # the run facts: no single decision threshold


def test_findings_without_an_auc_are_named_with_the_reason(report):
    _, text, metrics = report
    assert metrics["test"]["undefined"] == [ABSENT_ON_TEST]
    assert metrics["val"]["undefined"] == []
    section = text[text.index('<section id="findings">'):]
    section = section[:section.index("</section>")]
    known = metrics["test"]["findings"][ABSENT_ON_TEST]["n_known"]
    assert f"No AUC on test for {ABSENT_ON_TEST} (no positive among {known} known labels)" in section


def test_both_figures_of_each_split_are_embedded_and_exist(report):
    root, text, _ = report
    parser = _Images()
    parser.feed(text)
    for split, label in (("val", "Validation"), ("test", "Test")):
        for name in (f"{split}_roc_findings.png", f"{split}_co_occurrence.png"):
            assert (root / "plots" / name).is_file()
        assert sum(a.startswith(f"{label}: ROC curve per finding") for a in parser.alts) == 1
        assert sum(a.startswith(f"{label}: images positive for both findings") for a in parser.alts) == 1
    assert any(a.startswith("Loss and accuracy") for a in parser.alts)  # the training curves
    assert "other-figures" not in text  # every plot was claimed by a section
    assert parser.sources and all(s.startswith("data:image/png;base64,") for s in parser.sources)


def test_no_absolute_path_in_the_page(report):
    root, text, _ = report
    assert str(root.resolve()) not in text and str(root.parent) not in text
    assert not re.search(r'(src|href)="(/|file:)', text)


def test_data_summary_leakage_hardware_and_settings(report):
    _, text, _ = report
    data = text[text.index('<section id="data">'):]
    data = data[:data.index("</section>")]
    assert "No Finding" in data and "Known labels" in data and "Leakage check passed" in data
    assert "AMD EPYC (2 cores)" in text
    assert "nih/Data_Entry.csv" in text[text.index('<section id="configuration">'):]


def test_fallback_findings_and_missing_pieces_do_not_break_the_page(report, tmp_path):
    """A finding with one class on validation (fallback), an entry without calibration, no plots or history."""
    _, _, metrics = report
    metrics = json.loads(json.dumps(metrics))
    metrics["operating_point"]["fallback"] = ["Nodule"]
    del metrics["test"]["findings"]["Mass"]["calibration"]
    del metrics["val"]
    run = tmp_path / "bare"
    run.mkdir()
    write_metrics(run, metrics)
    text = write_report(run).read_text(encoding="utf-8")
    assert "Validation held one class only for Nodule" in text
    assert "No further test plots in plots/." in text
    assert "Macro AUC" in text
