"""Label-free adaptation (`medtransfer adapt`) on a labelled shifted set whose labels only score.

    python benchmarks/adapt.py --run RUN --data DATA/kermany-224-test-dev \
        [--methods none,mixture,prior,prior@bayes,bn,prior+bn,tent] [--prevalences 0.3,0.85] [--bootstrap 1000] [--cache-dir D]

For each set - the whole of --data (its --split), and patient-level resamples of it drawn to
other prevalences (synthetic prior shifts: every patient of the class that runs short, a seeded
sample of the other's patients) - and each method, `adapt`'s steps (adapt.core.adapt_images, what
`medtransfer adapt` writes; the tests check that the written folder scores alike) run on a folder
that holds only links to the images (no labels, no class folders), and the adapted model is then
scored with the labels: AUC, accuracy, sensitivity, specificity and ECE at its own
operating point, 95% patient-bootstrap CIs, and paired differences against the unadapted model
("none") on the same patient resamples (AUC: resampling.paired_bootstrap_auc_test). A refused
adaptation is reported with its reason. Also: the estimated prevalence against the true one and
the verdict of the label-free shift tests. Prints ONE JSON line on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from medtransfer.adapt.core import adapt_images
from medtransfer.adapt.images import list_unlabelled
from medtransfer.artifacts import SavedModel, load_model
from medtransfer.config import default_cache_dir
from medtransfer.data.discover import Record
from medtransfer.errors import MedtransferError
from medtransfer.evaluation.calibration import expected_calibration_error
from medtransfer.evaluation.evaluate import SplitOutputs, split_metrics
from medtransfer.evaluation.external import discover_external
from medtransfer.evaluation.resampling import paired_bootstrap_auc_test
from medtransfer.evaluation.site_shift import Sample, reference_sample, score_images
from medtransfer.evaluation.thresholds import OperatingPoint

KEYS = ("auc", "accuracy", "sensitivity", "specificity")
TARGETS = {"accuracy": 0.90, "sensitivity": 0.95, "specificity": 0.85}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prevalence_subset(records: list[Record], positive: str, share: float, seed: int) -> list[Record]:
    """Whole patients, drawn so that about `share` of the images are `positive`: every patient of the class that
    runs short, a seeded random sample of the other class's patients."""
    rng = np.random.default_rng(seed)
    patients: dict[bool, dict[str, list[Record]]] = {True: defaultdict(list), False: defaultdict(list)}
    for r in records:
        patients[r.label == positive][r.patient_id].append(r)
    n_pos = sum(map(len, patients[True].values()))
    n_neg = sum(map(len, patients[False].values()))
    keep_pos = share / (1 - share) * n_neg <= n_pos  # negatives run short: keep them all, draw positives
    drawn_class = keep_pos
    wanted = share / (1 - share) * n_neg if keep_pos else (1 - share) / share * n_pos
    chosen = [r for group in patients[not drawn_class].values() for r in group]
    ids = list(patients[drawn_class])
    taken = 0
    for i in rng.permutation(len(ids)):
        if taken >= wanted:
            break
        group = patients[drawn_class][ids[i]]
        chosen.extend(group)
        taken += len(group)
    return sorted(chosen, key=lambda r: str(r.path))


def link_folder(records: list[Record], folder: Path) -> Path:
    """A folder of symbolic links to the images: no class folders, nothing but the files' own names."""
    folder.mkdir(parents=True)
    for i, r in enumerate(records):
        target = folder / Path(r.path).name
        if target.exists():
            target = folder / f"{i}-{Path(r.path).name}"
        target.symlink_to(Path(r.path).resolve())
    return folder


def scored(saved: SavedModel, records: list[Record], cache_dir: Path) -> Sample:
    """The model's outputs on the labelled images (TTA and members as saved); the labels ride along for scoring only."""
    labels = [saved.classes.index(r.label) for r in records]
    sample = score_images(saved, [r.path for r in records], cache_dir=cache_dir, labels=labels)
    sample.patient_ids = [r.patient_id for r in records]
    return sample


def rows_of(sample: Sample, paths: list[Path]) -> Sample:
    """The rows of `sample` (scored on the real files) for `paths` (links to them), in that order, without labels."""
    index = {str(Path(p).resolve()): i for i, p in enumerate(sample.paths)}
    chosen = sample.subset(np.asarray([index[str(Path(p).resolve())] for p in paths]))
    chosen.labels, chosen.paths = None, [str(p) for p in paths]
    return chosen


