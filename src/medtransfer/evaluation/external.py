"""`medtransfer evaluate`: a saved model on any labelled folder or CSV, written to a new folder.

The run is only read: threshold and temperature come from model.json (chosen on the run's
validation split), so an external test set is scored exactly as the run's own test split.
With an OOD detector (model/ood.*) metrics.json also gets "ood": the share of images flagged
as foreign and the metrics without them ("test" keeps every image).

A multi-label model (model.json ``task: multi-label``) is scored the same way with its
per-finding temperatures and thresholds: per-finding AUC, AP, sensitivity, specificity and
calibration, macro and micro AUC with patient-bootstrap CIs
(:func:`medtransfer.evaluation.multilabel.multilabel_split_metrics`), the multi-label
predictions CSV and figures, and the shift summary per finding. The set's findings are matched
to the model's by name; a model finding the set lacks is masked on every image and listed
under "findings_match" (:mod:`medtransfer.evaluation.multilabel_external`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from medtransfer.artifacts import SavedModel, find_model_dir, load_model
from medtransfer.data.cache import CacheSettings, ImageCache
from medtransfer.data.datamodule import CachedImageDataset
from medtransfer.data.discover import Record, apply_class_map, discover
from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation.evaluate import SplitOutputs, split_metrics, write_plots, write_predictions
from medtransfer.evaluation.multilabel import multilabel_split_metrics, write_multilabel_predictions
from medtransfer.evaluation.multilabel_external import (
    ExternalFindings, discover_multilabel_external, multilabel_ood_summary, multilabel_shift, point_of,
)
from medtransfer.evaluation.plots_multilabel import write_multilabel_plots
from medtransfer.evaluation.shift import multilabel_shift_lines, shift_lines, shift_summary
from medtransfer.evaluation.thresholds import OperatingPoint
from medtransfer.models.inference import override_warning
from medtransfer.ood import LogitsAndScore, ScoredModel
from medtransfer.privacy import folder_name, relative_location, without_folders
from medtransfer.runtime import (
    default_decode_workers, default_num_workers, device_for, hardware_summary, predict_logits, resolve_accelerator,
    resolve_precision,
)
from medtransfer.rundir import Predictions, RunDir, write_metrics


def evaluate_saved_model(
    run: Path,
    data: Path,
    out: Path,
    *,
    split: str = "test",
    cache_dir: Path,
    bootstrap: int = 2000,
    seed: int = 0,
    skip_bad: bool = False,
    accelerator: str = "auto",
    precision: str = "auto",
    console: Console | None = None,
    devices: list | None = None,  # torch devices (several GPUs: a model copy each); default the accelerator's
    tta: str | None = None,
) -> dict[str, Any]:
    console = console or Console()
    saved = load_model(run)
    changed = saved.with_tta(tta)
    if changed is not saved:  # the saved setting unless overridden
        console.print(override_warning(saved.info.tta, changed.info.tta), markup=False, highlight=False)
        saved = changed
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty; choose a new folder (the run is never written to)")
    if out.resolve() == Path(run).resolve() or out.resolve() == find_model_dir(run).resolve():
        raise ConfigError(f"--out {out}: must differ from the run folder; evaluation never writes into the run")
    info = saved.info
    multilabel = saved.task.multilabel
    external = discover_multilabel_external(saved, data, split=split, cache_dir=cache_dir) if multilabel else None
    records = external.records if external is not None else discover_external(saved, data, split=split, cache_dir=cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = ImageCache(cache_dir, CacheSettings(size=info.decode_size))
    images = cache.build([r.path for r in records], skip_bad=skip_bad, progress=True, workers=default_decode_workers())
    kept = [records[i] for i in images.positions]
    labels = [0] * len(kept) if multilabel else [saved.classes.index(r.label) for r in kept]  # multi-label: targets below
    accelerator = resolve_accelerator(accelerator)
    # With an OOD detector the one pass also gives each image's ood_score (the last column).
    network = saved.network if saved.ood is None else LogitsAndScore(ScoredModel(saved.network, saved.ood))
    logits = predict_logits(
        network,
        CachedImageDataset(images, labels, saved.transform()),
        num_workers=default_num_workers(accelerator),  # pixels come from the memory-mapped cache, in workers
        device=device_for(accelerator),
        precision=resolve_precision(precision, accelerator),
        devices=devices,
    )
    scores = None if saved.ood is None else logits[:, -1]
    logits = logits if saved.ood is None else logits[:, :-1]
    hardware = {**hardware_summary(accelerator=accelerator, precision=resolve_precision(precision, accelerator),
                                   devices=len(devices or [accelerator])),  # what ran the inference:
                "world_size": 1, "distributed": "threads" if len(devices or []) > 1 else "none"}  # one process
    if external is not None:
        metrics = _multilabel_metrics(saved, external, kept, logits, scores, run=run, data=data, split=split, out=out,
                                      bootstrap=bootstrap, seed=seed)
        return _finish(out, {**metrics, "hardware": hardware}, saved, scores, console, run=run, data=data)
    outputs = SplitOutputs([str(r.path) for r in kept], np.asarray(labels), [r.patient_id for r in kept], logits)
    point = OperatingPoint.from_info(info)
    result = split_metrics(outputs, point, saved.classes, bootstrap=bootstrap, seed=seed)
    write_predictions(outputs, point, saved.classes, out / "predictions.csv")
    write_plots(outputs, point, saved.classes, result, out / "plots", prefix="test", band_resamples=min(200, bootstrap), seed=seed)
    metrics = {
        "run": relative_location(run, out),  # shareable: no absolute path (privacy.py)
        "data": folder_name(data),
        "split": split,
        "backbone": info.backbone,
        "strategy": info.strategy,
        "positive_class": info.positive_class,
        "threshold": info.threshold,
        "threshold_policy": info.threshold_policy,
        "tta": info.tta,
        "test": result,
        "shift": shift_against_run(run, outputs, point),
        "hardware": hardware,
    }
    if scores is not None:
        metrics["ood"] = ood_summary(saved, outputs, scores, point, bootstrap=bootstrap, seed=seed)
    metrics["label_free_shift"] = label_free_shift(saved, run, outputs, scores, cache_dir=cache_dir, accelerator=accelerator,
                                                   seed=seed, console=console)
    return _finish(out, metrics, saved, scores, console, run=run, data=data)


def _finish(out: Path, metrics: dict[str, Any], saved: SavedModel, scores: np.ndarray | None, console: Console, *,
            run: Path, data: Path) -> dict[str, Any]:
    """The OOD and shift lines on the console, metrics.json, then report.html."""
    if scores is None:
        console.print("This model was saved without an OOD detector: no foreign-input check (train again to get one).")
    else:
        assert saved.ood is not None, "ood scores come only from a model with a detector"
        metrics["shift"]["ood_flagged_fraction"] = metrics["ood"]["flagged_fraction"]
        console.print(f"OOD guard ({saved.ood.method}): {metrics['ood']['flagged']} of {len(scores)} images "
                      f"({metrics['ood']['flagged_fraction']:.1%}) do not look like the training data")
    for line in (multilabel_shift_lines if saved.task.multilabel else shift_lines)(metrics["shift"]):
        console.print(line, markup=False, highlight=False)
    metrics = without_folders(metrics, (run, data, out))  # messages (a skipped test) may name the folders
    write_metrics(out, metrics)
    from medtransfer.evaluation.report import write_report

    write_report(out, console=console, title=f"Evaluation of {folder_name(run)} on {folder_name(data)}")
    return metrics


def _multilabel_metrics(
    saved: SavedModel, external: ExternalFindings, kept: list[Record], logits: np.ndarray, scores: np.ndarray | None, *,
    run: Path, data: Path, split: str, out: Path, bootstrap: int, seed: int,
) -> dict[str, Any]:
    """metrics.json of a multi-label model (without "hardware"); writes predictions.csv and the figures."""
    info, point = saved.info, point_of(saved)
    targets = external.targets(saved, kept)
    paths, patients = [str(r.path) for r in kept], [r.patient_id for r in kept]
    result = multilabel_split_metrics(logits, targets, patients, point, bootstrap=bootstrap, seed=seed)
    for finding in external.missing:
        result["findings"][finding]["not_in_data"] = True  # masked on every image: no labels in this set
    write_multilabel_predictions(paths, targets, patients, logits, point, out / "predictions.csv")
    write_multilabel_plots(logits, targets, point, result, out / "plots", prefix="test")
    metrics: dict[str, Any] = {
        "run": relative_location(run, out), "data": folder_name(data), "split": split, "backbone": info.backbone,
        "strategy": info.strategy,
        "threshold": None,  # one per finding: "operating_point"
        "classes": list(saved.classes), "threshold_policy": info.threshold_policy, "tta": info.tta, "task": info.task,
        "operating_point": point.to_dict(), "findings_match": external.to_dict(), "test": result,
        "shift": multilabel_shift(run, targets, point.probabilities(logits), saved, external.missing),
    }
    if scores is not None:
        metrics["ood"] = multilabel_ood_summary(saved, paths, targets, patients, logits, scores, point,
                                                bootstrap=bootstrap, seed=seed)
    return metrics


def ood_summary(saved: SavedModel, outputs: SplitOutputs, scores: np.ndarray, point: OperatingPoint, *, bootstrap: int,
                seed: int) -> dict[str, Any]:
    """The flagged fraction and the metrics on the images the OOD guard accepts (metrics.json "ood")."""
    assert saved.ood is not None, "ood scores come only from a model with a detector"
    flagged = saved.ood.flags(scores)
    summary: dict[str, Any] = {
        "method": saved.ood.method, "threshold": saved.ood.threshold, "flagged": int(flagged.sum()),
        "flagged_fraction": float(flagged.mean()), "score_median": float(np.median(scores)),
    }
    keep = np.flatnonzero(~flagged)
    labels = outputs.labels[keep]
    if len(keep) and len(np.unique(labels)) == len(saved.classes):
        accepted = SplitOutputs([outputs.paths[i] for i in keep], labels,
                                [outputs.patient_ids[i] for i in keep], outputs.logits[keep])
        summary["test_without_flagged"] = split_metrics(accepted, point, saved.classes, bootstrap=bootstrap, seed=seed)
    return summary


def discover_external(saved: SavedModel, data: Path, *, split: str, cache_dir: Path) -> list[Record]:
    """The labelled images of `data` (its `split` when it has splits), read with the run's rules:
    patient regex, label scheme, .npz class names and the class map of training.

    Class-map entries whose old class the external set does not have are skipped: such a set
    may already use the merged names.
    """
    training = saved.info.training_config or {}
    records = discover(
        data, patient_regex=training.get("patient_regex"), labels=training.get("labels", "folder"),
        class_names=training.get("class_names") if Path(data).suffix.lower() == ".npz" else None,
        extract_dir=Path(cache_dir) / "npz",
    )
    found = {r.label for r in records}
    class_map = {old: new for old, new in (training.get("class_map") or {}).items() if old in found}
    records = apply_class_map(records, class_map) if class_map else records
    if any(r.split for r in records):
        records = [r for r in records if r.split == split]
        if not records:
            raise DataError(f"--split {split}: --data {data} has no {split} images; choose another --split")
    unknown = sorted({r.label for r in records} - set(saved.classes))
    if unknown:
        raise DataError(
            f"--data {data}: classes {', '.join(unknown)} are unknown to the model (it knows {', '.join(saved.classes)})"
            + ("; rename them with the training run's --class-map" if not class_map else "")
        )
    return records


def run_predictions(run: Path) -> tuple[str, Predictions] | None:
    """The run's own test predictions (else validation) as the reference of the shift summary."""
    root = Path(run)
    if not (root / "metrics.json").is_file() and (root.parent / "metrics.json").is_file():
        root = root.parent  # --run named the model/ folder
    folder = RunDir(root)
    for name in ("test", "val"):
        predictions = folder.predictions(name)
        if predictions is not None:
            return f"{name} split of {folder_name(root)}", predictions
    return None


