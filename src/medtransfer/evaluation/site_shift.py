"""Shift detection without labels: the run's validation images against a new site's images.

What `adapt` and `evaluate` report (metrics.json / adaptation.json "label_free_shift"), from
images alone - the new site's labels, when there are any, are never read here:

- the scores: KS test of the positive-class probability (calibrated, as the model reports it)
  between validation and the new images;
- the features: MMD test of the penultimate features (the first member's evaluation crop, the
  features the OOD guard reads);
- the OOD guard's flagged share (:class:`~medtransfer.artifacts.SavedModel` ``ood``);
- the class prior of the new site (:mod:`~medtransfer.evaluation.label_shift`: EM with a patient
  bootstrap CI, and BBSE), and both tests again against validation images matched to that prior;
- the verdict (:func:`~medtransfer.evaluation.shift_tests.shift_verdict`).

The reference is RUN/split.csv's validation rows (their labels are the source's, which is
allowed: the threshold was chosen on them), at most 1,000 of them for `adapt` and 500 for `evaluate` (seeded).

    >>> reference = reference_sample(saved, run, cache_dir=cache)                    # doctest: +SKIP
    >>> target = score_images(saved, paths, cache_dir=cache)                          # doctest: +SKIP
    >>> summary = detect_shift(saved, reference, target, prior_adapted=False)         # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medtransfer.artifacts import MODEL_DIR, MODEL_JSON, SavedModel, find_model_dir
from medtransfer.data.cache import CacheSettings, ImageCache
from medtransfer.data.datamodule import CachedImageDataset
from medtransfer.data.discover import patient_id_from_name
from medtransfer.errors import DataError
from medtransfer.evaluation import label_shift, shift_tests
from medtransfer.evaluation.calibration import apply_temperature
from medtransfer.ood import PENULTIMATE, capture
from medtransfer.privacy import folder_name, locate, relative_location
from medtransfer.rundir import RunDir
from medtransfer.runtime import default_decode_workers, device_for, predict_logits, resolve_accelerator, resolve_precision

__all__ = [
    "OOD_LIMIT", "REFERENCE_LIMIT", "Sample", "detect_shift", "detection_lines", "estimate_prior", "reference_sample",
    "run_root", "score_images", "site_shift_summary", "trained_provenance",
]

REFERENCE_LIMIT = 1000  # validation images compared with, at most (seeded sample)
OOD_LIMIT = 0.25  # flagged share above which the images are called foreign (the guard rejects 5% of validation)


@dataclass
class Sample:
    """One set of images as the model sees it. ``labels``: class indices of a reference (validation) sample; None
    for a new site. ``features``: penultimate features of the first member's evaluation crop."""

    paths: list[str]
    patient_ids: list[str]
    logits: np.ndarray  # (n, classes), the saved network's (TTA views and members averaged)
    features: np.ndarray  # (n, d)
    ood_scores: np.ndarray | None
    labels: np.ndarray | None = None

    def probabilities(self, saved: SavedModel) -> np.ndarray:
        return apply_temperature(self.logits, saved.temperature)

    def positive(self, saved: SavedModel) -> np.ndarray:
        return self.probabilities(saved)[:, saved.positive_index]

    def decisions(self, saved: SavedModel) -> np.ndarray:
        """Class indices at the saved operating point."""
        return saved.decide(self.logits).predicted

    def subset(self, rows: np.ndarray) -> Sample:
        rows = np.asarray(rows, dtype=int)
        return Sample([self.paths[i] for i in rows], [self.patient_ids[i] for i in rows], self.logits[rows],
                      self.features[rows], None if self.ood_scores is None else self.ood_scores[rows],
                      None if self.labels is None else self.labels[rows])


class OutputsAndFeatures(nn.Module):
    """One forward pass -> (n, classes + 1 + d): the network's logits, the OOD score (0 without a guard) and the
    first member's penultimate features on the evaluation crop (``network=None``: the features alone, one view)."""

    def __init__(self, saved: SavedModel, *, outputs: bool = True):
        super().__init__()
        self.member = saved.model
        self.network = saved.network if outputs else None
        self.detector = saved.ood if outputs else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        reads = self.detector.reads if self.detector is not None else ()
        with capture(self.member, reads, first_only=True) as captured:
            logits = (self.network or self.member)(images).float()
        features = captured[PENULTIMATE].float()
        score = self.detector.score(captured)[:, None].float() if self.detector is not None else torch.zeros(len(images), 1)
        if self.network is None:
            logits = torch.zeros(len(images), 0)
        return torch.cat([logits, score.to(logits.device), features.to(logits.device)], dim=1)


