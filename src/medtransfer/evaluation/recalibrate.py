"""`medtransfer recalibrate`: refit a trained model's temperature and threshold on a local site.

A model moved to another hospital often keeps its ranking (AUC) while its probabilities and
its operating point drift: the threshold chosen on the training site's validation split no
longer gives the sensitivity and specificity it gave there. With a small labelled local set
this module refits what is cheap and safe to refit - the calibration temperature and the
decision threshold, by the run's own policy - and leaves the weights as they are.

The local set is split by patient (stratified, seeded): one part fits, the rest only
reports, so the before/after figures are measured on images the refit never saw. The new
model folder holds the same weights (linked or copied), a model.json with the new
temperature and threshold and both provenances (the original run; the local data and
its fit/report split), metrics.json, predictions of the report part, the split and a short
report.html.

A multi-label model (model.json ``task: multi-label``) gets the same with one temperature and
one threshold per finding (:mod:`medtransfer.evaluation.multilabel_recalibrate`): the local
findings matched by name as `evaluate` matches them, the split stratified over the findings,
per-finding and macro figures before/after, and a model.json with the new per-finding lists.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from medtransfer.artifacts import FORMAT_VERSION, MODEL_DIR, MODEL_JSON, WEIGHTS_FILE, ModelInfo, SavedModel, find_model_dir, load_model
from medtransfer.data.cache import CacheSettings, ImageCache
from medtransfer.data.datamodule import CachedImageDataset
from medtransfer.data.discover import Record
from medtransfer.data.split import grouped_stratified_split, write_split_csv
from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation import html as h
from medtransfer.evaluation import plots
from medtransfer.evaluation.evaluate import SplitOutputs, fit_operating_point, softmax, split_metrics, write_predictions
from medtransfer.evaluation.external import discover_external
from medtransfer.evaluation.multilabel import MultiLabelPoint, multilabel_split_metrics, write_multilabel_predictions
from medtransfer.evaluation.multilabel_external import discover_multilabel_external, point_of
from medtransfer.evaluation.multilabel_recalibrate import (
    multilabel_recalibration_metrics, multilabel_summary_lines, refit_multilabel, split_local_multilabel,
    write_multilabel_recalibration_report,
)
from medtransfer.evaluation.site_shift import trained_provenance
from medtransfer.evaluation.thresholds import OperatingPoint
from medtransfer.privacy import folder_name, relative_location, visible_settings, without_folders
from medtransfer.rundir import SplitMetrics, write_metrics, write_text_atomic
from medtransfer.runtime import default_decode_workers, device_for, predict_logits, resolve_accelerator, resolve_precision

__all__ = ["recalibrate_model"]

SPLIT_FILE = "recalibration_split.csv"
FIT, REPORT = "fit", "report"


def recalibrate_model(
    run: Path,
    data: Path,
    out: Path,
    *,
    fit_fraction: float = 0.5,
    seed: int = 0,
    split: str = "test",
    cache_dir: Path,
    bootstrap: int = 2000,
    skip_bad: bool = False,
    accelerator: str = "auto",
    progress: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Refit temperature and threshold on `fit_fraction` of the local patients; report before/after on the rest."""
    console = console or Console()
    if not 0 < fit_fraction < 1:
        raise ConfigError(f"--fit-fraction: got {fit_fraction}; use a number between 0 and 1 (the rest reports), e.g. 0.5")
    saved = load_model(run)
    _check_out(out, run)
    if saved.task.multilabel:
        return _recalibrate_multilabel(
            saved, run, data, out, fit_fraction=fit_fraction, seed=seed, split=split, cache_dir=cache_dir,
            bootstrap=bootstrap, skip_bad=skip_bad, accelerator=accelerator, progress=progress, console=console,
        )
    records = split_local(discover_external(saved, data, split=split, cache_dir=cache_dir), fit_fraction, seed)
    outputs = score_records(saved, records, cache_dir=cache_dir, skip_bad=skip_bad, accelerator=accelerator, progress=progress)
    before = OperatingPoint.from_info(saved.info)
    training = saved.info.training_config or {}
    after = fit_operating_point(
        outputs[FIT], positive_index=saved.positive_index, policy=before.policy or training.get("threshold", "youden"),
        calibrate=training.get("calibrate", "temperature"),
    )
    results = {
        name: split_metrics(outputs[REPORT], point, saved.classes, bootstrap=bootstrap, seed=seed)
        for name, point in (("before", before), ("after", after))
    }
    out.mkdir(parents=True, exist_ok=True)
    scored = set(outputs[FIT].paths) | set(outputs[REPORT].paths)
    write_split_csv([r for r in records if str(r.path) in scored], out / SPLIT_FILE)
    provenance = {
        **_where(run, data, out), "split": split, "fit_fraction": fit_fraction, "seed": seed,
        "split_file": SPLIT_FILE, **{f"{name}_images": len(o.paths) for name, o in outputs.items()},
        **{f"{name}_patients": len(set(o.patient_ids)) for name, o in outputs.items()},
        "original": {"threshold": before.threshold, "temperature": before.temperature, "policy": before.policy},
    }
    write_model_folder(saved, after, provenance, out, run=run)
    write_predictions(outputs[REPORT], after, saved.classes, out / "predictions_test.csv")
    metrics = without_folders(_metrics(saved, after, provenance, results), (run, data, out))
    write_metrics(out, metrics)
    _plot_reliability(outputs[REPORT], before, after, out / "plots" / "report_calibration.png")
    write_recalibration_report(out, metrics)
    for line in summary_lines(metrics):
        console.print(line, markup=False, highlight=False)
    return metrics


