"""After the folds: out-of-fold evaluation, the operating point chosen on it, the K fold models as ONE model.

1. Out of fold (:func:`out_of_fold`): each fold's model predicts its own validation fold (images
   it never trained on) at temperature 1, as its run folder's saved model does (with its TTA).
   Every pool image gets exactly one out-of-fold prediction: OUT/predictions_oof.csv, with its fold.
2. The final operating point (temperature, then threshold, by the run's policies; per finding for
   multi-label) is chosen on these pooled, uncalibrated logits, never on test. The pooled figures
   are metrics.json ``val`` (patient-level bootstrap intervals; argmax accuracy and macro AUC with
   intervals for three or more classes); ``cross_validation`` holds the fold table (each fold's own
   validation figures) with the mean and standard deviation over folds. Figures at a threshold
   chosen on these same predictions are optimistic, as on any validation split; AUC is not.
3. The K models are saved in OUT/model as one model (logits averaged, models/inference.py;
   model.json ``members``) carrying that operating point (:func:`write_fold_ensemble`), so predict,
   evaluate, explain, serve and export take OUT like any run; it is scored on the test split when
   there is one. Its OOD guard is fold 1's, as a seed ensemble's is its first member's.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from medtransfer.artifacts import SavedModel, load_model, save_model
from medtransfer.config import TrainConfig, default_cache_dir
from medtransfer.data.cache import CacheSettings, ImageCache
from medtransfer.data.datamodule import CachedImageDataset
from medtransfer.data.discover import Record
from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation.evaluate import (
    SplitOutputs,
    fit_operating_point,
    split_metrics,
    write_plots,
    write_predictions,
)
from medtransfer.evaluation.multilabel import (
    MultiLabelPoint,
    fit_multilabel_point,
    multilabel_split_metrics,
    write_multilabel_predictions,
)
from medtransfer.evaluation.out_of_fold import (
    OOF_PREDICTIONS,
    add_fold_column,
    fold_row,
    fold_spread,
    multiclass_intervals,
)
from medtransfer.evaluation.model_card import write_model_card
from medtransfer.evaluation.plots_multilabel import write_multilabel_plots
from medtransfer.evaluation.report import write_report
from medtransfer.evaluation.report_findings import write_pair_thumbnails
from medtransfer.evaluation.report_folds import write_fold_plots
from medtransfer.evaluation.thresholds import OperatingPoint
from medtransfer.explain.gallery import write_gallery
from medtransfer.ood import save_detector
from medtransfer.privacy import deidentify_metrics, relative_location, run_identities, shareable_settings
from medtransfer.rundir import RunDir, SplitRow, write_metrics
from medtransfer.runtime import (
    default_decode_workers,
    device_for,
    hardware_summary,
    predict_logits,
    resolve_accelerator,
    resolve_precision,
)
from medtransfer.task import Task
from medtransfer.train.ensemble import COMPATIBLE_FIELDS

__all__ = ["OutOfFold", "out_of_fold", "predict_rows", "shown_run", "write_fold_ensemble"]

CHOSEN_ON = ("pooled out-of-fold logits (each pool image predicted at temperature 1 by the fold model that did not "
             "train on it); the test split influenced no choice")


@dataclass
class OutOfFold:
    """The pooled out-of-fold outputs, each row's fold, the operating point chosen on them and their figures."""

    members: list[SavedModel]  # fold 1..K's saved models
    runs: list[Path]
    outputs: SplitOutputs  # pooled, fold by fold
    folds: list[int]  # each pooled row's fold
    point: OperatingPoint | MultiLabelPoint
    metrics: dict[str, Any]  # the pooled block (metrics.json val)
    task: Task
    precision: str
    accelerator: str

    @property
    def classes(self) -> list[str]:
        return list(self.task.classes)


def _resolved(config: TrainConfig) -> tuple[str, str]:
    device = resolve_accelerator(config.accelerator)
    return device, resolve_precision(config.precision, device)