def score_images(
    saved: SavedModel, paths: Sequence[Path | str], *, cache_dir: Path, patient_regex: str | None = None,
    accelerator: str = "auto", skip_bad: bool = False, progress: bool = False, outputs: bool = True,
    labels: list[int] | None = None,
) -> Sample:
    """Decode (as training did), then one pass: logits, OOD score and features of every image that decodes.
    ``outputs=False``: the features alone (one view of the first member; logits and scores left empty)."""
    cache = ImageCache(cache_dir, CacheSettings(size=saved.info.decode_size))
    images = cache.build([Path(p) for p in paths], skip_bad=skip_bad, progress=progress, workers=default_decode_workers())
    device = resolve_accelerator(accelerator)
    raw = predict_logits(
        OutputsAndFeatures(saved, outputs=outputs), CachedImageDataset(images, [0] * len(images), saved.transform()),
        device=device_for(device), precision=resolve_precision("auto", device),
    )
    k = len(saved.classes) if outputs else 0
    kept = [str(paths[i]) for i in images.positions]
    patients = [patient_id_from_name(p, patient_regex) for p in kept]
    scores = raw[:, k].astype(np.float64) if outputs and saved.ood is not None else None
    chosen = None if labels is None else np.asarray([labels[i] for i in images.positions])
    return Sample(kept, patients, raw[:, :k].astype(np.float64), raw[:, k + 1 :].astype(np.float64), scores, chosen)


def run_root(run: Path) -> Path | None:
    """The run folder whose split.csv holds the validation images: RUN itself (or the parent of RUN/model), else
    the run a recalibrated or adapted model names in model.json's provenance ("trained": relative to the folder
    that holds model/, see :func:`trained_provenance`; older files: absolute)."""
    run = Path(run)
    for folder in (run, run.parent if run.name == MODEL_DIR else None):
        if folder is not None and (folder / "split.csv").is_file():
            return folder
    for json_path in (run / MODEL_DIR / MODEL_JSON, run / MODEL_JSON):
        if json_path.is_file():
            trained = ((json.loads(json_path.read_text()).get("provenance") or {}).get("trained") or {}).get("run")
            if isinstance(trained, str) and trained and (locate(trained, json_path.parent.parent) / "split.csv").is_file():
                return locate(trained, json_path.parent.parent)
    return None


def trained_provenance(provenance: dict[str, Any] | None, run: Path, out: Path) -> dict[str, Any]:
    """model.json's ``provenance.trained`` for a model derived from `run` and written to `out`/model: the trained run
    relative to `out` (privacy.relative_location; :func:`run_root` reads it back). A `run` that was derived itself
    passes its own trained run on, re-based onto `out`."""
    trained = (provenance or {}).get("trained")
    if not isinstance(trained, dict) or not isinstance(trained.get("run"), str):
        return {"run": relative_location(run, out)}
    source = locate(trained["run"], find_model_dir(run).parent)
    shown = relative_location(source, out) if source.is_dir() else folder_name(trained["run"])
    return {**trained, "run": shown}


def reference_sample(
    saved: SavedModel, run: Path, *, cache_dir: Path, limit: int = REFERENCE_LIMIT, seed: int = 0, accelerator: str = "auto",
    progress: bool = False,
) -> Sample:
    """The run's validation images (at most `limit`, a seeded sample) scored by `saved`, with their labels."""
    root = run_root(run)
    rows = RunDir(root).split() if root is not None else None
    val = [r for r in rows or [] if r.split == "val" and r.label in saved.classes]
    if not val:
        raise DataError(f"--run {run}: no split.csv with validation images (nor one in the run it was made from); "
                        "the shift tests compare with the run's validation images")
    if len(val) > limit:
        val = [val[i] for i in np.sort(np.random.default_rng(seed).choice(len(val), size=limit, replace=False))]
    sample = score_images(saved, [r.path for r in val], cache_dir=cache_dir, accelerator=accelerator, skip_bad=True,
                          progress=progress, labels=[saved.classes.index(r.label) for r in val])
    assert sample.labels is not None  # passed just above
    if len(sample.paths) < 2 or len(np.unique(sample.labels)) < len(saved.classes):
        raise DataError(f"--run {run}: {len(sample.paths)} of the {len(val)} validation images in split.csv could be read, "
                        "not every class among them; the shift tests need the run's validation images where they were")
    patient = {r.path: r.patient_id for r in val}
    sample.patient_ids = [patient[p] for p in sample.paths]
    return sample


def estimate_prior(
    saved: SavedModel, reference: Sample, target: Sample, *, bootstrap: int = 500, seed: int = 0
) -> dict[str, Any]:
    """The new site's positive-class prior: EM (point estimate, patient-bootstrap CI over both samples) and BBSE."""
    positive = saved.positive_index
    val_y = reference.labels
    assert val_y is not None, "reference: the run's labelled validation images (reference_sample)"
    source = np.bincount(val_y, minlength=len(saved.classes)) / len(val_y)
    target_probs = target.probabilities(saved)

    def em(t_rows: np.ndarray, v_rows: np.ndarray) -> float:
        shares = np.bincount(val_y[v_rows], minlength=len(saved.classes)) / len(v_rows)
        if shares.min() == 0:
            raise DataError("a class is missing from the resampled validation images")
        return float(label_shift.em_prior(target_probs[t_rows], shares).prior[positive])

    estimate = label_shift.em_prior(target_probs, source)
    result: dict[str, Any] = {
        "source_prior": float(source[positive]), "em": float(estimate.prior[positive]),
        "em_iterations": estimate.iterations, "em_converged": estimate.converged,
    }
    if bootstrap:
        result["em_interval"] = label_shift.prior_interval(
            em, len(target.paths), len(reference.paths), target_groups=target.patient_ids,
            val_groups=reference.patient_ids, n_resamples=bootstrap, seed=seed)
        result["em_ci"] = result["em_interval"]["ci"]
    try:
        bbse = label_shift.bbse_prior(reference.decisions(saved), val_y, target.decisions(saved), len(saved.classes))
        result["bbse"], result["bbse_condition"] = float(bbse.prior[positive]), bbse.condition
    except DataError as problem:
        result["bbse"], result["bbse_problem"] = None, str(problem)
    return result