def shift_against_run(run: Path, outputs: SplitOutputs, point: OperatingPoint) -> dict[str, Any]:
    """The shift summary of `outputs` against the run's own predictions (evaluation.shift)."""
    probs = point.probabilities(outputs.logits)[:, point.positive_index]
    labels = (outputs.labels == point.positive_index).astype(int)
    reference = run_predictions(run)
    if reference is None:
        return shift_summary(labels, probs, reference_y=None, reference_prob=None, reference="")
    name, predictions = reference
    positive = predictions.classes[point.positive_index]
    ref_y = np.asarray([label == positive for label in predictions.labels], dtype=int)
    return shift_summary(labels, probs, reference_y=ref_y, reference_prob=predictions.probability(positive), reference=name)


def label_free_shift(saved: SavedModel, run: Path, outputs: SplitOutputs, scores: np.ndarray | None, *, cache_dir: Path,
                     accelerator: str, seed: int, console: Console) -> dict[str, Any]:
    """`adapt`'s shift tests and verdict (evaluation.site_shift) on these images, their labels not passed."""
    from medtransfer.evaluation.site_shift import detection_lines, site_shift_summary

    summary = site_shift_summary(saved, run, outputs.paths, cache_dir=cache_dir, accelerator=accelerator, seed=seed,
                                 logits=outputs.logits, ood_scores=scores, patient_ids=outputs.patient_ids)
    for line in [f"Label-free shift tests skipped: {summary['skipped']}"] if "skipped" in summary else detection_lines(summary):
        console.print(line, markup=False, highlight=False)
    return summary