def predict_rows(saved: SavedModel, rows: list[SplitRow], *, cache_dir: Path, accelerator: str,
                 precision: str) -> SplitOutputs:
    """``saved``'s logits (temperature 1: as the network outputs them) on split.csv rows, decoded as training
    decoded them; labels as the task defines them (class indices, or 1 / 0 / NaN per finding)."""
    missing = next((r.path for r in rows if not Path(r.path).is_file()), None)
    if missing is not None:
        raise DataError(f"split.csv: {missing} no longer exists; cross-validation re-predicts from the images")
    cache = ImageCache(cache_dir, CacheSettings(size=saved.info.decode_size))
    images = cache.build([r.path for r in rows], skip_bad=True, progress=False, workers=default_decode_workers())
    kept = [rows[i] for i in images.positions]
    task = saved.task
    targets = task.targets([r.label for r in kept], [r.masked for r in kept])
    dataset = CachedImageDataset(images, targets if task.multilabel else targets.tolist(), saved.transform())
    logits = predict_logits(saved.network, dataset, device=device_for(accelerator), precision=precision)
    return SplitOutputs([r.path for r in kept], targets, [r.patient_id for r in kept], logits)


def check_fold_models(members: list[SavedModel], runs: list[Path]) -> None:
    """The fold models must agree on everything that makes their logits averageable."""
    first = members[0]
    for saved, run in zip(members[1:], runs[1:]):
        for name in COMPATIBLE_FIELDS:
            if getattr(saved.info, name) != getattr(first.info, name):
                raise ConfigError(f"{run}: model.json {name} {getattr(saved.info, name)!r} differs from {runs[0]}'s "
                                  f"{getattr(first.info, name)!r}; the folds must be trained with one configuration")


def out_of_fold(config: TrainConfig, runs: list[Path], pool: list[Record], *, bootstrap: int | None = None) -> OutOfFold:
    """Predict each fold's validation images with its model, pool them, choose the operating point, score."""
    members = [load_model(run) for run in runs]
    check_fold_models(members, runs)
    accelerator, precision = _resolved(config)
    cache_dir = Path(config.cache_dir or default_cache_dir())
    per_fold = []
    for run, saved in zip(runs, members):
        rows = [r for r in RunDir(run).split() or [] if r.split == "val"]
        per_fold.append(predict_rows(saved, rows, cache_dir=cache_dir, accelerator=accelerator, precision=precision))
    folds = [k for k, o in enumerate(per_fold, start=1) for _ in o.paths]
    outputs = SplitOutputs([p for o in per_fold for p in o.paths], np.concatenate([o.labels for o in per_fold]),
                           [p for o in per_fold for p in o.patient_ids], np.concatenate([o.logits for o in per_fold]))
    _check_one_prediction_each(outputs.paths, pool)
    task = members[0].task
    resamples = config.bootstrap if bootstrap is None else bootstrap
    point: OperatingPoint | MultiLabelPoint
    if task.multilabel:
        point = fit_multilabel_point(outputs.logits, outputs.labels, task, policy=config.threshold, calibrate=config.calibrate)
    else:
        point = fit_operating_point(outputs, positive_index=members[0].positive_index, policy=config.threshold,
                                    calibrate=config.calibrate)
    pooled = score(outputs, point, list(task.classes), bootstrap=resamples, seed=config.seed)
    return OutOfFold(members, runs, outputs, folds, point, pooled, task, precision, accelerator)


def score(outputs: SplitOutputs, point: OperatingPoint | MultiLabelPoint, classes: list[str], *, bootstrap: int,
          seed: int) -> dict[str, Any]:
    """A split's figures at ``point``: per finding (multi-label), or the single-label block with, for three or
    more classes, intervals of the argmax accuracy and macro AUC."""
    if isinstance(point, MultiLabelPoint):
        return multilabel_split_metrics(outputs.logits, outputs.labels, outputs.patient_ids, point, bootstrap=bootstrap,
                                        seed=seed)
    result = split_metrics(outputs, point, classes, bootstrap=bootstrap, seed=seed)
    if len(classes) > 2 and bootstrap > 0:  # argmax accuracy and macro AUC, with intervals from the same patients
        result["multiclass"].update(multiclass_intervals(outputs.labels, point.probabilities(outputs.logits),
                                                         outputs.patient_ids, n_resamples=bootstrap, seed=seed))
    return result