def detect_shift(
    saved: SavedModel, reference: Sample, target: Sample, *, prior: dict[str, Any] | None = None,
    prior_adapted: bool = False, ood_limit: float = OOD_LIMIT, permutations: int = 500, bootstrap: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """Scores (KS), features (MMD), the OOD share, the prior, the prior-matched tests and the verdict."""
    prior = prior or estimate_prior(saved, reference, target, bootstrap=bootstrap, seed=seed)
    ks = shift_tests.ks_test(reference.positive(saved), target.positive(saved))
    mmd = shift_tests.mmd_test(reference.features, target.features, n_permutations=permutations, seed=seed)
    assert reference.labels is not None, "reference: the run's labelled validation images (reference_sample)"
    is_positive = (reference.labels == saved.positive_index).astype(int)
    matched = reference.subset(shift_tests.matched_reference(is_positive, prior["em"], seed=seed))
    matched_ks = shift_tests.ks_test(matched.positive(saved), target.positive(saved))
    matched_mmd = shift_tests.mmd_test(matched.features, target.features, n_permutations=permutations, seed=seed)
    ood: dict[str, Any] | None = None
    if target.ood_scores is not None and saved.ood is not None:
        flagged = saved.ood.flags(target.ood_scores)
        ood = {"method": saved.ood.method, "flagged": int(flagged.sum()), "flagged_fraction": float(flagged.mean()),
               "limit": ood_limit}
    verdict = shift_tests.shift_verdict(
        ks=ks, mmd=mmd, matched_ks=matched_ks, matched_mmd=matched_mmd,
        ood_share=None if ood is None else ood["flagged_fraction"], ood_limit=ood_limit, positive_share=prior["em"],
        prior_adapted=prior_adapted)
    return {"n_reference": len(reference.paths), "n_target": len(target.paths), "scores_ks": ks, "features_mmd": mmd,
            "prior": prior, "matched_reference": {"n": len(matched.paths), "scores_ks": matched_ks, "features_mmd": matched_mmd},
            "ood": ood, **verdict}


def detection_lines(summary: dict[str, Any]) -> list[str]:
    """Console lines of :func:`detect_shift`'s summary."""
    f = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    ks, mmd, prior = summary["scores_ks"], summary["features_mmd"], summary["prior"]
    ci = prior.get("em_ci")
    lines = [
        f"Label-free shift ({summary['n_target']} new images vs {summary['n_reference']} validation images): scores KS "
        f"D = {f(ks['statistic'])} (p = {f(ks['p_value'], 3)}), features MMD^2 = {f(mmd['mmd2'], 4)} "
        f"(z = {f(mmd.get('z'), 1)}, p = {f(mmd['p_value'], 3)})",
        f"  prevalence: validation {f(prior['source_prior'])}, new site estimated {f(prior['em'])} (EM"
        + (f", 95% CI {f(ci[0])}-{f(ci[1])}" if ci else "") + f"; BBSE {f(prior.get('bbse'))})",
    ]
    if summary.get("ood"):
        lines.append(f"  OOD guard: {summary['ood']['flagged_fraction']:.1%} flagged (limit {summary['ood']['limit']:.0%})")
    lines.append(f"  Verdict: {summary['verdict']}")
    lines.extend(f"    ({reason})" for reason in summary["reasons"])
    return lines


def site_shift_summary(
    saved: SavedModel, run: Path, paths: list[str], *, cache_dir: Path, accelerator: str = "auto", seed: int = 0,
    logits: np.ndarray | None = None, ood_scores: np.ndarray | None = None, patient_ids: list[str] | None = None,
    reference_limit: int = 500,
) -> dict[str, Any]:
    """evaluate's hook: the label-free summary of images `paths` (their labels are not passed, so not read).
    With `logits` (and `ood_scores`) from evaluate's own pass only the features are computed (one view).
    {"skipped": reason} when the run has no validation images to compare with."""
    try:
        reference = reference_sample(saved, run, cache_dir=cache_dir, seed=seed, accelerator=accelerator,
                                     limit=reference_limit)
        target = score_images(saved, paths, cache_dir=cache_dir, accelerator=accelerator, outputs=logits is None)
        if logits is not None:
            target.logits, target.ood_scores = np.asarray(logits, dtype=np.float64), ood_scores
            target.patient_ids = list(patient_ids or target.patient_ids)
        return detect_shift(saved, reference, target, seed=seed)
    except DataError as problem:
        return {"skipped": str(problem)}
