"""The last step of a run: write everything it produced into the run folder.

Predictions and plots per split, the saved model, metrics.json, the training curves, the
CAM gallery and the report, in that order (the gallery reads the saved model, the report
reads all the rest). Unless ``keep_identifiers``, what users share holds no absolute path and no patient
ID in clear (privacy.py): model.json's training_config, metrics.json (leakage examples, near-duplicate
pairs, border captions), the gallery's file names; near-duplicate thumbnails are copied into the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from medtransfer.artifacts import ModelInfo, load_model, model_info, save_model
from medtransfer.config import TrainConfig
from medtransfer.evaluation import plots
from medtransfer.evaluation.evaluate import OperatingPoint, SplitOutputs, write_plots, write_predictions
from medtransfer.evaluation.model_card import write_model_card
from medtransfer.evaluation.multilabel import MultiLabelPoint, write_multilabel_predictions
from medtransfer.evaluation.plots_multilabel import write_multilabel_plots
from medtransfer.evaluation.report import write_report
from medtransfer.evaluation.report_findings import write_pair_thumbnails
from medtransfer.explain.border import record_border_evidence
from medtransfer.explain.gallery import write_gallery
from medtransfer.models.strategies import TransferModel
from medtransfer.ood import OODDetector, save_detector
from medtransfer.privacy import Identities, deidentify_metrics, run_identities, shareable_settings
from medtransfer.rundir import write_metrics
from medtransfer.task import Task

__all__ = ["Evaluation", "write_outputs"]


@dataclass(frozen=True)
class Evaluation:
    """The trained model scored on val (where its operating point was chosen) and test."""

    classes: list[str]
    positive_class: str | None  # None for multi-label
    outputs: dict[str, SplitOutputs]  # "val" and, when the data has one, "test"
    point: OperatingPoint | MultiLabelPoint
    metrics: dict[str, dict[str, Any]]  # per split, as in metrics.json
    task: Task | None = None  # None: single-label over `classes`

    @property
    def multilabel(self) -> bool:
        return self.task is not None and self.task.multilabel


def write_outputs(
    out: Path,
    *,
    model: TransferModel,
    config: TrainConfig,
    evaluation: Evaluation,
    metrics: dict[str, Any],
    history: list[dict],
    console: Console,
    ood: OODDetector | None = None,
) -> None:
    """Write the run folder's results; `metrics` is metrics.json's content; `ood` goes beside the model."""
    point = evaluation.point
    for name, split_outputs in evaluation.outputs.items():
        if isinstance(point, MultiLabelPoint):  # evaluation.multilabel
            o = split_outputs
            write_multilabel_predictions(o.paths, o.labels, o.patient_ids, o.logits, point, out / f"predictions_{name}.csv")
            write_multilabel_plots(o.logits, o.labels, point, evaluation.metrics[name], out / "plots", prefix=name)
            continue
        write_predictions(split_outputs, point, evaluation.classes, out / f"predictions_{name}.csv")
        write_plots(
            split_outputs, point, evaluation.classes, evaluation.metrics[name], out / "plots", prefix=name,
            band_resamples=min(200, config.bootstrap), seed=config.seed,
        )
    model_dir = save_model(model, saved_model_info(model, config, evaluation, wise_ft=metrics.get("wise_ft")), out)
    if ood is not None:
        save_detector(ood, model_dir)
    write_pair_thumbnails(out, metrics.get("leakage"))  # from the data's images, into the run, before their paths go
    ids = None if config.keep_identifiers else run_identities(out, cache_dir=config.cache_dir)
    _shareable(metrics, ids)
    write_metrics(out, metrics)
    if history:
        plots.plot_history(history, out / "plots" / "history.png")
    saved = load_model(out)
    if evaluation.multilabel:  # no gallery (heatmaps per finding: `medtransfer explain --finding`); the border check
        record_border_evidence(out, saved, metrics, method=config.cam_method)  # measures each image's top finding
        _shareable(metrics, ids, out)
        write_model_card(out)  # beside report.html, which stays last (the finished marker)
        write_report(out, console=console)
        return
    # heatmaps of the most confident hits and misses, for the report, and the shortcut check (at most border.LIMIT test images)
    write_gallery(out, saved, data_root=config.data, method=config.cam_method, keep_names=config.keep_identifiers)
    record_border_evidence(out, saved, metrics, method=config.cam_method)
    _shareable(metrics, ids, out)  # the border check's captions name its images
    write_model_card(out)
    write_report(out, console=console)


def _shareable(metrics: dict[str, Any], ids: Identities | None, out: Path | None = None) -> None:
    """`metrics` de-identified in place, its blocks too (the run's result, which holds them, is the file's
    content), and rewritten into `out` if given."""
    if ids is None:
        return
    for key, value in deidentify_metrics(metrics, ids).items():
        if isinstance(metrics.get(key), dict) and isinstance(value, dict):
            metrics[key].clear()
            metrics[key].update(value)
        else:
            metrics[key] = value
    if out is not None:
        write_metrics(out, metrics)


def saved_model_info(
    model: TransferModel, config: TrainConfig, evaluation: Evaluation, *, wise_ft: dict[str, Any] | None = None
) -> ModelInfo:
    """model.json: what predict, explain, export and serve need to use the model as evaluation did."""
    point = evaluation.point
    operating: dict[str, Any]  # model.json's operating point, of the task's kind
    if isinstance(point, MultiLabelPoint):
        operating = dict(task=point.task.kind, thresholds=point.thresholds, temperatures=point.temperatures,
                         positive_class=None, threshold=None)
    else:
        operating = dict(positive_class=evaluation.positive_class, threshold=point.threshold, temperature=point.temperature)
    return model_info(
        model,
        classes=evaluation.classes,
        **operating,
        image_size=config.image_size,
        decode_size=config.cache_size,
        eval_crop_fraction=config.eval_crop_fraction,
        in_channels=config.in_channels,
        output_stride=config.output_stride,
        threshold_policy=config.threshold,
        strategy=config.strategy,
        head=config.head,
        frozen=model.frozen,
        training_config=config.to_dict() if config.keep_identifiers else shareable_settings(config.to_dict()),
        wise_ft=wise_ft,
        tta=config.tta,
        border_crop=config.border_crop,
    )
