"""`medtransfer adapt`: a trained model moved to a new site that has images but no labels.

    medtransfer adapt --run RUN --data UNLABELLED --out NEW [--method mixture|prior|bn|prior+bn|tent]

1. The new images (a folder, searched recursively; labels never read: :mod:`~medtransfer.adapt.images`)
   and the run's validation images (RUN/split.csv) are scored by the saved model.
2. Shift detection (:mod:`medtransfer.evaluation.site_shift`): KS on the scores, MMD on the features,
   the OOD guard's flagged share, the estimated prevalence, the verdict.
3. Refusals, before anything is written (:mod:`~medtransfer.adapt.checks`): more OOD-flagged images than
   ``max_ood_share``; fewer images than BatchNorm re-estimation needs; BatchNorm methods on a pure prevalence
   shift or when the features move away from validation; an implausible prior estimate; a poor mixture fit.
4. The method: ``mixture`` (the new site's scores fitted as validation's class scores, each shifted, at a new
   prevalence; the threshold policy applied to that fit; temperature and classifier bias from the fitted
   posterior: :mod:`~medtransfer.adapt.mixture`), ``prior`` (EM prior folded into the head's bias; threshold
   by ``operating_point``: :mod:`~medtransfer.adapt.operating`), ``bn`` (AdaBN relative to the source
   statistics), ``prior+bn`` (AdaBN, then the prior estimated on the adapted outputs) or ``tent``
   (:mod:`~medtransfer.adapt.batchnorm`).
5. What changed, named: the tensors, the threshold, and the ranking of the new images (identical for a
   prior alone; for BatchNorm methods the rank correlation and the share of decisions that changed: the
   AUC on this site cannot be known without labels). The shift tests again after adaptation.
6. NEW/model (weights, model.json with ``provenance.adapted``: method, estimates, the data's digest; the
   OOD guard carried over) and NEW/adaptation.json. Every command takes ``--run NEW``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from scipy.stats import spearmanr
from torch.utils.data import DataLoader

from medtransfer.adapt import batchnorm, checks, mixture, operating
from medtransfer.adapt.images import UnlabelledImages, list_unlabelled
from medtransfer.adapt.report import adaptation_lines
from medtransfer.artifacts import SavedModel, find_model_dir, load_model, save_model
from medtransfer.data.cache import CacheSettings, ImageCache
from medtransfer.data.datamodule import CachedImageDataset
from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation import site_shift
from medtransfer.evaluation.site_shift import Sample
from medtransfer.evaluation.shift_tests import PREVALENCE
from medtransfer.ood import OOD_JSON, OOD_WEIGHTS
from medtransfer.privacy import relative_location, visible_settings, without_folders
from medtransfer.rundir import write_text_atomic
from medtransfer.runtime import default_decode_workers

__all__ = ["ADAPTATION_FILE", "Adaptation", "DEFAULT_METHOD", "METHODS", "adapt_images", "adapt_model"]

METHODS = ("mixture", "prior", "bn", "prior+bn", "tent")
DEFAULT_METHOD = "mixture"  # measured best: docs/guide/adapt.md (benchmarks/adapt.py)
ADAPTATION_FILE = "adaptation.json"


@dataclass
class Adaptation:
    """An adaptation in memory: adaptation.json's record, the adapted model, and the new images as it scores them."""

    record: dict[str, Any]
    model: SavedModel
    outputs: Sample


def _check_choices(method: str, operating_point: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"--method: got {method!r}; choose one of {', '.join(METHODS)}")
    if operating_point not in operating.RULES:
        raise ConfigError(f"--operating-point: got {operating_point!r}; choose one of {', '.join(operating.RULES)}")


