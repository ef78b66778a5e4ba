"""`medtransfer ensemble`: runs that differ only in their seed, saved as ONE model folder.

The members must agree on everything that makes their outputs comparable - classes,
positive class, backbone, head, image size, decode size, crop, normalisation, TTA - and were
trained and evaluated on the SAME split (split.csv compared row by row), with the same
threshold policy and calibration. The ensemble's network averages the members' (TTA'd)
logits (models/inference.py); its temperature and threshold are chosen again on the shared
validation split by the members' policy, on that averaged output, and it is scored on the
shared test split with the project's metrics and patient-level bootstrap CIs. The folder
follows the run-folder contract (config.yaml, split.csv, metrics.json, predictions_*.csv,
plots, report.html, model/), so `evaluate`, `compare`, `predict`, `explain`, `serve` and
`export` take it like any run. Its OOD guard is the first member's (on the first member's
evaluation-crop features, as that detector was fitted); explain shows the first member's
Grad-CAM on the evaluation crop, for the class the ensemble predicts.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from medtransfer.artifacts import SavedModel, load_model, save_model
from medtransfer.config import default_cache_dir
from medtransfer.data.cache import CacheSettings, ImageCache
from medtransfer.data.datamodule import CachedImageDataset
from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation.evaluate import SplitOutputs, fit_operating_point, split_metrics, write_plots, write_predictions
from medtransfer.evaluation.model_card import write_model_card
from medtransfer.evaluation.multilabel import (
    MultiLabelPoint,
    fit_multilabel_point,
    multilabel_split_metrics,
    write_multilabel_predictions,
)
from medtransfer.evaluation.plots_multilabel import write_multilabel_plots
from medtransfer.evaluation.report import write_report
from medtransfer.evaluation.thresholds import OperatingPoint
from medtransfer.explain.gallery import write_gallery
from medtransfer.ood import save_detector
from medtransfer.privacy import relative_location, visible_settings
from medtransfer.rundir import CONFIG_FILE, RunDir, SplitRow, write_metrics
from medtransfer.runtime import (
    default_decode_workers, device_for, hardware_summary, predict_logits, resolve_accelerator, resolve_precision,
)

__all__ = ["COMPATIBLE_FIELDS", "Member", "build_ensemble", "check_members"]

COMPATIBLE_FIELDS = ("task", "classes", "positive_class", "backbone", "head", "in_channels", "output_stride", "image_size",
                     "decode_size", "eval_crop_fraction", "mean", "std", "tta")
POLICY_SETTINGS = ("threshold", "calibrate")  # config.yaml settings that choose the operating point
_SAME = "an ensemble combines runs that differ only in their seed"


@dataclass
class Member:
    run: Path
    saved: SavedModel
    split: list[SplitRow]
    config: dict[str, Any]


def read_member(run: Path) -> Member:
    folder = RunDir(run)
    split, config = folder.split(), folder.config()
    if split is None or config is None:
        missing = "split.csv" if split is None else CONFIG_FILE
        raise DataError(f"RUNS {run}: no {missing}; pass run folders written by `medtransfer train`")
    return Member(Path(run), load_model(run), split, config)


def check_members(members: list[Member]) -> None:
    """ConfigError naming the first run that differs from the first member, and how."""
    if len(members) < 2:
        raise ConfigError(f"RUNS: got {len(members)} run; an ensemble needs two or more")
    first = members[0]
    nested = next((m for m in members if m.saved.info.members), None)
    if nested is not None:
        raise ConfigError(f"RUNS {nested.run}: is an ensemble already; pass the runs it was built from")
    for member in members[1:]:
        if member.run.resolve() == first.run.resolve():
            raise ConfigError(f"RUNS {member.run}: given twice; pass each run once")
        for name in COMPATIBLE_FIELDS:
            ours, theirs = getattr(member.saved.info, name), getattr(first.saved.info, name)
            if ours != theirs:
                raise ConfigError(f"RUNS {member.run}: model.json {name} {_shown(ours)} differs from {first.run}'s "
                                  f"{_shown(theirs)}; {_SAME}")
        for name in POLICY_SETTINGS:
            ours, theirs = member.config.get(name), first.config.get(name)
            if ours != theirs:
                raise ConfigError(f"RUNS {member.run}: config.yaml {name} {ours!r} differs from {first.run}'s "
                                  f"{theirs!r}; {_SAME}")
        if _split_key(member.split) != _split_key(first.split):
            moved = len(set(_split_key(member.split)) ^ set(_split_key(first.split))) // 2 or "some"
            raise ConfigError(
                f"RUNS {member.run}: split.csv differs from {first.run}'s ({moved} image(s) in another split or "
                "missing); train every member on one fixed split: `medtransfer split --out split.csv`, then "
                "`train --data split.csv --keep-official-val --seed N`"
            )


def _split_key(rows: list[SplitRow]) -> list[tuple[str, str, str, str | None]]:
    return sorted((str(Path(r.path).resolve()), r.label, r.patient_id, r.split) for r in rows)


def _shown_run(run: Path, out: Path, keep: bool) -> str:
    """A member run as model.json and metrics.json name it: relative to the ensemble's folder (``members/seed-3``;
    privacy.py), absolute with keep_identifiers. A description: the weights are in OUT/model."""
    return str(run.resolve()) if keep else relative_location(run, out)


def _shown(value: Any) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


def build_ensemble(
    runs: list[Path], out: Path, *, cache_dir: Path | None = None, accelerator: str = "auto",
    bootstrap: int | None = None, console: Console | None = None, held_run_folder: bool = False,
) -> dict[str, Any]:
    """Check the members, write OUT/model with every member's weights, choose the operating point on
    the shared val split, score val and test, and write the run folder; returns metrics.json's content.
    ``held_run_folder``: OUT is a `train --ensemble` run folder its caller holds, with its own
    config.yaml and the members inside; that config.yaml is kept."""
    console = console or Console()
    if not held_run_folder and out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty; choose a new folder")
    members = [read_member(run) for run in runs]
    check_members(members)
    first = members[0]
    saved = SavedModel(first.saved.model, first.saved.info, first.saved.ood, tuple(m.saved.model for m in members[1:]))
    config = first.config
    device = resolve_accelerator(accelerator)
    precision = resolve_precision(str(config.get("precision", "auto")), device)  # the members' setting, on this machine
    outputs = score_split(saved, first.split, cache_dir=Path(cache_dir or config.get("cache_dir") or default_cache_dir()),
                          accelerator=device, precision=precision)
    if "val" not in outputs:
        raise DataError(f"RUNS {first.run}: split.csv has no val images to choose the threshold on")
    resamples = config.get("bootstrap", 2000) if bootstrap is None else bootstrap
    seed = int(config.get("seed", 0))
    task = saved.task
    point: OperatingPoint | MultiLabelPoint
    operating: dict[str, Any]  # the operating point's fields of model.json
    if task.multilabel:  # a temperature and a threshold per finding, on the averaged logits
        val = outputs["val"]
        point = fit_multilabel_point(val.logits, val.labels, task, policy=config["threshold"], calibrate=config["calibrate"])
        scores = {name: multilabel_split_metrics(o.logits, o.labels, o.patient_ids, point, bootstrap=resamples, seed=seed)
                  for name, o in outputs.items()}
        operating = dict(thresholds=tuple(point.thresholds), temperatures=tuple(point.temperatures))
    else:
        point = fit_operating_point(outputs["val"], positive_index=saved.positive_index, policy=config["threshold"],
                                    calibrate=config["calibrate"])
        scores = {name: split_metrics(o, point, saved.classes, bootstrap=resamples, seed=seed) for name, o in outputs.items()}
        operating = dict(threshold=point.threshold, temperature=point.temperature)
    keep = bool(config.get("keep_identifiers"))  # the members' setting (train --ensemble: the ensemble's own)
    description = {"members": [{"run": _shown_run(m.run, out, keep), "seed": m.config.get("seed")} for m in members],
                   "averaged": "logits", "tta": saved.info.tta, "ood": "first member"}
    info = dataclasses.replace(first.saved.info, **operating, threshold_policy=config["threshold"],
                               provenance={"ensemble": description},
                               training_config=visible_settings(first.saved.info.training_config, keep))
    out.mkdir(parents=True, exist_ok=True)
    model_dir = save_model(first.saved.model, info, out, extra=saved.extra)
    if first.saved.ood is not None:
        save_detector(first.saved.ood, model_dir)
    for name in ("split.csv",) if held_run_folder else ("split.csv", CONFIG_FILE):
        shutil.copy2(first.run / name, out / name)
    for name, o in outputs.items():
        if isinstance(point, MultiLabelPoint):
            write_multilabel_predictions(o.paths, o.labels, o.patient_ids, o.logits, point, out / f"predictions_{name}.csv")
            write_multilabel_plots(o.logits, o.labels, point, scores[name], out / "plots", prefix=name)
            continue
        write_predictions(o, point, saved.classes, out / f"predictions_{name}.csv")
        write_plots(o, point, saved.classes, scores[name], out / "plots", prefix=name,
                    band_resamples=min(200, resamples), seed=seed)
    metrics = {**_metrics(members, info, scores, description), "precision": precision,
               "hardware": hardware_summary(accelerator=device, precision=precision)}  # what ran val and test
    if isinstance(point, MultiLabelPoint):
        metrics.update(task=task.kind, operating_point=point.to_dict())
    write_metrics(out, metrics)
    if not task.multilabel:  # heatmaps per finding: `medtransfer explain --finding`
        write_gallery(out, load_model(out), keep_names=keep)
    write_model_card(out)
    write_report(out, console=console, title=f"Seed ensemble of {len(members)} runs")
    return metrics


def score_split(
    saved: SavedModel, rows: list[SplitRow], *, cache_dir: Path, accelerator: str, precision: str = "auto"
) -> dict[str, SplitOutputs]:
    """The ensemble's averaged logits on the val and test rows of split.csv, decoded as training decoded them,
    at the members' precision."""
    rows = [r for r in rows if r.split in ("val", "test")]
    missing = next((r.path for r in rows if not Path(r.path).is_file()), None)
    if missing is not None:
        raise DataError(f"split.csv: {missing} no longer exists; the ensemble re-predicts val and test from the images")
    cache = ImageCache(cache_dir, CacheSettings(size=saved.info.decode_size))
    images = cache.build([r.path for r in rows], skip_bad=True, progress=False, workers=default_decode_workers())
    kept = [rows[i] for i in images.positions]
    targets = saved.task.targets([r.label for r in kept], [r.masked for r in kept])
    labels = targets if saved.task.multilabel else targets.tolist()
    device = resolve_accelerator(accelerator)
    logits = predict_logits(saved.network, CachedImageDataset(images, labels, saved.transform()),
                            device=device_for(device), precision=resolve_precision(precision, device))
    out = {}
    for name in ("val", "test"):
        index = [i for i, r in enumerate(kept) if r.split == name]
        if index:
            out[name] = SplitOutputs([kept[i].path for i in index], np.asarray(labels)[index],
                                     [kept[i].patient_id for i in index], logits[index])
    return out


def _metrics(members: list[Member], info: Any, scores: dict[str, dict], description: dict) -> dict[str, Any]:
    first = RunDir(members[0].run).metrics()
    return {
        "backbone": info.backbone, "strategy": info.strategy, "weights": first.weights,
        "positive_class": info.positive_class, "threshold": info.threshold, "val": scores.get("val"),
        "test": scores.get("test"), "classes": list(info.classes), "threshold_policy": info.threshold_policy,
        "ensemble": {**description, "member_test_auc": [_test_auc(m.run) for m in members]},
        # the compute the ensemble cost: its members' training, one after another
        "train_seconds": sum(RunDir(m.run).metrics().train_seconds or 0.0 for m in members),
    }


def _test_auc(run: Path) -> float | None:
    test = RunDir(run).metrics().test
    return None if test is None else test.value("auc")
