"""The cross-validation part of a run's report: per-fold curves, the pooled ROC with its band, the fold table.

:func:`write_fold_plots` draws ``plots/folds_roc.png`` (each fold's ROC on its own validation fold,
and the pooled out-of-fold curve with its patient-bootstrap band; single-label) and
``plots/folds_history.png`` (each fold's validation and training loss per epoch, its best epoch
marked). :func:`cross_validation_section` is the report section built from metrics.json
``cross_validation`` (absent for other runs: the section is then empty).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medtransfer.evaluation import html as h
from medtransfer.evaluation import resampling
from medtransfer.evaluation.metrics import RankedScores, roc_curve_points
from medtransfer.safeio import atomic_path

__all__ = ["CROSS_VALIDATION", "FOLD_PLOTS", "cross_validation_section", "write_fold_plots"]

FOLD_PLOTS = ("folds_roc.png", "folds_history.png")
CROSS_VALIDATION = "cross-validation"  # the section's id, after the summary; metrics.json's block is "cross_validation"
DPI = 120


def _figure(width: float, height: float) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=DPI, format="png")
    fig.clear()
    return path


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    ranked = RankedScores.build(y, s)
    return float(ranked.auc_ap(ranked.unit_weights())[0][0])


def write_fold_plots(
    plot_dir: Path, histories: Sequence[list[dict[str, Any]]], outputs: Any, folds: Sequence[int], point: Any,
    classes: Sequence[str], *, multilabel: bool = False, band_resamples: int = 200, seed: int = 0,
) -> list[Path]:
    """folds_history.png, and folds_roc.png for single-label runs (``outputs``: the pooled SplitOutputs,
    ``folds``: each row's fold, ``point``: the operating point the curves' probabilities use)."""
    written = [_history(plot_dir / FOLD_PLOTS[1], histories)]
    if multilabel:
        return written
    probs = point.probabilities(outputs.logits)[:, point.positive_index]
    y = (np.asarray(outputs.labels) == point.positive_index).astype(np.int64)
    fold = np.asarray(folds)
    fig, ax = _figure(5.5, 5.5)
    for k in sorted(set(folds)):
        rows = fold == k
        if 0 < y[rows].sum() < rows.sum():
            fpr, tpr, _ = roc_curve_points(y[rows], probs[rows])
            ax.plot(fpr, tpr, linewidth=1, alpha=0.7, label=f"fold {k} (AUC {_auc(y[rows], probs[rows]):.3f})")
    if band_resamples and 0 < y.sum() < len(y):
        grid, lo, hi = resampling.roc_band(y, probs, groups=outputs.patient_ids, n_resamples=band_resamples, seed=seed)
        ax.fill_between(grid, lo, hi, color="black", alpha=0.12, linewidth=0, label="pooled: 95% patient-bootstrap band")
    fpr, tpr, _ = roc_curve_points(y, probs)
    ax.plot(fpr, tpr, color="black", linewidth=2.5, label=f"pooled out of fold (AUC {_auc(y, probs):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    name = classes[point.positive_index]
    ax.set_title(f"ROC per fold, {name}" + (" vs rest" if len(classes) > 2 else ""))
    ax.legend(loc="lower right", fontsize="small")
    written.append(_save(fig, plot_dir / FOLD_PLOTS[0]))
    return written


def _history(path: Path, histories: Sequence[list[dict[str, Any]]]) -> Path:
    fig, ax = _figure(6.5, 4.0)
    for k, rows in enumerate(histories, start=1):
        epochs = [r["epoch"] for r in rows]
        val = [r.get("val_loss") for r in rows]
        line = ax.plot(epochs, val, marker="o", markersize=3, label=f"fold {k} val")[0]
        ax.plot(epochs, [r.get("train_loss") for r in rows], linestyle=":", color=line.get_color(), linewidth=1)
        finite = [(e, v) for e, v in zip(epochs, val) if v is not None and np.isfinite(v)]
        if finite:
            best = min(finite, key=lambda ev: ev[1])
            ax.plot([best[0]], [best[1]], "*", color=line.get_color(), markersize=11)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (solid: validation fold, dotted: training)")
    ax.set_title("Loss per fold; * marks each fold's best epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    return _save(fig, path)


# ------------------------------------------------------------------------ section


def _mean_sd(spread: dict[str, Any] | None) -> str:
    if not spread or spread.get("mean") is None:
        return h.DASH
    sd = spread.get("sd")
    return f"{spread['mean']:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")


def _columns(table: list[dict[str, Any]]) -> list[tuple[str, str]]:
    columns = [("auc", "AUC"), ("accuracy", "accuracy"), ("sensitivity", "sensitivity"), ("specificity", "specificity")]
    first = table[0] if table else {}
    if "findings" in first:
        return [("auc", "macro AUC"), ("micro_auc", "micro AUC"), ("sensitivity", "sensitivity (macro)"),
                ("specificity", "specificity (macro)")]
    if "accuracy_argmax" in first:
        columns += [("accuracy_argmax", "accuracy (argmax)"), ("macro_auc", "macro AUC")]
    return columns


def _pooled_cells(pooled: Any, columns: list[tuple[str, str]]) -> list[str]:
    cells = []
    multiclass = pooled.multiclass or {}
    for key, _ in columns:
        if key == "accuracy_argmax":
            cells.append(h.format_with_ci(multiclass.get("accuracy"), multiclass.get("accuracy_ci")))
        elif key == "macro_auc":
            cells.append(h.format_with_ci(multiclass.get("macro_auc"), multiclass.get("macro_auc_ci")))
        elif key == "micro_auc":
            cells.append(h.format_with_ci(pooled.extra.get("micro_auc"), pooled.extra.get("micro_auc_ci")))
        else:
            cells.append(h.split_value(pooled, key))
    return cells


def cross_validation_section(run: Any) -> str:
    """The fold table (each fold's own validation figures, their mean ± sd, the pooled out-of-fold figures
    with 95% CIs), the per-fold curves and the pooled ROC; "" for a run without cross-validation."""
    block = run.metrics.extra.get("cross_validation")
    if not isinstance(block, dict):
        return ""
    table = [row for row in block.get("fold_table") or [] if isinstance(row, dict)]
    spread = block.get("per_fold") or {}
    columns = _columns(table)
    header = ["fold", "val images", "patients", "best epoch", "threshold", *(label for _, label in columns)]
    rows = [[str(r.get("fold")), h.format_number(r.get("images")), h.format_number(r.get("patients")),
             h.format_number(r.get("best_epoch")), h.format_number(r.get("threshold")),
             *(h.format_number(r.get(key)) for key, _ in columns)] for r in table]
    rows.append(["mean ± sd", "", "", _mean_sd(spread.get("best_epoch")), _mean_sd(spread.get("threshold")),
                 *(_mean_sd(spread.get(key)) for key, _ in columns)])
    pooled = run.metrics.val
    if pooled is not None:
        rows.append(["pooled out of fold", h.format_number(pooled.n), h.format_number(pooled.patients), "",
                     h.format_number(run.metrics.threshold), *_pooled_cells(pooled, columns)])
    k = block.get("folds")
    parts = [
        h.note(f"{k}-fold cross-validation by patient: fold k's model trained on the other folds and stopped early on "
               f"fold k. 'Validation' in this report means the pooled out-of-fold predictions: each of the "
               f"{h.format_number(block.get('pooled_images'))} pool images predicted once, by the model that did not "
               "train on it. The saved model averages the logits of the fold models; its temperature and threshold "
               "were chosen on the pooled out-of-fold logits, never on test."),
        h.table(header, rows, css="metrics"),
        h.note("Per-fold rows: each fold's own validation figures at its own threshold (the mean ± sd papers quote). "
               "Pooled row: 95% patient-bootstrap intervals; its accuracy, sensitivity and specificity are at a "
               "threshold chosen on these same predictions, hence optimistic, as on any validation split (AUC is not)."),
    ]
    refit = block.get("refit")
    if isinstance(refit, dict):
        parts.append(h.note(f"Refit: one model trained on all folds for {refit.get('epochs')} epoch(s) (median of the "
                            f"folds' best epochs {refit.get('fold_best_epochs')}), at the out-of-fold operating point; "
                            f"test AUC {h.format_with_ci(refit.get('test_auc'), refit.get('test_auc_ci'))}; run folder "
                            f"{refit.get('run')}."))
    figures = h.figures([
        (run.plot(FOLD_PLOTS[0]), "ROC of each fold on its own validation fold, and the pooled out-of-fold ROC with its band"),
        (run.plot("val_roc.png"), "Pooled out-of-fold ROC with its 95% patient-bootstrap band and the chosen operating point"),
        (run.plot(FOLD_PLOTS[1]), "Loss per epoch of every fold; * marks the epoch whose weights each fold kept"),
    ])
    return h.section(CROSS_VALIDATION, "Cross-validation", "\n".join(parts) + (figures or ""))