def adapt_model(
    run: Path, data: Path, out: Path, *, method: str = DEFAULT_METHOD, operating_point: str = "keep", cache_dir: Path,
    min_images: int = batchnorm.MIN_IMAGES, max_ood_share: float = site_shift.OOD_LIMIT,
    max_prior_ci: float = checks.MAX_PRIOR_CI,
    bootstrap: int = 500, permutations: int = 500, seed: int = 0, tent_epochs: int = 1, tent_lr: float = 1e-3,
    accelerator: str = "auto", progress: bool = True, console: Console | None = None, reference: Sample | None = None,
) -> dict[str, Any]:
    """Adapt the model in `run` to the images under `data` (no labels) and write NEW/model; returns adaptation.json.
    `reference`: the run's validation images already scored by this model (site_shift.reference_sample), to reuse."""
    console = console or Console()
    _check_choices(method, operating_point)
    saved = load_model(run)
    _check_out(out, run)
    images = list_unlabelled(data, patient_regex=(saved.info.training_config or {}).get("patient_regex"))
    adaptation = adapt_images(
        saved, run, images, method=method, operating_point=operating_point, cache_dir=cache_dir, min_images=min_images,
        max_ood_share=max_ood_share, max_prior_ci=max_prior_ci, bootstrap=bootstrap, permutations=permutations, seed=seed,
        tent_epochs=tent_epochs, tent_lr=tent_lr, accelerator=accelerator, progress=progress, console=console,
        reference=reference)
    record = _write(saved, adaptation.model, adaptation.record, run, data, out)
    for line in adaptation_lines(record):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return record


def adapt_images(
    saved: SavedModel, run: Path, images: UnlabelledImages, *, method: str = DEFAULT_METHOD, operating_point: str = "keep",
    cache_dir: Path, min_images: int = batchnorm.MIN_IMAGES, max_ood_share: float = site_shift.OOD_LIMIT,
    max_prior_ci: float = checks.MAX_PRIOR_CI, bootstrap: int = 500, permutations: int = 500, seed: int = 0, tent_epochs: int = 1,
    tent_lr: float = 1e-3, accelerator: str = "auto", progress: bool = False, console: Console | None = None,
    reference: Sample | None = None, target: Sample | None = None,
) -> Adaptation:
    """Steps 1-5 in memory (nothing written; DataError for a refusal). `reference` / `target`: the run's validation
    images and `images` already scored by `saved` (site_shift.score_images), to reuse across methods."""
    console = console or Console(quiet=True)
    _check_choices(method, operating_point)
    if saved.task.multilabel or len(saved.classes) != 2:
        raise ConfigError(f"--run {run}: adapt supports two-class single-label models; this one has classes "
                          f"{', '.join(saved.classes)} ({saved.info.task})")
    assert saved.threshold is not None  # a single-label model's (checked on load)
    data = images.root
    uses_bn = method in ("bn", "prior+bn", "tent")
    if uses_bn and len(images.paths) < min_images:
        raise DataError(f"--data {data}: {len(images.paths)} images; --method {method} re-estimates BatchNorm statistics, "
                        f"which needs at least {min_images} (fewer give noisy variances that can make the model worse). "
                        "Add images or use --method prior")
    options: dict[str, Any] = dict(cache_dir=cache_dir, accelerator=accelerator)
    console.print(f"Scoring {len(images.paths)} new images and the run's validation images", style="dim")
    if reference is None:
        reference = site_shift.reference_sample(saved, run, seed=seed, progress=progress, **options)
    if target is None:
        target = _score(saved, images, progress=progress, **options)
    before = site_shift.detect_shift(saved, reference, target, permutations=permutations, bootstrap=bootstrap, seed=seed)
    ood = before.get("ood")
    if ood and ood["flagged_fraction"] > max_ood_share:
        raise DataError(
            f"--data {data}: the OOD guard flags {ood['flagged_fraction']:.1%} of the images (limit {max_ood_share:.0%}): "
            "they do not look like the training data, and no label-free adaptation makes the model valid for them; "
            f"nothing written. Label {before['images_to_label']} images and run recalibrate, or check the data")
    adapted, target_bn = saved, target
    changes: list[str] = []
    if uses_bn:
        adapted, changes = _adapt_batchnorm(saved, images, reference, method, seed=seed, min_images=min_images,
                                            tent_epochs=tent_epochs, tent_lr=tent_lr, **options)
        target_bn = _score(adapted, images, progress=False, **options)
    estimated = before["prior"] if not uses_bn else site_shift.estimate_prior(
        adapted, reference, target_bn, bootstrap=bootstrap, seed=seed)
    # what remains detectable: the BatchNorm-adapted outputs and features against validation, before any prior fold
    # (a prior or a mixture changes no feature: the tests before adaptation stand)
    after = before if not uses_bn else site_shift.detect_shift(
        adapted, reference, target_bn, prior=estimated, prior_adapted="prior" in method, permutations=permutations, seed=seed)
    if uses_bn:
        checks.check_batchnorm(before, after, data)
    prior = estimated if "prior" in method else None
    if prior is not None:
        checks.check_prior(prior, max_prior_ci, data)
    threshold, threshold_reason, target_final = saved.threshold, "unchanged (no prior adjustment)", target_bn
    if prior is not None:
        assert reference.labels is not None  # the run's labelled validation images (site_shift.reference_sample)
        source = np.array([1 - prior["source_prior"], prior["source_prior"]])
        estimate = np.array([1 - prior["em"], prior["em"]])
        if saved.positive_index == 0:
            source, estimate = source[::-1], estimate[::-1]
        adapted = _copy(adapted)
        offsets = [operating.fold_prior(m, saved.temperature, source, estimate) for m in (adapted.model, *adapted.extra)]
        changes.append(f"classifier bias: + temperature x log(prior ratio) = {[round(v, 4) for v in offsets[0]]} "
                       f"per class (prevalence {prior['source_prior']:.3f} -> {prior['em']:.3f})")
        threshold, threshold_reason = operating.adapted_threshold(
            saved.threshold, saved.info.threshold_policy, operating_point, prior["source_prior"], prior["em"],
            val_positive_probs=reference.positive(saved), val_is_positive=(reference.labels == saved.positive_index))
        target_final = _shift_logits(target_bn, offsets[0])
    temperature, fitted = saved.temperature, None
    if method == "mixture":
        fitted = _mixture_estimate(saved, reference, target, bootstrap=bootstrap, seed=seed)
        checks.check_mixture(fitted, max_prior_ci, data)
        adapted, temperature, threshold, threshold_reason, change = _apply_mixture(saved, fitted)
        changes.append(change)
        target_final = dataclasses.replace(target, logits=_mapped_logits(target.logits, saved, fitted))
    if threshold != saved.threshold:
        changes.append(f"threshold {saved.threshold:.4f} -> {threshold:.4f} ({threshold_reason})")
    adapted = SavedModel(adapted.model, dataclasses.replace(saved.info, threshold=float(threshold), temperature=temperature),
                         saved.ood, adapted.extra)
    record = {
        "method": method, "operating_point": operating_point, "run": str(run), "data": images.to_dict(),
        "changes": changes, "threshold": {"before": saved.threshold, "after": float(threshold), "rule": threshold_reason},
        "temperature": {"before": saved.temperature, "after": temperature}, "prior": prior, "mixture": fitted,
        "ranking": _ranking(saved, adapted, target, target_final),
        "shift_before": before, "shift_after": after, "verdict": _verdict(before, after, method),
        "checks": checks.passed_checks(before, after, prior, len(images.paths), min_images, max_ood_share, max_prior_ci,
                                       uses_bn, fitted),
        "settings": {"min_images": min_images, "max_ood_share": max_ood_share, "max_prior_ci": max_prior_ci,
                     "bootstrap": bootstrap, "permutations": permutations, "seed": seed,
                     **({"tent_epochs": tent_epochs, "tent_lr": tent_lr} if method == "tent" else {})},
    }
    return Adaptation(record, adapted, target_final)


