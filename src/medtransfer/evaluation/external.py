"""`medtransfer evaluate`: a saved model on any labelled folder or CSV, written to a new folder.

The run is only read: threshold and temperature come from model.json (chosen on the run's
validation split), so an external test set is scored exactly as the run's own test split.
With an OOD detector (model/ood.*) metrics.json also gets "ood": the share of images flagged
as foreign and the metrics without them ("test" keeps every image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from medtransfer.artifacts import SavedModel, find_model_dir, load_model
from medtransfer.data.cache import CacheSettings, ImageCache
from medtransfer.data.datamodule import CachedImageDataset
from medtransfer.data.discover import discover
from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation.evaluate import SplitOutputs, split_metrics, write_plots, write_predictions
from medtransfer.evaluation.thresholds import OperatingPoint
from medtransfer.ood import LogitsAndScore, ScoredModel
from medtransfer.runtime import default_decode_workers, device_for, predict_logits, resolve_accelerator, resolve_precision
from medtransfer.rundir import write_metrics


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
) -> dict[str, Any]:
    console = console or Console()
    saved = load_model(run)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty; choose a new folder (the run is never written to)")
    if out.resolve() == Path(run).resolve() or out.resolve() == find_model_dir(run).resolve():
        raise ConfigError(f"--out {out}: must differ from the run folder; evaluation never writes into the run")
    info = saved.info
    training = info.training_config or {}
    records = discover(data, patient_regex=training.get("patient_regex"), labels=training.get("labels", "folder"))
    if any(r.split for r in records):
        records = [r for r in records if r.split == split]
        if not records:
            raise DataError(f"--split {split}: --data {data} has no {split} images; choose another --split")
    unknown = sorted({r.label for r in records} - set(saved.classes))
    if unknown:
        raise DataError(
            f"--data {data}: classes {', '.join(unknown)} are unknown to the model (it knows {', '.join(saved.classes)})"
        )
    out.mkdir(parents=True, exist_ok=True)
    cache = ImageCache(cache_dir, CacheSettings(size=info.decode_size))
    images = cache.build([r.path for r in records], skip_bad=skip_bad, progress=True, workers=default_decode_workers())
    kept = [records[i] for i in images.positions]
    labels = [saved.classes.index(r.label) for r in kept]
    accelerator = resolve_accelerator(accelerator)
    # With an OOD detector the one pass also gives each image's ood_score (the last column).
    network = saved.model if saved.ood is None else LogitsAndScore(ScoredModel(saved.model, saved.ood))
    logits = predict_logits(
        network,
        CachedImageDataset(images, labels, saved.transform()),
        device=device_for(accelerator),
        precision=resolve_precision(precision, accelerator),
    )
    scores = None if saved.ood is None else logits[:, -1]
    logits = logits if saved.ood is None else logits[:, :-1]
    outputs = SplitOutputs([str(r.path) for r in kept], np.asarray(labels), [r.patient_id for r in kept], logits)
    point = OperatingPoint(info.positive_index, info.temperature, info.threshold, info.threshold_policy or "")
    result = split_metrics(outputs, point, saved.classes, bootstrap=bootstrap, seed=seed)
    write_predictions(outputs, point, saved.classes, out / "predictions.csv")
    write_plots(outputs, point, saved.classes, result, out / "plots", prefix="test", band_resamples=min(200, bootstrap), seed=seed)
    metrics = {
        "run": str(run),
        "data": str(data),
        "split": split,
        "backbone": info.backbone,
        "strategy": info.strategy,
        "positive_class": info.positive_class,
        "threshold": info.threshold,
        "threshold_policy": info.threshold_policy,
        "test": result,
    }
    if scores is None:
        console.print("This model was saved without an OOD detector: no foreign-input check (train again to get one).")
    else:
        metrics["ood"] = ood_summary(saved, outputs, scores, point, bootstrap=bootstrap, seed=seed)
        console.print(f"OOD guard ({saved.ood.method}): {metrics['ood']['flagged']} of {len(scores)} images "
                      f"({metrics['ood']['flagged_fraction']:.1%}) do not look like the training data")
    write_metrics(out, metrics)
    from medtransfer.evaluation.report import write_report

    write_report(out, console=console, title=f"Evaluation of {run} on {data}")
    return metrics


def ood_summary(saved: SavedModel, outputs: SplitOutputs, scores: np.ndarray, point: OperatingPoint, *, bootstrap: int,
                seed: int) -> dict[str, Any]:
    """The flagged fraction and the metrics on the images the OOD guard accepts (metrics.json "ood")."""
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
