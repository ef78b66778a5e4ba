"""`compare` for multi-label runs: paired tests per finding and of the macro AUC, and the table per finding.

The prediction files (``path,label,prob_<finding>...,pred,pred_<finding>...,masked,patient_id``)
are matched by ``path``; the tests use the images both folders predicted (the counts left out
are reported), and the two folders must give those images the same labels and masks. Per
finding, on the images whose label is known in both files:

* a paired bootstrap of ``AUC_a - AUC_b`` resampling patients
  (:func:`medtransfer.evaluation.resampling.paired_bootstrap_auc_test`);
* DeLong's test (image-level, :func:`medtransfer.evaluation.resampling.delong_test`).

Across findings, the macro AUC (the mean of the per-finding AUCs over the findings with both
classes) of each folder, and a paired bootstrap of the macro difference: each resample draws
patients once and recomputes every finding's AUC for both folders from the same draw, so the
findings stay correlated as in the data; a resample counts when every finding has both classes.
The two-sided p inverts the percentile interval as the single-label test does; there is no
DeLong p for the macro difference. Comparing a run with itself gives a difference of 0 and p = 1.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from medtransfer.errors import DataError
from medtransfer.evaluation import html as h
from medtransfer.evaluation import resampling
from medtransfer.evaluation.metrics import RankedScores
from medtransfer.evaluation.multilabel_io import MultiLabelPredictions, is_multilabel_columns, read_multilabel_predictions
from medtransfer.task import MULTI_LABEL

__all__ = ["TEST_HEADER", "compare_multilabel", "is_multilabel_folder", "macro_paired_bootstrap", "table_rows", "test_rows",
           "tests_note"]

CHUNK = 256  # resamples per draw, as resampling does: one finding gives its paired test exactly


def is_multilabel_folder(metrics: Any, predictions: Any) -> bool:
    """A folder of a multi-label run or evaluation: metrics.json says so, or its predictions have the columns."""
    return (metrics.extra or {}).get("task") == MULTI_LABEL or is_multilabel_columns(predictions.columns)


def compare_multilabel(
    folders: Sequence[Any], pairs: list[tuple[int, int]], *, n_resamples: int, seed: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """One test per pair (macro AUC; per finding under "findings") and the findings, in the first folder's order."""
    read = [read_multilabel_predictions(f.predictions.file) for f in folders]
    findings = list(read[0].findings)
    for f, p in zip(folders[1:], read[1:]):
        if set(p.findings) != set(findings):
            raise DataError(
                f"{folders[0].path} and {f.path} have different findings ({', '.join(findings)} vs {', '.join(p.findings)}); "
                "only runs of the same findings can be compared"
            )
    return [_pair(folders[i], folders[j], read[i], read[j], findings, n_resamples=n_resamples, seed=seed) for i, j in pairs], findings


def _aligned(fa: Any, fb: Any, pa: MultiLabelPredictions, pb: MultiLabelPredictions, findings: list[str]):
    """Rows of both files on the shared images (a's order), columns in `findings` order; labels checked."""
    row_b = {path: i for i, path in enumerate(pb.paths)}
    rows_a = [i for i, path in enumerate(pa.paths) if path in row_b]
    if not rows_a:
        raise DataError(f"{fa.path} and {fb.path} share no test image (matched by path); a paired comparison needs the same images")
    rows_b = [row_b[pa.paths[i]] for i in rows_a]
    ca, cb = [pa.findings.index(f) for f in findings], [pb.findings.index(f) for f in findings]
    ta, tb = pa.targets[np.ix_(rows_a, ca)], pb.targets[np.ix_(rows_b, cb)]
    differ = np.flatnonzero(~((ta == tb) | (np.isnan(ta) & np.isnan(tb))).all(axis=1))
    if differ.size:
        example = pa.paths[rows_a[differ[0]]]
        raise DataError(
            f"{fa.path} and {fb.path} give different labels to {differ.size} of {len(rows_a)} shared test images "
            f"(e.g. {example}); a paired comparison needs the same labels"
        )
    patients = pa.patient_ids or pb.patient_ids
    source_rows = rows_a if pa.patient_ids else rows_b
    groups = [patients[i] for i in source_rows] if patients else None
    return ta, pa.probabilities[np.ix_(rows_a, ca)], pb.probabilities[np.ix_(rows_b, cb)], groups, len(rows_a)