def _check_out(out: Path, run: Path) -> None:
    if Path(out).resolve() in (Path(run).resolve(), find_model_dir(run).resolve()):
        raise ConfigError(f"--out {out}: must differ from the run folder; adapt writes a new model folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty folder; choose a new folder (the run is never written to)")


def _score(saved: SavedModel, images: UnlabelledImages, *, progress: bool, **options) -> Sample:
    sample = site_shift.score_images(saved, images.paths, progress=progress, **options)
    if len(sample.paths) != len(images.paths):  # pragma: no cover - build raises on a bad image unless skip_bad
        raise DataError("some images could not be decoded")
    sample.patient_ids = list(images.patient_ids)
    return sample


def _copy(saved: SavedModel) -> SavedModel:
    """A deep copy of the members (the loaded model stays as it was)."""
    import copy

    return SavedModel(copy.deepcopy(saved.model), saved.info, saved.ood, tuple(copy.deepcopy(m) for m in saved.extra))


def _adapt_batchnorm(
    saved: SavedModel, images: UnlabelledImages, reference: Sample, method: str, *, seed: int, min_images: int,
    tent_epochs: int, tent_lr: float, cache_dir: Path, accelerator: str,
) -> tuple[SavedModel, list[str]]:
    """Source-relative AdaBN (or TENT) on every member, on the CPU in float32 (statistics want full precision): the
    source moments from the run's validation images, the new ones from `images`."""
    cache = ImageCache(cache_dir, CacheSettings(size=saved.info.decode_size))

    def loader(paths: list, *, shuffle: bool):
        cached = cache.build([Path(p) for p in paths], skip_bad=False, progress=False, workers=default_decode_workers())
        dataset = CachedImageDataset(cached, [0] * len(cached), saved.transform())
        return len(cached), lambda: (batch[0] for batch in DataLoader(
            dataset, batch_size=64, shuffle=shuffle, generator=torch.Generator().manual_seed(seed)))

    count, batches = loader(images.paths, shuffle=True)
    _, source_batches = loader(reference.paths, shuffle=False)
    members, changes = [], []
    for member in (saved.model, *saved.extra):
        member = member.to("cpu").float()
        source = batchnorm.input_moments(member, source_batches())
        if method == "tent":
            new, entropy = batchnorm.tent(member, batches, images=count, epochs=tent_epochs, lr=tent_lr,
                                          minimum=min_images, source=source)
            changes.append(f"TENT: mean prediction entropy per epoch {[round(e, 4) for e in entropy]}")
        else:
            new = batchnorm.reestimate_batchnorm(member, batches, images=count, minimum=min_images, source=source)
        members.append(new)
    changed = batchnorm.changed_tensors(saved.model, members[0])
    kinds = sorted({name.rsplit(".", 1)[-1] for name in changed})
    what = ("affine weight and bias trained by entropy minimisation, then running statistics" if method == "tent"
            else "running statistics")
    changes.append(f"BatchNorm: {what} re-estimated on {count} images relative to {len(reference.paths)} validation images "
                   f"in {len(batchnorm.batchnorm_layers(members[0]))} layers"
                   f"{f' of each of {len(members)} members' if len(members) > 1 else ''} ({len(changed)} tensors: "
                   f"{', '.join(kinds)}); convolution and classifier weights unchanged")
    return SavedModel(members[0], saved.info, saved.ood, tuple(members[1:])), changes


