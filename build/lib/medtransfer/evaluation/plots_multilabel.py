"""Figures of a multi-label split: a grid of per-finding ROC curves with their operating points,
and the co-occurrence of findings (how often two findings are positive on one image).

Same conventions as :mod:`medtransfer.evaluation.plots`: one PNG per function, drawn on an
Agg canvas, written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.evaluation.metrics import roc_curve_points
from medtransfer.evaluation.plots import _diagonal, _figure, _save

__all__ = ["plot_co_occurrence", "plot_roc_grid", "write_multilabel_plots"]


def plot_roc_grid(
    targets: np.ndarray, probs: np.ndarray, findings: tuple[str, ...], split_result: dict[str, Any], path: str | Path
) -> Path:
    """One ROC panel per finding (known labels only), its AUC and the operating point at its threshold."""
    columns = min(4, len(findings))
    rows = math.ceil(len(findings) / columns)
    fig, axes = _figure(3.0 * columns, 3.0 * rows, nrows=rows, ncols=columns, squeeze=False)
    for k, finding in enumerate(findings):
        ax = axes[k // columns][k % columns]
        entry = split_result["findings"][finding]
        known = ~np.isnan(targets[:, k])
        y, p = targets[known, k].astype(int), probs[known, k]
        ax.set_title(finding, fontsize=9)
        _diagonal(ax)
        if "auc" not in entry:
            ax.text(0.5, 0.5, f"no AUC\n{entry['n_positive']} positive / {entry['n_known']} known", ha="center",
                    va="center", fontsize=8)
            continue
        fpr, tpr, _ = roc_curve_points(y, p)
        ax.plot(fpr, tpr, lw=1.5, label=f"AUC {entry['auc']:.3f}")
        ax.plot(1 - entry["specificity"], entry["sensitivity"], "o", color="crimson", ms=5,
                label=f"t = {entry['threshold']:.2f}")
        ax.legend(loc="lower right", fontsize=7)
        ax.set_xlabel("1 - specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
    for k in range(len(findings), rows * columns):
        axes[k // columns][k % columns].set_visible(False)
    return _save(fig, path)


def plot_co_occurrence(matrix: list[list[int]], findings: tuple[str, ...], path: str | Path) -> Path:
    """Images positive for both findings; the diagonal holds each finding's positives."""
    counts = np.asarray(matrix)
    size = max(4.0, 0.45 * len(findings) + 2)
    fig, ax = _figure(size, size)
    image = ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(findings)), findings, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(findings)), findings, fontsize=8)
    top = counts.max() if counts.size else 0
    for i in range(len(findings)):
        for j in range(len(findings)):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if counts[i, j] > top / 2 else "black")
    ax.set_title("Findings positive on the same image")
    fig.colorbar(image, ax=ax, shrink=0.7)
    return _save(fig, path)


def write_multilabel_plots(
    logits: np.ndarray, targets: np.ndarray, point: Any, split_result: dict[str, Any], plot_dir: Path, *, prefix: str
) -> dict[str, str]:
    """The split's ROC grid and co-occurrence figures under `plot_dir`, named `{prefix}_roc_findings.png`, ..."""
    probs = point.probabilities(logits)
    findings = point.task.classes
    written = {
        "roc_findings": plot_roc_grid(targets, probs, findings, split_result, plot_dir / f"{prefix}_roc_findings.png"),
        "co_occurrence": plot_co_occurrence(split_result["co_occurrence"], findings, plot_dir / f"{prefix}_co_occurrence.png"),
    }
    return {k: str(v) for k, v in written.items()}
