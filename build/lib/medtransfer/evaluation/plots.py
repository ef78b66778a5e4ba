"""Matplotlib figures for a run: training curves, ROC / PR, confusion matrix, calibration.

Every function draws one figure, writes it as a PNG (parent folders are created) and
returns the path. Figures are built with the object-oriented API on an Agg canvas
(``matplotlib.figure.Figure`` + ``FigureCanvasAgg``) and never registered with pyplot:
this needs no display, leaves the process-wide backend (e.g. a user's notebook)
untouched, is safe to call from server threads, and keeps no figure alive after return.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medtransfer.errors import DataError
from medtransfer.evaluation.calibration import expected_calibration_error, reliability_bins
from medtransfer.evaluation.html import format_with_ci
from medtransfer.evaluation.metrics import roc_curve_points, pr_curve_points
from medtransfer.safeio import atomic_path

__all__ = [
    "plot_confusion",
    "plot_history",
    "plot_multiclass_roc",
    "plot_pr",
    "plot_reliability",
    "plot_roc",
]

DPI = 120


def _figure(width: float, height: float, **subplot_kw: Any) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(**subplot_kw)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=DPI, format="png")
    fig.clear()
    return path


def _num(value: Any) -> float:
    """A history cell (number, numeric string, '' or None) as float; missing -> NaN (a gap)."""
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"history value must be a number; got {value!r}.") from None


def _diagonal(ax: Any) -> None:
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)


# ------------------------------------------------------------------------- history


def plot_history(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Loss and accuracy per epoch, train vs val, the best epoch (min val_loss) marked.

    ``rows`` are history.csv rows (dicts with ``epoch, train_loss, val_loss, train_acc,
    val_acc``; values may be strings; missing or empty cells leave a gap).
    """
    rows = list(rows)
    if not rows:
        raise DataError("plot_history: history is empty; train for at least one epoch.")
    if any("epoch" not in r for r in rows):
        raise DataError(f"plot_history: every row needs an 'epoch' key; got keys {sorted(rows[0])}.")
    epochs = np.array([_num(r["epoch"]) for r in rows])
    series = {k: np.array([_num(r.get(k)) for r in rows]) for k in ("train_loss", "val_loss", "train_acc", "val_acc")}
    fig, (ax_loss, ax_acc) = _figure(10, 4, ncols=2)
    for ax, metric, title in ((ax_loss, "loss", "Loss"), (ax_acc, "acc", "Accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = series[f"{split}_{metric}"]
            if np.isfinite(values).any():
                ax.plot(epochs, values, style, markersize=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    val_loss = series["val_loss"]
    if np.isfinite(val_loss).any():
        best = int(np.nanargmin(val_loss))
        for ax in (ax_loss, ax_acc):
            ax.axvline(epochs[best], color="tab:red", linestyle=":", label=f"best epoch {epochs[best]:g}")
    ax_loss.legend()
    ax_acc.legend()
    return _save(fig, path)


# ---------------------------------------------------------------------- ROC and PR


def plot_roc(
    y_true: Any,
    prob_pos: Any,
    path: str | Path,
    *,
    auc: float,
    ci: Sequence[float] | None = None,
    operating_point: tuple[float, float] | None = None,
    label: str = "",
    band: tuple[Any, Any, Any] | None = None,
    confidence: float = 0.95,
) -> Path:
    """ROC curve with AUC (and its CI) in the legend, the chance diagonal, the operating
    point ``(fpr, tpr)`` of the chosen threshold, and optionally a bootstrap band
    ``(fpr_grid, tpr_lo, tpr_hi)`` from :func:`medtransfer.evaluation.resampling.roc_band`."""
    fpr, tpr, _ = roc_curve_points(y_true, prob_pos)
    name = f"{label} AUC " if label else "AUC "
    name += format_with_ci(auc, ci, confidence=confidence)
    fig, ax = _figure(5.5, 5.5)
    if band is not None:
        grid, lo, hi = band
        ax.fill_between(
            grid, lo, hi, color="tab:blue", alpha=0.2, linewidth=0, label=f"{confidence:.0%} bootstrap band"
        )
    ax.plot(fpr, tpr, color="tab:blue", linewidth=2, label=name)
    if operating_point is not None:
        op_fpr, op_tpr = operating_point
        ax.plot(
            [op_fpr], [op_tpr], "o", color="tab:red", markersize=8,
            label=f"threshold: sens {op_tpr:.3f}, spec {1 - op_fpr:.3f}",
        )
    _diagonal(ax)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title("ROC curve")
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_pr(
    y_true: Any,
    prob_pos: Any,
    path: str | Path,
    *,
    average_precision: float,
    label: str = "",
    band: tuple[Any, Any, Any] | None = None,
    confidence: float = 0.95,
) -> Path:
    """Precision-recall curve (step), average precision in the legend, prevalence line, and
    optionally a bootstrap band ``(recall_grid, precision_lo, precision_hi)`` from
    :func:`medtransfer.evaluation.resampling.pr_band`."""
    precision, recall, _ = pr_curve_points(y_true, prob_pos)
    prevalence = float(np.mean(np.asarray(y_true) == 1))
    fig, ax = _figure(5.5, 5.5)
    if band is not None:
        grid, lo, hi = band
        ax.fill_between(grid, lo, hi, color="tab:blue", alpha=0.2, linewidth=0, label=f"{confidence:.0%} bootstrap band")
    name = f"{label} AP {average_precision:.3f}" if label else f"AP {average_precision:.3f}"
    ax.plot(recall, precision, drawstyle="steps-post", linewidth=2, label=name)
    ax.axhline(prevalence, linestyle="--", color="grey", linewidth=1, label=f"prevalence {prevalence:.3f}")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_title("Precision-recall curve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    return _save(fig, path)


def plot_multiclass_roc(y_true: Any, probs: Any, class_names: Sequence[str], path: str | Path) -> Path:
    """One-vs-rest ROC curve per class, each with its AUC in the legend."""
    names = list(class_names)
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    if p.ndim != 2 or p.shape[1] != len(names) or y.shape != (p.shape[0],):
        raise DataError(
            f"plot_multiclass_roc: probs must be (n, {len(names)}) and y_true (n,); got {p.shape} and {y.shape}."
        )
    fig, ax = _figure(5.5, 5.5)
    aucs = []
    for k, name in enumerate(names):
        fpr, tpr, _ = roc_curve_points((y == k).astype(int), p[:, k])
        auc = float(np.trapezoid(tpr, fpr))
        aucs.append(auc)
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} AUC {auc:.3f}")
    _diagonal(ax)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"One-vs-rest ROC (macro AUC {np.mean(aucs):.3f})")
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


# ---------------------------------------------------------------------- confusion


def plot_confusion(
    cm: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path, *, title: str = ""
) -> Path:
    """K x K confusion matrix (rows true, columns predicted), coloured by row fraction and
    annotated with the count and the row percentage."""
    m = np.asarray(cm)
    names = list(class_names)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(names):
        raise DataError(f"plot_confusion: cm must be {len(names)}x{len(names)} to match class_names; got {m.shape}.")
    rows = m.sum(axis=1, keepdims=True).astype(np.float64)
    frac = np.divide(m, rows, out=np.zeros(m.shape), where=rows > 0)
    k = len(names)
    size = 2.0 + 1.1 * k
    fig, ax = _figure(size, size)
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            ax.text(
                j, i, f"{int(m[i, j])}\n{frac[i, j]:.1%}", ha="center", va="center",
                color="white" if frac[i, j] > 0.5 else "black", fontsize=10,
            )
    ax.set_xticks(range(k), names, rotation=30 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "Confusion matrix (row %)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    return _save(fig, path)


# -------------------------------------------------------------------- reliability


def plot_reliability(curves: Mapping[str, tuple[Any, Any]], path: str | Path, *, n_bins: int = 15) -> Path:
    """Reliability diagram for one or more ``label -> (y_true, prob_pos)`` curves (e.g.
    before / after temperature scaling), ECE in the legend, with a histogram of the
    predicted probabilities below."""
    if not curves:
        raise DataError("plot_reliability: no curves given; pass {label: (y_true, prob_pos)}.")
    fig, (ax, ax_hist) = _figure(5.5, 7, nrows=2, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    for label, (y_true, prob_pos) in curves.items():
        bins = reliability_bins(y_true, prob_pos, n_bins=n_bins)
        ece = expected_calibration_error(y_true, prob_pos, n_bins=n_bins)
        keep = [c > 0 for c in bins["counts"]]
        x = [v for v, k in zip(bins["mean_predicted"], keep) if k]
        y = [v for v, k in zip(bins["fraction_positive"], keep) if k]
        (line,) = ax.plot(x, y, "-o", markersize=4, label=f"{label} (ECE {ece:.3f})")
        ax_hist.hist(
            np.asarray(prob_pos, dtype=np.float64), bins=bins["bin_edges"], histtype="step",
            linewidth=1.5, color=line.get_color(), label=label,
        )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_ylabel("fraction positive")
    ax.set_title("Reliability diagram")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    ax_hist.set_xlabel("predicted probability of the positive class")
    ax_hist.set_ylabel("count")
    ax_hist.grid(alpha=0.3)
    return _save(fig, path)