def _shift_logits(sample: Sample, offsets: list[float]) -> Sample:
    return dataclasses.replace(sample, logits=sample.logits + np.asarray(offsets)[None, :])


def _mixture_estimate(saved: SavedModel, reference: Sample, target: Sample, *, bootstrap: int, seed: int) -> dict[str, Any]:
    """The shifted-mixture fit on calibrated logits (adapt.mixture), validation labels for the class densities."""
    assert reference.labels is not None
    k = saved.positive_index

    def calibrated_logit(sample: Sample) -> np.ndarray:
        return (sample.logits[:, k] - sample.logits[:, 1 - k]) / saved.temperature

    return mixture.estimate_operating_point(
        calibrated_logit(reference), reference.labels == k, calibrated_logit(target),
        policy=saved.info.threshold_policy or "youden", target_groups=target.patient_ids, bootstrap=bootstrap,
        seed=seed)


def _apply_mixture(saved: SavedModel, fitted: dict[str, Any]) -> tuple[SavedModel, float, float, str, str]:
    """A copy of the model with the fitted posterior folded in: (model, temperature, threshold, why, what changed)."""
    adapted = _copy(saved)
    temperature, bias = saved.temperature, [0.0, 0.0]
    for member in (adapted.model, *adapted.extra):
        temperature, bias = operating.fold_logit_map(member, saved.temperature, fitted["alpha"], fitted["beta"],
                                                     saved.positive_index)
    threshold = float(1 / (1 + np.exp(-(fitted["alpha"] + fitted["beta"] * fitted["cut"]))))
    why = (f"the {fitted['policy']} cut on the new site's fitted class-conditional scores (calibrated logit "
           f"{fitted['cut']:.3f}; expected sensitivity {fitted['expected_sensitivity']:.3f}, specificity "
           f"{fitted['expected_specificity']:.3f}: model-based, not measured)")
    change = (f"temperature {saved.temperature:.4f} -> {temperature:.4f} and classifier bias + {[round(v, 4) for v in bias]}: "
              "the posterior under the fitted mixture (the order of the images unchanged)")
    return adapted, temperature, threshold, why, change


def _mapped_logits(logits: np.ndarray, saved: SavedModel, fitted: dict[str, Any]) -> np.ndarray:
    """The logits the adapted model outputs: offsets alpha * T' on the positive class (its temperature is T' = T/beta)."""
    out = np.array(logits, dtype=np.float64)
    out[:, saved.positive_index] += fitted["alpha"] * saved.temperature / fitted["beta"]
    return out


