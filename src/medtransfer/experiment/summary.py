"""EXP/summary.{md,html,json}: the configurations across seeds, and paired comparisons between them.

Per configuration (the grid values without the seed) and evaluation set (val, test, each
external set): mean, standard deviation and range over seeds of AUC, sensitivity,
specificity and ECE (after calibration), and of the training time. Per pair of
configurations, on test and each external set: for each seed, the patient-level paired
bootstrap and DeLong's test of the AUC difference (:func:`~medtransfer.evaluation.compare.compare_runs`
on the two cells' prediction files); across seeds, the mean difference with its spread and
a paired t-test (scipy's ``ttest_rel``; two or more seeds).

Multi-label cells (metrics.json ``task: multi-label``) are summarised by macro AUC: a split
block's ``auc`` is its macro AUC (the mean of the findings' AUCs) with ``auc_ci`` its interval,
sensitivity and specificity are the macro averages, ECE the mean over findings, and the paired
tests compare macro AUC (``compare_runs`` on multi-label folders). The summary says "macro AUC"
wherever it would say "AUC" (``headline`` in summary.json).

With ``folds: K`` every cell is a cross-validation on the experiment's one set of folds: the set
"oof" (each cell's pooled out-of-fold block) replaces "val", and pairs are also tested on it
(:func:`~medtransfer.evaluation.out_of_fold.paired_oof_test`: the same images, patients and folds).
``selection`` names the configuration with the best mean out-of-fold AUC and says that it was chosen
by looking at those results, so its out-of-fold figures are optimistic; test and external are not.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from scipy import stats

from medtransfer.errors import MedtransferError
from medtransfer.evaluation import html as h
from medtransfer.evaluation.compare import compare_runs
from medtransfer.evaluation.out_of_fold import paired_oof_test
from medtransfer.experiment.grid import ExperimentPlan
from medtransfer.experiment.plot import plot_auc
from medtransfer.rundir import RunDir, SplitMetrics, write_text_atomic
from medtransfer.task import MULTI_LABEL, SINGLE_LABEL

CELLS = "cells"
EXTERNAL = "external"
METRICS = ("auc", "sensitivity", "specificity", "ece")
PLOT = "summary_auc.png"
OOF_LABEL = "oof (pooled out-of-fold predictions; each cell's threshold was chosen on them)"


@dataclass(frozen=True)
class CellOutcome:
    name: str
    status: str  # trained, resumed, skipped (finished earlier) or failed
    error: str | None  # the one-line error of a failed cell


def write_summary(
    plan: ExperimentPlan, out: Path, outcomes: dict[str, CellOutcome], sets: list[str], *, bootstrap: int,
    console: Console,
) -> tuple[dict[str, Any], list[Path]]:
    """Read every finished cell, aggregate, test, plot, and write summary.md, .html and .json into `out`."""
    results = {name: cell_results(out / CELLS / name, sets) for name, o in outcomes.items() if o.status != "failed"}
    folds = plan.base.folds  # every cell a cross-validation on the same folds: "oof" instead of "val"
    eval_sets = ["oof" if folds else "val", "test", *sets]
    multilabel = any(r.get("task") == MULTI_LABEL for r in results.values())
    summary: dict[str, Any] = {
        "task": MULTI_LABEL if multilabel else SINGLE_LABEL,
        "headline": "macro AUC" if multilabel else "AUC",
        "grid": plan.grid,
        "variants": plan.variants,
        "split_file": "split.csv",  # in the experiment's folder (shareable outputs name no local folder)
        "cells": [
            {"name": c.name, "configuration": c.configuration, "seed": c.seed, "values": c.values,
             "status": outcomes[c.name].status, "error": outcomes[c.name].error, "results": results.get(c.name)}
            for c in plan.cells
        ],
        "configurations": aggregate(plan, results, eval_sets),
        "comparisons": compare_configurations(plan, out, results, [*(["oof"] if folds else []), "test", *sets],
                                              bootstrap=bootstrap),
    }
    if folds:
        summary["folds"] = folds
        summary["selection"] = oof_selection(summary["configurations"], summary["headline"])
    points = {
        s: {conf: [(c.seed, results[c.name]["sets"][s]["auc"], results[c.name]["sets"][s]["auc_ci"])
                   for c in plan.cells if c.configuration == conf and s in results.get(c.name, {}).get("sets", {})]
            for conf in plan.configurations}
        for s in eval_sets
    }
    plot = plot_auc(points, out / PLOT)
    markdown = to_markdown(summary, eval_sets)
    files = [
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, default=_json_value) + "\n"),
        write_text_atomic(out / "summary.md", markdown),
        write_text_atomic(out / "summary.html", to_html(summary, eval_sets, plot)),
        plot,
    ]
    console.print(markdown, markup=False, highlight=False, soft_wrap=True)
    return summary, files


def cell_results(run_dir: Path, sets: list[str]) -> dict[str, Any]:
    """A finished cell's training time and, per evaluation set, its AUC (with CI), sensitivity, specificity, ECE.
    Multi-label: macro AUC and macro sensitivity / specificity, ECE averaged over the findings."""
    metrics = RunDir(run_dir).metrics()
    oof = "cross_validation" in metrics.extra  # val is the pooled out-of-fold block
    blocks: dict[str, SplitMetrics | None] = {"oof" if oof else "val": metrics.val, "test": metrics.test}
    for name in sets:
        blocks[name] = RunDir(run_dir / EXTERNAL / name).metrics().test
    return {
        "train_seconds": metrics.train_seconds,
        "task": metrics.extra.get("task") or SINGLE_LABEL,
        "sets": {name: _block(block) for name, block in blocks.items() if block is not None},
    }


def _block(block: SplitMetrics) -> dict[str, Any]:
    return {
        "auc": block.auc, "auc_ci": block.interval("auc"), "sensitivity": block.sensitivity,
        "specificity": block.specificity, "ece": _ece(block),
    }


def _ece(block: SplitMetrics) -> float | None:
    """ECE after calibration; for a multi-label block the mean over its findings."""
    calibration = block.calibration or {}
    return calibration.get("ece_after", calibration.get("ece_after_mean"))


def spread(values: list[float]) -> dict[str, Any]:
    """n, mean, sd (n - 1 in the denominator; None for one value), min and max of the finite `values`."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
    return {"n": len(finite), "mean": float(np.mean(finite)), "sd": sd, "min": min(finite), "max": max(finite)}