def _where(run: Path, data: Path, out: Path) -> dict[str, str]:
    """The original run relative to `out` and the local data by its name (shareable outputs name no absolute path:
    privacy.py); the split file beside them lists the images themselves."""
    return {"run": relative_location(run, out), "data": folder_name(data)}


def _check_out(out: Path, run: Path) -> None:
    if out.resolve() in (Path(run).resolve(), find_model_dir(run).resolve()):
        raise ConfigError(f"--out {out}: must differ from the run folder; recalibration writes a new model folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty folder; choose a new folder (the run is never written to)")


def split_local(records: list[Record], fit_fraction: float, seed: int) -> list[Record]:
    """Records with split "fit" or "report": whole patients, stratified by class, seeded."""
    pooled = [replace(r, split=None) for r in records]
    drawn = grouped_stratified_split(pooled, fraction=1 - fit_fraction, seed=seed, name=REPORT, rest=FIT)
    for name in (FIT, REPORT):
        labels = {r.label for r in drawn if r.split == name}
        if len(labels) < 2:
            raise DataError(
                f"--data: the {name} part holds only class {sorted(labels)}; recalibration needs both classes in each "
                f"part: add patients or change --fit-fraction ({fit_fraction})"
            )
    return drawn


def _logits(
    saved: SavedModel, records: list[Record], *, cache_dir: Path, skip_bad: bool, accelerator: str, progress: bool
) -> tuple[list[Record], np.ndarray]:
    """The records that decoded and their logits, decoded as training did."""
    cache = ImageCache(cache_dir, CacheSettings(size=saved.info.decode_size))
    images = cache.build([r.path for r in records], skip_bad=skip_bad, progress=progress, workers=default_decode_workers())
    kept = [records[i] for i in images.positions]
    device = resolve_accelerator(accelerator)
    logits = predict_logits(
        saved.network, CachedImageDataset(images, [0] * len(kept), saved.transform()),  # labels are not read
        device=device_for(device), precision=resolve_precision("auto", device),
    )
    return kept, logits


def score_records(
    saved: SavedModel, records: list[Record], *, cache_dir: Path, skip_bad: bool, accelerator: str, progress: bool = True
) -> dict[str, SplitOutputs]:
    """Logits of every record, decoded as training did, grouped by the records' split.
    Labels are class indices, or (multi-label) 1 / 0 / NaN targets in the model's finding order."""
    kept, logits = _logits(saved, records, cache_dir=cache_dir, skip_bad=skip_bad, accelerator=accelerator, progress=progress)
    if saved.task.multilabel:
        labels = saved.task.targets([r.label for r in kept], [r.masked for r in kept])
    else:
        labels = np.asarray([saved.classes.index(r.label) for r in kept])
    out = {}
    for name in (FIT, REPORT):
        rows = [i for i, r in enumerate(kept) if r.split == name]
        out[name] = SplitOutputs(
            [str(kept[i].path) for i in rows], labels[rows], [kept[i].patient_id for i in rows], logits[rows]
        )
    return out