def _pair(fa: Any, fb: Any, pa: MultiLabelPredictions, pb: MultiLabelPredictions, findings: list[str], *,
          n_resamples: int, seed: int) -> dict[str, Any]:
    targets, prob_a, prob_b, groups, shared = _aligned(fa, fb, pa, pb, findings)
    per_finding: dict[str, Any] = {}
    for k, finding in enumerate(findings):
        known = np.flatnonzero(~np.isnan(targets[:, k]))
        y = targets[known, k].astype(np.int64)
        entry: dict[str, Any] = {"n_images": int(known.size), "n_positive": int(y.sum())}
        if not 0 < y.sum() < y.size:
            per_finding[finding] = {**entry, "error": f"{int(y.sum())} positive of {y.size} known: no AUC"}
            continue
        finding_groups = None if groups is None else [groups[i] for i in known]
        try:
            boot = resampling.paired_bootstrap_auc_test(y, prob_a[known, k], prob_b[known, k], groups=finding_groups,
                                                        n_resamples=n_resamples, seed=seed)
        except DataError as exc:
            per_finding[finding] = {**entry, "error": str(exc)}
            continue
        try:
            delong = resampling.delong_test(y, prob_a[known, k], prob_b[known, k])
        except DataError:  # fewer than 2 images of a class
            delong = {"p_value": None, "z": None}
        per_finding[finding] = {
            **entry, "n_patients": len(set(finding_groups)) if finding_groups is not None else int(known.size),
            "auc_a": boot["auc_a"], "auc_b": boot["auc_b"], "auc_diff": boot["auc_diff"], "ci": boot["ci"],
            "p_bootstrap": boot["p_value"], "p_delong": delong["p_value"], "delong_z": delong["z"], "n_valid": boot["n_valid"],
        }
    defined = [f for f in findings if "auc_a" in per_finding[f]]
    if not defined:
        raise DataError(f"comparing {fa.path} with {fb.path}: no finding has both classes among the shared known labels")
    macro = macro_paired_bootstrap(targets, prob_a, prob_b, [findings.index(f) for f in defined], groups=groups,
                                   n_resamples=n_resamples, seed=seed)
    return {
        "a": fa.name, "b": fb.name, "path_a": str(fa.path), "path_b": str(fb.path), "metric": "macro AUC",
        "n_images": shared, "n_only_a": len(pa) - shared, "n_only_b": len(pb) - shared,
        "n_patients": len(set(groups)) if groups is not None else shared,
        "bootstrap_unit": "patient" if groups is not None else "image",
        **macro, "confidence": 0.95, "p_delong": None, "delong_z": None, "seed": seed,
        "macro_findings": defined, "findings": per_finding,
    }


def macro_paired_bootstrap(
    targets: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray, columns: list[int], *, groups: Sequence[Any] | None,
    n_resamples: int, seed: int, confidence: float = 0.95,
) -> dict[str, Any]:
    """Macro AUC of a and b over `columns` (known labels only) and a joint patient bootstrap of their difference.

    Returns ``{"auc_a", "auc_b", "auc_diff", "ci", "p_bootstrap", "n_resamples", "n_valid"}``; ``ci`` and
    ``p_bootstrap`` are None when no resample had both classes of every finding."""
    n = targets.shape[0]
    if groups is None:
        cluster, n_groups = np.arange(n), n
    else:
        index: dict[Any, int] = {}
        cluster = np.asarray([index.setdefault(g, len(index)) for g in groups])
        n_groups = len(index)
    rankings = []
    for k in columns:
        known = np.flatnonzero(~np.isnan(targets[:, k]))
        y = targets[known, k].astype(np.int64)
        for probs in (prob_a, prob_b):
            ranked = RankedScores.build(y, probs[known, k])
            rankings.append((ranked, cluster[known][ranked.order]))
    point = [float(r.auc_ap(r.unit_weights())[0][0]) for r, _ in rankings]
    auc_a, auc_b = float(np.mean(point[0::2])), float(np.mean(point[1::2]))
    rng = np.random.default_rng(seed)
    diffs, done = [], 0
    while done < n_resamples:
        b = min(CHUNK, n_resamples - done)
        draws = rng.integers(0, n_groups, size=(b, n_groups)) + (np.arange(b) * n_groups)[:, None]
        counts = np.bincount(draws.ravel(), minlength=b * n_groups).reshape(b, n_groups).astype(np.float64)
        aucs, valid = zip(*[(auc, ok) for auc, _, ok in (r.auc_ap(counts[:, order]) for r, order in rankings)])
        aucs_arr, every = np.stack(aucs, axis=1), np.stack(valid, axis=1).all(axis=1)
        diffs.append((aucs_arr[:, 0::2].mean(axis=1) - aucs_arr[:, 1::2].mean(axis=1))[every])
        done += b
    d = np.concatenate(diffs)
    out: dict[str, Any] = {"auc_a": auc_a, "auc_b": auc_b, "auc_diff": auc_a - auc_b, "ci": None, "p_bootstrap": None,
                           "n_resamples": int(n_resamples), "n_valid": int(d.size)}
    if d.size:
        alpha = 1.0 - confidence
        out["ci"] = [float(v) for v in np.quantile(d, [alpha / 2, 1 - alpha / 2])]
        tail = min(int(np.sum(d <= 0)), int(np.sum(d >= 0)))
        out["p_bootstrap"] = float(min(1.0, 2.0 * (tail + 1) / (d.size + 1)))
    return out


