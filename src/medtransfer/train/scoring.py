"""Scoring the best-on-validation model: the operating point on validation, then val and test.

Single-label: one temperature and one threshold on the positive class; multi-label: one of each
per finding (:mod:`medtransfer.evaluation.multilabel`). The test split never influences a choice.
Also the OOD guard, fitted on train's features as evaluation sees the images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader

from medtransfer.config import TrainConfig
from medtransfer.data.cache import CachedImages
from medtransfer.data.datamodule import CachedImageDataset
from medtransfer.data.discover import Record
from medtransfer.data.transforms import eval_transform, with_border_crop
from medtransfer.evaluation.evaluate import SplitOutputs, fit_operating_point, split_metrics
from medtransfer.evaluation.multilabel import fit_multilabel_point, multilabel_split_metrics
from medtransfer.models.backbones import BackboneSpec
from medtransfer.models.inference import inference_network
from medtransfer.models.strategies import TransferModel, backbone_children
from medtransfer.ood import OODDetector, collect_features, fit_detector, pick_layers
from medtransfer.runtime import predict_logits
from medtransfer.train.labelled import LabelledData
from medtransfer.train.outputs import Evaluation


@dataclass(frozen=True)
class Hardware:
    accelerator: str  # "cpu" or "gpu"
    precision: str  # resolved: 32-true, bf16-mixed or 16-mixed
    device: torch.device
    workers: int  # DataLoader workers


@dataclass
class SplitData:
    records: list[Record]
    images: CachedImages
    labels: list[int] | np.ndarray  # class indices, or (n, findings) 1 / 0 / NaN targets (multi-label)


def eval_datasets(splits: dict[str, SplitData], config: TrainConfig, spec: BackboneSpec) -> dict[str, CachedImageDataset]:
    transform = with_border_crop(eval_transform(
        image_size=config.image_size, mean=spec.normalization.mean, std=spec.normalization.std,
        channels=config.in_channels, crop_fraction=config.eval_crop_fraction,
    ), config.border_crop)
    return {name: CachedImageDataset(s.images, s.labels, transform) for name, s in splits.items()}



def evaluate_model(
    model: TransferModel, splits: dict[str, SplitData], data: LabelledData, config: TrainConfig, hardware: Hardware
) -> Evaluation:
    """Best-on-validation model: calibrate and pick the threshold on val, then score val and test."""
    datasets = eval_datasets({k: v for k, v in splits.items() if k in ("val", "test")}, config, model.spec)
    outputs = {}
    for name, dataset in datasets.items():
        logits = predict_logits(  # with the TTA the saved model will use: the operating point is chosen on it
            inference_network([model], config.tta), dataset, batch_size=max(64, config.batch_size),
            num_workers=hardware.workers, device=hardware.device, precision=hardware.precision)
        split = splits[name]
        outputs[name] = SplitOutputs(
            [str(r.path) for r in split.records], np.asarray(split.labels), [r.patient_id for r in split.records], logits
        )
    if data.task.multilabel:
        val = outputs["val"]
        per_finding = fit_multilabel_point(val.logits, val.labels, data.task, policy=config.threshold,
                                           calibrate=config.calibrate)
        metrics = {
            name: multilabel_split_metrics(o.logits, o.labels, o.patient_ids, per_finding, bootstrap=config.bootstrap,
                                           seed=config.seed)
            for name, o in outputs.items()
        }
        return Evaluation(data.classes, data.positive_class, outputs, per_finding, metrics, task=data.task)
    assert data.positive_class is not None  # single-label: load_labelled_data chose it
    point = fit_operating_point(
        outputs["val"], positive_index=data.classes.index(data.positive_class), policy=config.threshold,
        calibrate=config.calibrate,
    )
    metrics = {
        name: split_metrics(split_outputs, point, data.classes, bootstrap=config.bootstrap, seed=config.seed)
        for name, split_outputs in outputs.items()
    }
    return Evaluation(data.classes, data.positive_class, outputs, point, metrics)


def fit_ood(
    model: TransferModel, splits: dict[str, SplitData], config: TrainConfig, hardware: Hardware, console: Console,
) -> OODDetector:
    """The OOD guard on train's penultimate and stage features (as evaluation sees the images); accepts 95% of val."""
    layers = pick_layers(model, backbone_children(model.net, model.spec), config.image_size, config.in_channels)
    features = {
        name: collect_features(model, DataLoader(dataset, batch_size=max(64, config.batch_size),
                                                 num_workers=hardware.workers), layers,
                               device=hardware.device, precision=hardware.precision)
        for name, dataset in eval_datasets({k: splits[k] for k in ("train", "val")}, config, model.spec).items()
    }
    labels = np.asarray(splits["train"].labels)
    if labels.ndim == 2:  # multi-label: one Gaussian over all training images (findings overlap, no class to fit per)
        labels = np.zeros(len(labels), dtype=np.int64)
    detector = fit_detector(features["train"], labels, features["val"], layers=layers, seed=config.seed)
    console.print(f"OOD guard: {detector.method} ({len(layers)} stages and the penultimate features), "
                  f"threshold {detector.threshold:.3f} (accepts 95% of validation)")
    return detector