def _recalibrate_multilabel(
    saved: SavedModel, run: Path, data: Path, out: Path, *, fit_fraction: float, seed: int, split: str, cache_dir: Path,
    bootstrap: int, skip_bad: bool, accelerator: str, progress: bool, console: Console,
) -> dict[str, Any]:
    """recalibrate_model for a multi-label model: per-finding temperatures and thresholds."""
    local = discover_multilabel_external(saved, data, split=split, cache_dir=cache_dir)
    records = split_local_multilabel(local.records, saved.task.classes, fit_fraction, seed)
    outputs = score_records(saved, records, cache_dir=cache_dir, skip_bad=skip_bad, accelerator=accelerator, progress=progress)
    before = point_of(saved)
    training = saved.info.training_config or {}
    fit = outputs[FIT]
    after, kept = refit_multilabel(before, fit.logits, fit.labels, policy=saved.info.threshold_policy or training.get("threshold", "youden"),
                                   calibrate=training.get("calibrate", "temperature"))
    report = outputs[REPORT]
    results = {name: multilabel_split_metrics(report.logits, report.labels, report.patient_ids, point, bootstrap=bootstrap, seed=seed)
               for name, point in (("before", before), ("after", after))}
    out.mkdir(parents=True, exist_ok=True)
    scored = set(fit.paths) | set(report.paths)
    write_split_csv([r for r in records if str(r.path) in scored], out / SPLIT_FILE)
    original = before.to_dict()
    provenance = {
        **_where(run, data, out), "split": split, "fit_fraction": fit_fraction, "seed": seed,
        "split_file": SPLIT_FILE, **{f"{name}_images": len(o.paths) for name, o in outputs.items()},
        **{f"{name}_patients": len(set(o.patient_ids)) for name, o in outputs.items()},
        "original": {"thresholds": original["thresholds"], "temperatures": original["temperatures"], "policy": before.policy},
        "findings_match": without_folders(local.to_dict(), (run, data, out)),
    }
    write_model_folder(saved, after, provenance, out, run=run)
    write_multilabel_predictions(report.paths, report.labels, report.patient_ids, report.logits, after, out / "predictions_test.csv")
    metrics = without_folders(multilabel_recalibration_metrics(saved.info, after, provenance, results, kept), (run, data, out))
    write_metrics(out, metrics)
    known = ~np.isnan(report.labels)
    figure = out / "plots" / "report_calibration.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    y = report.labels[known].astype(int)
    plots.plot_reliability({"uncalibrated": (y, saved.task.probabilities(report.logits)[known]),
                            "run's temperatures": (y, before.probabilities(report.logits)[known]),
                            "recalibrated": (y, after.probabilities(report.logits)[known])}, figure)
    write_multilabel_recalibration_report(out, metrics, figure)
    for line in multilabel_summary_lines(metrics):
        console.print(line, markup=False, highlight=False)
    return metrics


def write_model_folder(
    saved: SavedModel, point: OperatingPoint | MultiLabelPoint, provenance: dict[str, Any], out: Path, *, run: Path
) -> Path:
    """out/model: the original weights of `run` (hard link, else copy) and model.json with the new operating point
    (per-finding temperatures and thresholds for a multi-label model) and ``provenance``: the trained run and this
    recalibration, the runs named relative to `out` (site_shift.trained_provenance)."""
    source = find_model_dir(run)
    target = out / MODEL_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name in saved.info.members or (WEIGHTS_FILE,):  # every member of a seed ensemble
        try:
            os.link(source / name, target / name)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(source / name, target / name)
    trained = trained_provenance(saved.info.provenance, run, out)
    if isinstance(point, MultiLabelPoint):
        operating: dict[str, Any] = dict(thresholds=tuple(point.thresholds), temperatures=tuple(point.temperatures))
    else:
        operating = dict(threshold=point.threshold, temperature=point.temperature)
    info = replace(saved.info, **operating, provenance={"trained": trained, "recalibrated": provenance},
                   training_config=visible_settings(saved.info.training_config))  # an older run's: no local folders
    payload = {"format_version": FORMAT_VERSION, **info.to_json()}
    ModelInfo.from_json(payload, source=target / MODEL_JSON)  # what load_model will accept
    write_text_atomic(target / MODEL_JSON, json.dumps(payload, indent=2))  # last: a half-written folder has no model.json
    return target