# ------------------------------------------------------------------------- tables


def _cell(block: dict[str, Any], key: str) -> str:
    return h.format_with_ci(block.get(key), block.get(f"{key}_ci"))


def table_rows(folders: Sequence[Any], findings: list[str]) -> list[tuple[str, list[str]]]:
    """The side-by-side rows from each folder's metrics.json test block: macro figures, then per finding."""
    blocks = [f.test.to_dict() for f in folders]
    rows = [
        ("Macro AUC", [_cell(b, "macro_auc") if "macro_auc" in b else _cell(b, "auc") for b in blocks]),
        ("Micro AUC", [_cell(b, "micro_auc") for b in blocks]),
        ("Sensitivity (macro)", [h.format_number(b.get("sensitivity")) for b in blocks]),
        ("Specificity (macro)", [h.format_number(b.get("specificity")) for b in blocks]),
        ("ECE (mean over findings)", [h.format_number((b.get("calibration") or {}).get("ece_after_mean")) for b in blocks]),
    ]
    for finding in findings:
        entries = [(b.get("findings") or {}).get(finding) or {} for b in blocks]
        rows.append((f"{finding}: AUC", [_cell(e, "auc") for e in entries]))
        rows.append((f"{finding}: sensitivity / specificity", [
            f"{h.format_number(e.get('sensitivity'))} / {h.format_number(e.get('specificity'))}" for e in entries]))
        rows.append((f"{finding}: threshold", [h.format_number(e.get("threshold")) for e in entries]))
    return rows


TEST_HEADER = ["A", "B", "Finding", "AUC A", "AUC B", "AUC A \u2212 B (95% CI)", "p (paired bootstrap)", "p (DeLong)",
               "Images / patients"]


def _p(value: float | None) -> str:
    return h.DASH if value is None else ("< 0.001" if value < 0.001 else f"{value:.3f}")


def test_rows(t: dict[str, Any]) -> list[list[str]]:
    """The macro row, then one row per finding (a finding without a test says why)."""
    rows = [[t["a"], t["b"], f"macro AUC ({len(t['macro_findings'])} findings)", h.format_number(t["auc_a"]),
             h.format_number(t["auc_b"]), h.format_with_ci(t["auc_diff"], t["ci"], signed=True), _p(t["p_bootstrap"]),
             h.DASH, f"{t['n_images']:,} / {t['n_patients']:,}"]]
    for finding, e in t["findings"].items():
        if "error" in e:
            rows.append([t["a"], t["b"], finding, h.DASH, h.DASH, e["error"], h.DASH, h.DASH, f"{e['n_images']:,}"])
            continue
        rows.append([t["a"], t["b"], finding, h.format_number(e["auc_a"]), h.format_number(e["auc_b"]),
                     h.format_with_ci(e["auc_diff"], e["ci"], signed=True), _p(e["p_bootstrap"]), _p(e["p_delong"]),
                     f"{e['n_images']:,} / {e['n_patients']:,}"])
    return rows


def tests_note(tests: list[dict[str, Any]]) -> str:
    if not tests:
        return ""
    t = tests[0]
    unit = "patients" if t["bootstrap_unit"] == "patient" else "images (no patient_id column)"
    left = "; ".join(f"{x['a']} vs {x['b']}: {x['n_only_a']} images only in {x['a']}, {x['n_only_b']} only in {x['b']} left out"
                     for x in tests if x["n_only_a"] or x["n_only_b"])
    reference = " Each folder is tested against the first." if len(tests) > 1 else ""
    return (
        f"Images both folders predicted, matched by path; per finding only the labels known in both. Paired bootstrap: "
        f"{t['n_resamples']:,} resamples of {unit}, seed {t['seed']}; the macro AUC difference is bootstrapped jointly "
        "over the findings with both classes (a resample counts when each has both classes). DeLong's test is per "
        f"finding, image-level.{reference}" + (f" {left}." if left else "")
    )