def _check_one_prediction_each(paths: list[str], pool: list[Record]) -> None:
    twice = [p for p, n in Counter(paths).items() if n > 1]
    if twice:
        raise DataError(f"out-of-fold: {twice[0]} was predicted by two folds; the folds must not overlap")
    wanted = {str(Path(r.path).resolve()) for r in pool}
    foreign = [p for p in paths if str(Path(p).resolve()) not in wanted]
    if foreign:
        raise DataError(f"out-of-fold: {foreign[0]} is not a pool image of split.csv; a fold's split was changed")


def _write_split(outputs: SplitOutputs, name: str, prefix: str, scores: dict[str, Any], oof: OutOfFold, out: Path,
                 config: TrainConfig) -> None:
    """predictions_<name>.csv and the split's plots <prefix>_*.png (ROC with its patient-bootstrap band, ...)."""
    point = oof.point
    if isinstance(point, MultiLabelPoint):
        write_multilabel_predictions(outputs.paths, outputs.labels, outputs.patient_ids, outputs.logits, point,
                                     out / f"predictions_{name}.csv")
        write_multilabel_plots(outputs.logits, outputs.labels, point, scores, out / "plots", prefix=prefix)
        return
    write_predictions(outputs, point, oof.classes, out / f"predictions_{name}.csv")
    write_plots(outputs, point, oof.classes, scores, out / "plots", prefix=prefix,
                band_resamples=min(200, config.bootstrap), seed=config.seed)


def _ensemble_info(oof: OutOfFold, config: TrainConfig, description: dict[str, Any]) -> Any:
    settings = config.to_dict() if config.keep_identifiers else shareable_settings(config.to_dict())  # privacy.py
    first = dataclasses.replace(oof.members[0].info, threshold_policy=config.threshold,
                                provenance={"cross_validation": description}, training_config=settings)
    point = oof.point
    if isinstance(point, MultiLabelPoint):
        return dataclasses.replace(first, thresholds=tuple(point.thresholds), temperatures=tuple(point.temperatures))
    return dataclasses.replace(first, threshold=point.threshold, temperature=point.temperature)


def write_fold_ensemble(
    config: TrainConfig, out: Path, oof: OutOfFold, records: list[Record], *, leakage: dict[str, Any],
    data_summary: dict[str, Any], refit: dict[str, Any] | None = None, console: Console,
) -> dict[str, Any]:
    """OUT/model (the K fold models, logits averaged, at the out-of-fold operating point), the pooled and test
    predictions, plots, metrics.json and report.html (written last: the run's finished marker)."""
    k = len(oof.runs)
    description = {"folds": k, "members": [{"run": shown_run(r, out, config), "fold": f} for f, r in enumerate(oof.runs, 1)],
                   "averaged": "logits", "tta": oof.members[0].info.tta, "ood": "fold 1", "operating_point": CHOSEN_ON}
    first = oof.members[0]
    info = _ensemble_info(oof, config, description)
    ensemble = SavedModel(first.model, info, first.ood, tuple(m.model for m in oof.members[1:]))
    model_dir = save_model(first.model, info, out, extra=ensemble.extra)
    if first.ood is not None:
        save_detector(first.ood, model_dir)
    test_rows = [SplitRow(str(r.path), r.label, r.patient_id, "test", r.masked) for r in records if r.split == "test"]
    splits = {"val": oof.metrics}
    # the pooled predictions, plotted as the report shows a validation split's (metrics.json val is the pooled block)
    _write_split(oof.outputs, "oof", "val", oof.metrics, oof, out, config)
    add_fold_column(out / OOF_PREDICTIONS, dict(zip(oof.outputs.paths, oof.folds)))
    if test_rows:
        test = predict_rows(ensemble, test_rows, cache_dir=Path(config.cache_dir or default_cache_dir()),
                            accelerator=oof.accelerator, precision=oof.precision)
        splits["test"] = score(test, oof.point, oof.classes, bootstrap=config.bootstrap, seed=config.seed)
        _write_split(test, "test", "test", splits["test"], oof, out, config)
    table = [fold_row(f, RunDir(run).metrics()) for f, run in enumerate(oof.runs, start=1)]
    write_fold_plots(out / "plots", [RunDir(run).history() for run in oof.runs], oof.outputs, oof.folds, oof.point,
                     oof.classes, multilabel=oof.task.multilabel)
    metrics = _metrics(config, oof, splits, table, description, leakage, data_summary, refit, out)
    pool = sum(1 for r in records if r.split != "test")  # bad images left out (--skip-bad-images) have no prediction
    metrics["cross_validation"]["pool_images_without_prediction"] = pool - len(oof.outputs.paths)
    write_pair_thumbnails(out, metrics.get("leakage"))  # from the data's images, into the run, before their paths go
    if not config.keep_identifiers:  # leakage examples and pairs: paths relative to the data folder, IDs hashed
        metrics = deidentify_metrics(metrics, run_identities(out, cache_dir=config.cache_dir))
    write_metrics(out, metrics)
    if "test" in splits and not oof.task.multilabel:
        write_gallery(out, load_model(out), method=config.cam_method, keep_names=config.keep_identifiers)
    write_model_card(out)
    write_report(out, console=console, title=f"{k}-fold cross-validation")
    _print_folds(table, oof, console)
    return {"oof": splits["val"], "test": splits.get("test"), "threshold": metrics["threshold"]}