def _metrics(saved: SavedModel, point: OperatingPoint, provenance: dict[str, Any], results: dict[str, dict]) -> dict[str, Any]:
    """metrics.json: the run-folder keys (test = the report part after recalibration) plus before/after."""
    return {
        "backbone": saved.info.backbone, "strategy": saved.info.strategy,
        "positive_class": saved.info.positive_class, "threshold": point.threshold,
        "test": results["after"], "classes": saved.classes, "threshold_policy": point.policy,
        "run": provenance["run"], "data": provenance["data"], "split": f"{provenance['split']} ({REPORT} part)",
        "recalibration": {**provenance, "temperature": point.temperature, "threshold": point.threshold,
                          "before": results["before"], "after": results["after"]},
    }


def _plot_reliability(report: SplitOutputs, before: OperatingPoint, after: OperatingPoint, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    positive = (report.labels == after.positive_index).astype(int)
    curves = {
        "uncalibrated": (positive, softmax(report.logits)[:, after.positive_index]),
        "run's temperature": (positive, before.probabilities(report.logits)[:, after.positive_index]),
        "recalibrated": (positive, after.probabilities(report.logits)[:, after.positive_index]),
    }
    plots.plot_reliability(curves, path)


_SUMMARY_KEYS = ("accuracy", "sensitivity", "specificity", "auc")


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """Console lines: the refit and the before/after figures on the report part."""
    r = metrics["recalibration"]
    lines = [
        f"Fitted on {r['fit_images']} images ({r['fit_patients']} patients); reported on {r['report_images']} images "
        f"({r['report_patients']} patients) the fit never saw.",
        f"Temperature {r['original']['temperature']:.3f} -> {r['temperature']:.3f}, threshold "
        f"{r['original']['threshold']:.3f} -> {r['threshold']:.3f} ({r['original']['policy']}).",
    ]
    for name in ("before", "after"):
        block = r[name]
        figures = []
        for key in _SUMMARY_KEYS:
            ci = block.get(f"{key}_ci")
            figures.append(f"{key} {block[key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        lines.append(f"{name:6s}: " + ", ".join(figures))
    return lines


def write_recalibration_report(out: Path, metrics: dict[str, Any]) -> Path:
    """A short report.html: what was refitted on what, and the before/after figures with CIs."""
    r = metrics["recalibration"]
    before, after = (SplitMetrics.from_dict(r[k], where=f"recalibration.{k}") for k in ("before", "after"))
    rows = [(label, h.split_value(before, key), h.split_value(after, key)) for key, label in h.METRIC_ROWS]
    rows += [("Threshold", h.format_number(r["original"]["threshold"]), h.format_number(r["threshold"])),
             ("Temperature", h.format_number(r["original"]["temperature"]), h.format_number(r["temperature"]))]
    facts = [
        ("Original run", r["run"]), ("Local data", f"{r['data']} ({r['split']} split)"),
        ("Fit part", f"{r['fit_images']} images, {r['fit_patients']} patients"),
        ("Report part", f"{r['report_images']} images, {r['report_patients']} patients"),
        ("Split", f"by patient, stratified; fit fraction {r['fit_fraction']}, seed {r['seed']} ({r['split_file']})"),
        ("Threshold policy", r["original"]["policy"] or h.DASH),
    ]
    body = h.section("summary", "Before and after, on the report part", h.table(["Metric", "Run as trained", "Recalibrated"], rows)
                     + h.note("95% CIs from a patient-level bootstrap. The report part never influenced the refit."))
    body += h.section("provenance", "Provenance", h.table(None, facts))
    figure = h.figures([(out / "plots" / "report_calibration.png", "Reliability on the report part")])
    body += h.section("calibration", "Calibration", figure or h.note("No reliability plot."))
    document = h.page(f"Recalibration of {r['run']}", body, subtitle=f"Model folder: {folder_name(out)}/{MODEL_DIR}")
    return write_text_atomic(out / "report.html", document)