def labelled(sample: Sample, truth: Sample) -> SplitOutputs:
    """A label-free sample's outputs with the labels of the same images (matched by file), for scoring."""
    index = {str(Path(p).resolve()): i for i, p in enumerate(truth.paths)}
    rows = [index[str(Path(p).resolve())] for p in sample.paths]
    return SplitOutputs([truth.paths[i] for i in rows], truth.labels[rows], [truth.patient_ids[i] for i in rows],
                        sample.logits)


def figures(saved: SavedModel, outputs: SplitOutputs, bootstrap: int, seed: int) -> dict[str, Any]:
    point = OperatingPoint.from_info(saved.info)
    block = split_metrics(outputs, point, saved.classes, bootstrap=bootstrap, seed=seed)
    probs = point.probabilities(outputs.logits)[:, point.positive_index]
    y = (outputs.labels == point.positive_index).astype(int)
    out = {k: round(block[k], 4) for k in KEYS} | {f"{k}_ci": [round(v, 4) for v in block[f"{k}_ci"]] for k in KEYS
                                                      if f"{k}_ci" in block}
    out["ece"] = round(expected_calibration_error(y, probs), 4)
    out["threshold"] = round(float(point.threshold), 4)
    out["positive_calls"] = round(float((probs >= point.threshold).mean()), 4)
    return out