def _ranking(saved: SavedModel, adapted: SavedModel, before: Sample, after: Sample) -> dict[str, Any]:
    """How the adaptation moved the new images' order and decisions (the AUC itself needs labels)."""
    k = saved.positive_index
    p0, p1 = (s.logits[:, k] - s.logits[:, 1 - k] for s in (before, after))  # logit margins: no saturation ties
    d0, d1 = before.decisions(saved), after.decisions(adapted)
    rho = float(spearmanr(p0, p1).statistic) if len(p0) > 2 and np.ptp(p0) > 0 and np.ptp(p1) > 0 else None
    same = bool(np.array_equal(np.argsort(p0, kind="stable"), np.argsort(p1, kind="stable"))
                or (rho is not None and rho > 1 - 1e-12))
    return {
        "order_unchanged": same, "spearman": rho,
        "auc_change": "none: the same order of the images, the same AUC" if same else
        "unknown without labels: the weights changed the order of the images (see spearman)",
        "decisions_changed": int((d0 != d1).sum()), "decisions_changed_fraction": float((d0 != d1).mean()),
        "positive_calls_before": float((d0 == saved.positive_index).mean()),
        "positive_calls_after": float((d1 == saved.positive_index).mean()),
    }


def _verdict(before: dict[str, Any], after: dict[str, Any], method: str) -> dict[str, Any]:
    """The verdict on the shift found before adaptation, and what the tests still detect after it."""
    sentence = before["verdict"]
    if before["kind"] == PREVALENCE and ("prior" in method or method == "mixture"):
        sentence = "prevalence shift, adapted"
    residual = after["verdict"] if after is not before else "the same (outputs moved, not the images' features)"
    return {"verdict": sentence, "kind": before["kind"], "after": residual, "after_kind": after["kind"], "method": method}


def _write(saved: SavedModel, adapted: SavedModel, record: dict[str, Any], run: Path, data: Path, out: Path) -> dict[str, Any]:
    """NEW/model (weights, model.json with provenance, the OOD guard) and NEW/adaptation.json; returns the record as
    written: shareable, the run relative to NEW and the data by its name (privacy.py)."""
    folders = (run, data, out)
    record = without_folders({**record, "run": relative_location(run, out)}, folders)
    trained = site_shift.trained_provenance(saved.info.provenance, run, out)
    earlier = without_folders({k: v for k, v in (saved.info.provenance or {}).items() if k != "trained"}, folders)
    provenance = {**earlier, "trained": trained, "adapted": _provenance(record)}
    info = dataclasses.replace(adapted.info, provenance=provenance, members=None, versions=None,
                               training_config=visible_settings(adapted.info.training_config))  # an older run's: no folders
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / ADAPTATION_FILE, json.dumps(record, indent=2))
    source = find_model_dir(run)
    for name in (OOD_WEIGHTS, OOD_JSON):  # the guard reads the stages and the head's input (a bias change leaves them)
        if (source / name).is_file():
            (out / "model").mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, out / "model" / name)
    save_model(adapted.model, info, out, extra=adapted.extra)  # model.json last: the folder is whole once it exists
    return record


def _provenance(record: dict[str, Any]) -> dict[str, Any]:
    """The model.json summary of adaptation.json."""
    prior = record["prior"] or {}
    before = record["shift_before"]
    return {
        "method": record["method"], "operating_point": record["operating_point"], "run": record["run"],
        "data": record["data"], "changes": record["changes"], "threshold_before": record["threshold"]["before"],
        "ranking": {k: record["ranking"][k] for k in ("order_unchanged", "spearman", "decisions_changed_fraction")},
        **({"prevalence": {"source": prior["source_prior"], "estimate": prior["em"], "ci": prior.get("em_ci"),
                           "bbse": prior.get("bbse")}} if prior else {}),
        **({"mixture": {k: record["mixture"].get(k) for k in (
            "fit", "cut", "cut_ci", "prevalence_ci", "alpha", "beta", "expected_sensitivity", "expected_specificity",
            "goodness_of_fit")}} if record.get("mixture") else {}),
        "shift": {"verdict": before["verdict"], "scores_ks_p": before["scores_ks"]["p_value"],
                  "features_mmd_p": before["features_mmd"]["p_value"],
                  "ood_flagged_fraction": (before.get("ood") or {}).get("flagged_fraction")},
        "verdict_after": record["verdict"]["after"], "record": ADAPTATION_FILE,
    }