def aggregate(plan: ExperimentPlan, results: dict[str, Any], eval_sets: list[str]) -> dict[str, Any]:
    out = {}
    for conf in plan.configurations:
        done = [results[c.name] for c in plan.cells if c.configuration == conf and c.name in results]
        out[conf] = {
            "runs": len(done),
            "train_seconds": spread([r["train_seconds"] for r in done]),
            "sets": {s: {m: spread([r["sets"][s][m] for r in done if s in r["sets"]]) for m in METRICS} for s in eval_sets},
        }
    return out


def compare_configurations(
    plan: ExperimentPlan, out: Path, results: dict[str, Any], test_sets: list[str], *, bootstrap: int
) -> list[dict[str, Any]]:
    """Every pair of configurations on every test set: per seed a paired test, across seeds the spread and a t-test."""
    by_seed = {conf: {c.seed: c.name for c in plan.cells if c.configuration == conf and c.name in results}
               for conf in plan.configurations}
    comparisons = []
    for a, b in itertools.combinations(plan.configurations, 2):
        for s in test_sets:
            seeds = [seed for seed in by_seed[a] if seed in by_seed[b]
                     and all(s in results[by_seed[conf][seed]]["sets"] for conf in (a, b))]
            per_seed = [_paired(out, by_seed[a][seed], by_seed[b][seed], s, seed, bootstrap) for seed in seeds]
            tested = [t for t in per_seed if "auc_diff" in t]
            across = spread([t["auc_diff"] for t in tested])
            across["p_paired_t"] = _paired_t([t["auc_a"] for t in tested], [t["auc_b"] for t in tested])
            comparisons.append({"a": a, "b": b, "set": s, "per_seed": per_seed, "across_seeds": across})
    return comparisons


def _paired(out: Path, cell_a: str, cell_b: str, eval_set: str, seed: int, bootstrap: int) -> dict[str, Any]:
    own = eval_set in ("test", "oof")
    folders = [out / CELLS / cell if own else out / CELLS / cell / EXTERNAL / eval_set for cell in (cell_a, cell_b)]
    try:
        if eval_set == "oof":  # the same images, patients and folds in both cells
            test = paired_oof_test(folders[0], folders[1], n_resamples=bootstrap, seed=0)
        else:
            test = compare_runs(folders, n_resamples=bootstrap, seed=0).tests[0]
    except MedtransferError as exc:
        return {"seed": seed, "error": str(exc).splitlines()[0]}
    keys = ("auc_a", "auc_b", "auc_diff", "ci", "p_bootstrap", "p_delong", "n_patients", "bootstrap_unit", "n_resamples")
    return {"seed": seed, **{k: test[k] for k in keys}}


def oof_selection(configurations: dict[str, Any], headline: str) -> dict[str, Any] | None:
    """The configuration with the best mean pooled out-of-fold AUC, labelled as chosen by looking at those results."""
    means = {conf: c["sets"]["oof"]["auc"]["mean"] for conf, c in configurations.items()
             if c["sets"].get("oof", {}).get("auc", {}).get("mean") is not None}
    if not means:
        return None
    best = max(means, key=means.__getitem__)
    return {
        "configuration": best, "by": f"mean pooled out-of-fold {headline} over seeds", "chosen_on": "out-of-fold",
        "note": (f"chosen by looking at the out-of-fold results: {best}'s out-of-fold figures are optimistic (the best of "
                 f"{len(means)} configurations on the same folds); its test and external figures are the honest ones"),
    }


