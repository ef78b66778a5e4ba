"""Small HTML and text tables for the API's results, as Jupyter shows them (``_repr_html_``).

Values with intervals are written by :func:`medtransfer.evaluation.html.format_with_ci`, the
one formatter the report and the console use too, so a notebook shows the numbers as
report.html does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["metrics_rows", "metrics_table", "model_rows", "recalibration_rows", "text_table"]

SPLIT_HEADER = ["Split", "Images", "AUC (95% CI)", "Accuracy", "Sensitivity", "Specificity", "Threshold"]
FINDING_HEADER = ["Split", "Finding", "Positives / known", "AUC (95% CI)", "Sensitivity", "Specificity", "Threshold"]


def _value(block: Mapping[str, Any], key: str, *, ci: bool = False) -> str:
    from medtransfer.evaluation.html import format_number, format_with_ci

    if ci:
        return format_with_ci(block.get(key), block.get(f"{key}_ci"), confidence=block.get("confidence") or 0.95)
    return format_number(block.get(key))


def metrics_rows(splits: Mapping[str, Mapping[str, Any] | None]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the split blocks of a metrics.json: one row per split, or, when a block is
    multi-label (``task: multi-label``), one row per split and finding plus the split's macro AUC."""
    blocks = {name: block for name, block in splits.items() if block}
    if any(block.get("task") == "multi-label" for block in blocks.values()):
        rows = []
        for name, block in blocks.items():
            known = sum(int(e.get("n_known", 0)) for e in block.get("findings", {}).values())
            positives = sum(int(e.get("n_positive", 0)) for e in block.get("findings", {}).values())
            rows.append([name, "macro", f"{positives} / {known}", _value(block, "macro_auc", ci=True),
                         _value(block, "sensitivity"), _value(block, "specificity"), "per finding"])
            for finding, entry in block.get("findings", {}).items():
                rows.append([name, finding, f"{entry.get('n_positive', 0)} / {entry.get('n_known', 0)}",
                             _value(entry, "auc", ci=True) if "auc" in entry else "no AUC (one class)",
                             _value(entry, "sensitivity"), _value(entry, "specificity"), _value(entry, "threshold")])
        return FINDING_HEADER, rows
    rows = [[name, _value(block, "n"), _value(block, "auc", ci=True), _value(block, "accuracy"),
             _value(block, "sensitivity"), _value(block, "specificity"), _value(block, "threshold")]
            for name, block in blocks.items()]
    return SPLIT_HEADER, rows


def metrics_table(splits: Mapping[str, Mapping[str, Any] | None], *, title: str, notes: Sequence[str] = ()) -> str:
    """An HTML fragment: a title, :func:`metrics_rows` as a table, then one line per note."""
    from medtransfer.evaluation.html import escape, table

    header, rows = metrics_rows(splits)
    body = table(header, rows) if rows else "<p>No split was evaluated.</p>"
    lines = "".join(f"<p>{escape(note)}</p>" for note in notes)
    return f"<div><strong>{escape(title)}</strong>{body}{lines}</div>"


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """The same rows as plain text (``repr`` outside Jupyter): columns padded to their widest cell."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def model_rows(saved: Any, source: str) -> list[list[str]]:
    """(field, value) rows describing a saved model: what it is and how it decides."""
    info = saved.info
    multilabel = saved.task.multilabel
    rows = [["Model folder", source], ["Backbone", f"{info.backbone} (head {info.head or 'linear'})"],
            ["Task", info.task], ["Findings" if multilabel else "Classes", ", ".join(info.classes)]]
    if multilabel:
        rows.append(["Thresholds", ", ".join(f"{c} {t:.3f}" for c, t in zip(info.classes, info.thresholds))])
        rows.append(["Temperatures", ", ".join(f"{t:.3f}" for t in info.temperatures)])
    else:
        rows.append(["Threshold", f"{info.threshold:.3f} on p({info.positive_class})"
                     + (f" ({info.threshold_policy})" if info.threshold_policy else "")])
        rows.append(["Temperature", f"{info.temperature:.3f}"])
    rows += [
        ["Input", f"{info.image_size} px, {info.in_channels} channel(s)"],
        ["Test-time augmentation", info.tta],
        ["Members", str(1 + len(saved.extra)) + (" (seed ensemble)" if saved.extra else "")],
        ["OOD guard", f"{saved.ood.method} (threshold {saved.ood.threshold:.3f})" if saved.ood is not None else "none"],
    ]
    if info.provenance:
        rows.append(["Recalibrated", f"from {info.provenance.get('run', '?')} on {info.provenance.get('data', '?')}"])
    return rows


def recalibration_rows(metrics: Mapping[str, Any]) -> list[list[str]]:
    """Before/after rows of a recalibration's metrics.json (its ``recalibration`` block), on the report part."""
    r = metrics["recalibration"]
    before, after = r["before"], r["after"]
    rows = [[label, _value(before, key, ci=True), _value(after, key, ci=True)]
            for key, label in (("auc", "AUC"), ("accuracy", "Accuracy"), ("sensitivity", "Sensitivity"),
                               ("specificity", "Specificity"))]
    if "thresholds" in r:  # multi-label: one threshold per finding, in each block's findings
        for finding in r["thresholds"]:
            rows.append([f"Threshold {finding}", _value(before["findings"][finding], "threshold"),
                         _value(after["findings"][finding], "threshold")])
    else:
        rows.append(["Threshold", _value(r["original"], "threshold"), _value(r, "threshold")])
        rows.append(["Temperature", _value(r["original"], "temperature"), _value(r, "temperature")])
    return rows