def _metrics(config: TrainConfig, oof: OutOfFold, splits: dict[str, Any], table: list[dict[str, Any]],
             description: dict[str, Any], leakage: dict[str, Any], data_summary: dict[str, Any],
             refit: dict[str, Any] | None, out: Path) -> dict[str, Any]:
    first = RunDir(oof.runs[0]).metrics()
    point = oof.point
    single = isinstance(point, OperatingPoint)
    seconds = sum(RunDir(run).metrics().train_seconds or 0.0 for run in oof.runs) + ((refit or {}).get("train_seconds") or 0)
    pool = len(oof.outputs.paths)
    return {
        "backbone": first.backbone, "strategy": first.strategy, "weights": first.weights,
        "train_seconds": round(seconds, 1),
        "positive_class": first.positive_class if single else None,
        "threshold": point.threshold if isinstance(point, OperatingPoint) else None,
        "val": splits["val"], "test": splits.get("test"), "classes": oof.classes, "threshold_policy": config.threshold,
        "precision": oof.precision, "leakage": leakage, "data_summary": data_summary,
        "hardware": hardware_summary(accelerator=oof.accelerator, precision=oof.precision),
        "task": oof.task.kind, "operating_point": point.to_dict() if isinstance(point, MultiLabelPoint) else None,
        "cross_validation": {
            "folds": len(oof.runs), "seed": config.seed, "pooled_images": pool,
            "pooled_patients": len(set(oof.outputs.patient_ids)),
            "val_is": "the pooled out-of-fold predictions (every pool image once, by the fold model that did not "
                      "train on it)",
            "chosen_on_out_of_fold": ["temperature", "threshold"],
            "optimistic": "figures at the threshold chosen on these same out-of-fold predictions (accuracy, "
                          "sensitivity, specificity) are optimistic, as on any validation split; AUC is not",
            "fold_table": table, "per_fold": fold_spread(table),
            "runs": [shown_run(r, out, config) for r in oof.runs], "refit": refit,
        },
        "ensemble": description,
    }


def shown_run(run: Path, out: Path, config: TrainConfig) -> str:
    """A run inside the cross-validation folder as metrics.json and model.json name it: relative to OUT
    (``folds/fold-1``, ``refit``; privacy.py), absolute with keep_identifiers. A description: nothing loads from it."""
    return str(run.resolve()) if config.keep_identifiers else relative_location(run, out)


def _print_folds(table: list[dict[str, Any]], oof: OutOfFold, console: Console) -> None:
    key = "macro_auc" if oof.task.multilabel or len(oof.classes) > 2 else "auc"
    for row in table:
        console.print(f"fold {row['fold']}: {row['images']} val images, AUC {_fmt(row['auc'])}"
                      + (f", macro AUC {_fmt(row.get('macro_auc'))}" if key == "macro_auc" else "")
                      + f", accuracy {_fmt(row.get('accuracy_argmax', row['accuracy']))}, best epoch {row['best_epoch']}")
    spread = fold_spread(table)
    console.print(f"per fold: AUC {_fmt(spread['auc']['mean'])} ± {_fmt(spread['auc']['sd'])} (mean ± sd over "
                  f"{spread['auc']['n']} folds); pooled out of fold below ('oof')")


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"