def _paired_t(a: list[float], b: list[float]) -> float | None:
    """Two-sided paired t-test p-value over seeds; None with fewer than two seeds or no variation."""
    if len(a) < 2:
        return None
    p = float(stats.ttest_rel(a, b).pvalue)
    return p if math.isfinite(p) else None


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else str(value)


# ------------------------------------------------------------------------ tables


def _stat(s: dict[str, Any], *, digits: int = 3, signed: bool = False) -> str:
    if not s["n"]:
        return h.DASH
    number = (lambda v: f"{v:+.{digits}f}") if signed else (lambda v: f"{v:.{digits}f}")
    if s["n"] == 1:
        return number(s["mean"])
    return f"{number(s['mean'])} ± {s['sd']:.{digits}f} [{number(s['min'])}, {number(s['max'])}]"


def _p(value: float | None) -> str:
    return h.DASH if value is None else ("< 0.001" if value < 0.001 else f"{value:.3f}")


def tables(summary: dict[str, Any], eval_sets: list[str]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table, shared by the Markdown and the HTML page."""
    cells = [[c["name"], c["configuration"], str(c["seed"]), c["status"], c["error"] or ""] for c in summary["cells"]]
    out = [("Cells", ["cell", "configuration", "seed", "status", "error"], cells)]
    confs = summary["configurations"]
    auc = summary.get("headline", "AUC")
    macro = auc != "AUC"
    header = ["configuration", "runs", auc, *(f"{m} (macro)" if macro else m for m in ("sensitivity", "specificity")),
              "ECE (mean over findings)" if macro else "ECE"]
    for s in eval_sets:
        rows = [[name, str(c["runs"]), *(_stat(c["sets"][s][m]) for m in METRICS)] for name, c in confs.items()]
        label = OOF_LABEL if s == "oof" else s
        out.append((f"{label}: mean ± sd [min, max] over seeds", header, rows))
    rows = [[name, str(c["runs"]), _stat(c["train_seconds"], digits=1)] for name, c in confs.items()]
    out.append(("Training time (s)", ["configuration", "runs", "seconds"], rows))
    rows = []
    for comp in summary["comparisons"]:
        for t in comp["per_seed"]:
            rows.append([comp["set"], comp["a"], comp["b"], str(t["seed"]),
                         h.format_with_ci(t["auc_diff"], t["ci"], signed=True) if "auc_diff" in t else t["error"],
                         _p(t.get("p_bootstrap")), _p(t.get("p_delong"))])
        across = comp["across_seeds"]
        if across["n"] > 1:  # with one shared seed the row would only repeat that seed's difference
            rows.append([comp["set"], comp["a"], comp["b"], f"all ({across['n']})", _stat(across, signed=True),
                         f"paired t: {_p(across['p_paired_t'])}", ""])
    out.append((f"Paired comparisons: {auc}(a) - {auc}(b)", ["set", "a", "b", "seed", f"{auc} difference",
                                                             "p (patient bootstrap)", "p (DeLong)"], rows))
    return out


def _selection_line(summary: dict[str, Any]) -> str:
    chosen = summary.get("selection")
    return f" Best by out-of-fold results: {chosen['configuration']} ({chosen['note']})." if chosen else ""


def to_markdown(summary: dict[str, Any], eval_sets: list[str]) -> str:
    parts = ["# Experiment summary", "", f"{_design(summary)}; one split: {summary['split_file']}.{_selection_line(summary)}"]
    for title, header, rows in tables(summary, eval_sets):
        parts += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        parts += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    parts += ["", f"![{summary.get('headline', 'AUC')} per configuration]({PLOT})", ""]
    return "\n".join(parts)


def to_html(summary: dict[str, Any], eval_sets: list[str], plot: Path) -> str:
    body = [h.note(f"{_design(summary)}; every cell used the one split {summary['split_file']}.{_selection_line(summary)}")]
    for i, (title, header, rows) in enumerate(tables(summary, eval_sets)):
        body.append(h.section(f"t{i}", title, h.table(header, rows)))
    auc = summary.get("headline", "AUC")
    body.append(h.section("plot", f"{auc} per configuration",
                          h.figures([(plot, f"{auc} per configuration and seed, 95% CIs")], css="wide")))
    return h.page("Experiment summary", "\n".join(body))


def _design(summary: dict[str, Any]) -> str:
    """What the cells vary: the grid and the variants, as the YAML gave them."""
    parts = [f"Grid: {json.dumps(summary['grid'])}"] if summary["grid"] else []
    parts += [f"variants: {json.dumps(summary['variants'])}"] if summary.get("variants") else []
    parts += [f"{summary['folds']}-fold cross-validation per cell, the same folds for every cell"] if summary.get("folds") else []
    return "; ".join(parts) or "Grid: {}"