def _weighted_rates(y: np.ndarray, called: np.ndarray, probs: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, sensitivity, specificity and ECE (15 bins) per row of bootstrap weights w (b, n)."""
    pos, neg = w @ y, w @ (1 - y)
    out = {"accuracy": (w @ (called == y)) / w.sum(axis=1), "sensitivity": (w @ (called & (y == 1))) / np.maximum(pos, 1e-12),
           "specificity": (w @ (~called & (y == 0))) / np.maximum(neg, 1e-12)}
    bins = np.minimum((probs * 15).astype(int), 14)
    ece = np.zeros(len(w))
    for b in range(15):
        members = bins == b
        if members.any():
            weight = w[:, members].sum(axis=1)
            gap = np.abs(w[:, members] @ probs[members] - w[:, members] @ y[members])
            ece += np.where(weight > 0, gap, 0.0)
    out["ece"] = ece / w.sum(axis=1)
    return out


def paired(base: tuple[SavedModel, SplitOutputs], other: tuple[SavedModel, SplitOutputs], *, resamples: int,
           seed: int) -> dict[str, Any]:
    """method - none on the same patient-bootstrap resamples: point difference, 95% CI and two-sided p."""
    (s0, o0), (s1, o1) = base, other
    by_path = {p: i for i, p in enumerate(o1.paths)}
    order = np.asarray([by_path[p] for p in o0.paths])
    y = (o0.labels == s0.positive_index).astype(int)
    p0 = OperatingPoint.from_info(s0.info).probabilities(o0.logits)[:, s0.positive_index]
    p1 = OperatingPoint.from_info(s1.info).probabilities(o1.logits[order])[:, s1.positive_index]
    c0, c1 = p0 >= s0.threshold, p1 >= s1.threshold
    ids = np.unique(np.asarray(o0.patient_ids, dtype=object).astype(str), return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, ids.max() + 1, ids.max() + 1), minlength=ids.max() + 1)
                       for _ in range(resamples)])
    weights = np.vstack([np.ones((1, len(y))), counts[:, ids].astype(np.float64)])
    a, b = _weighted_rates(y, c0, p0, weights), _weighted_rates(y, c1, p1, weights)
    out = {}
    for key in a:
        diff = b[key] - a[key]
        draws = diff[1:]
        p = min(1.0, 2 * (min((draws <= 0).sum(), (draws >= 0).sum()) + 1) / (len(draws) + 1))
        out[key] = {"diff": round(float(diff[0]), 4), "ci": [round(float(v), 4) for v in np.quantile(draws, [0.025, 0.975])],
                    "p": round(p, 4)}
    auc = paired_bootstrap_auc_test(y, p1, p0, groups=o0.patient_ids, n_resamples=resamples, seed=seed)
    out["auc"] = {"diff": round(auc["auc_diff"], 4), "ci": [round(v, 4) for v in auc["ci"]], "p": round(auc["p_value"], 4)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="Labelled shifted set (labels only score)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--methods", default="none,mixture,prior,prior@bayes,bn,prior+bn,tent",
                        help="none (the model as trained), adapt's methods; METHOD@bayes: the bayes operating-point rule")
    parser.add_argument("--prevalences", default="0.3,0.85", help="Synthetic prior shifts drawn from --data ('' for none)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    cache = args.cache_dir or default_cache_dir()
    saved = load_model(args.run)
    records = discover_external(saved, args.data, split=args.split, cache_dir=cache)
    positive = saved.info.positive_class
    sets = {"all": records}
    for share in (float(s) for s in args.prevalences.split(",") if s.strip()):
        sets[f"prevalence_{share:g}"] = prevalence_subset(records, positive, share, args.seed)
    log(f"scoring the run's validation images ({args.run}) and the {len(records)} images of {args.data}")
    reference = reference_sample(saved, args.run, cache_dir=cache, seed=args.seed)
    everything = scored(saved, records, cache)
    quiet = Console(stderr=True, quiet=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, chosen in sets.items():
            images = list_unlabelled(link_folder(chosen, Path(tmp) / name), patient_regex=None)
            target = rows_of(everything, images.paths)
            target.patient_ids = list(images.patient_ids)
            truth = float(np.mean([r.label == positive for r in chosen]))
            block: dict[str, Any] = {"images": len(chosen), "patients": len({r.patient_id for r in chosen}),
                                     "prevalence": round(truth, 4), "methods": {}}
            base = (saved, labelled(target, everything))
            shift = None
            for method in args.methods.split(","):
                log(f"{name}: {method}")
                t0 = time.perf_counter()
                if method == "none":
                    block["methods"]["none"] = figures(saved, base[1], args.bootstrap, args.seed)
                    continue
                name_, _, rule = method.partition("@")  # prior@bayes: the bayes operating-point rule
                try:
                    adaptation = adapt_images(saved, args.run, images, method=name_, operating_point=rule or "keep",
                                              cache_dir=cache, seed=args.seed, console=quiet, reference=reference,
                                              target=target)
                except MedtransferError as refusal:
                    block["methods"][method] = {"refused": str(refusal), "seconds": round(time.perf_counter() - t0, 1)}
                    continue
                record = adaptation.record
                if shift is None:
                    before = record["shift_before"]
                    em = before["prior"]
                    shift = {"kind": before["kind"], "verdict": before["verdict"],
                             "scores_ks_p": before["scores_ks"]["p_value"], "scores_ks_d": before["scores_ks"]["statistic"],
                             "features_mmd_p": before["features_mmd"]["p_value"], "features_mmd_z": before["features_mmd"]["z"],
                             "ood_flagged_fraction": (before.get("ood") or {}).get("flagged_fraction"),
                             "estimated_prevalence": round(em["em"], 4), "prevalence_ci": em.get("em_ci"), "bbse": em.get("bbse")}
                adapted, outputs = adaptation.model, labelled(adaptation.outputs, everything)
                prior, fitted = record["prior"] or record["shift_after"]["prior"], record.get("mixture")
                keys = ("fit", "cut", "cut_ci", "expected_sensitivity", "expected_specificity", "goodness_of_fit",
                        "uncertain_share")
                estimate = ({"estimated_prevalence": round(fitted["fit"]["prevalence"], 4),
                             "prevalence_ci": fitted.get("prevalence_ci"), "mixture": {k: fitted.get(k) for k in keys}}
                            if fitted else {"estimated_prevalence": round(prior["em"], 4), "prevalence_ci": prior.get("em_ci"),
                                            "bbse": prior.get("bbse")})
                block["methods"][method] = {
                    **figures(adapted, outputs, args.bootstrap, args.seed),
                    "paired_vs_none": paired(base, (adapted, outputs), resamples=args.bootstrap, seed=args.seed), **estimate,
                    "verdict": record["verdict"]["verdict"], "after": record["verdict"]["after"],
                    "checks": record["checks"], "ranking": record["ranking"], "seconds": round(time.perf_counter() - t0, 1),
                }
                done = block["methods"][method]
                log(f"{name}: {method}: accuracy {done['accuracy']:.3f} sensitivity {done['sensitivity']:.3f} "
                    f"specificity {done['specificity']:.3f} ({done['seconds']} s)")  # progress, in case the run is cut short
            block["label_free_shift"] = shift  # the tests before adaptation (labels not used)
            results[name] = block
    adapted_all = {m: v for m, v in results["all"]["methods"].items() if m != "none" and "refused" not in v}
    best = max(adapted_all, key=lambda m: adapted_all[m]["accuracy"]) if adapted_all else None
    summary = None
    if best:
        chosen = adapted_all[best]
        summary = {"method": best, **{k: chosen[k] for k in ("accuracy", "sensitivity", "specificity", "auc")},
                   **{f"{k}_ci": chosen.get(f"{k}_ci") for k in ("accuracy", "sensitivity", "specificity")},
                   "targets_met": all(chosen[k] >= v for k, v in TARGETS.items())}
    print(json.dumps({"run": str(args.run), "data": str(args.data), "split": args.split, "sets": results, "best_on_all": summary,
                      "targets": TARGETS, "bootstrap": args.bootstrap, "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
