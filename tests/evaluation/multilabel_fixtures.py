"""Multi-label test material: a saved random-weight multi-label model, a small labelled image set,
and run folders written from given logits (metrics.json + predictions_test.csv, as `train` writes them)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from medtransfer.artifacts import model_info, save_model
from medtransfer.evaluation.multilabel import MultiLabelPoint, multilabel_split_metrics, write_multilabel_predictions
from medtransfer.rundir import write_metrics
from medtransfer.task import MULTI_LABEL, Task

FINDINGS = ("Effusion", "Mass", "Nodule")


def write_image(path: Path, *, seed: int, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)).save(path)
    return path


def saved_multilabel_run(folder: Path, *, findings: tuple[str, ...] = FINDINGS, thresholds=None, temperatures=None,
                         training: dict | None = None) -> Path:
    """An untrained ResNet-18 with one sigmoid per finding, saved as `train` saves a multi-label model."""
    import torch

    from medtransfer.models.backbones import create_backbone
    from medtransfer.models.strategies import Strategy, build_transfer_model

    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=len(findings), weights="none")
    model = build_transfer_model(net, spec, Strategy("finetune", 0))
    info = model_info(
        model, classes=list(findings), task=MULTI_LABEL,
        thresholds=thresholds or [0.5] * len(findings), temperatures=temperatures or [1.0] * len(findings),
        image_size=32, decode_size=40, threshold_policy="youden",
        training_config={"calibrate": "temperature", "threshold": "youden", "labels": "folder", "task": MULTI_LABEL,
                         "uncertain": "ignore", **(training or {})},
    )
    save_model(model, info, folder)
    return folder


def image_set(root: Path, patients: int = 20, per_patient: int = 2, seed: int = 0) -> list[tuple[Path, str, dict[str, float]]]:
    """Noise images; each row (path, patient, {finding: 1 / 0}) with about 40% positives per finding."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        for v in range(per_patient):
            path = write_image(root / "images" / f"{p:05d}_{v:03d}.png", seed=p * 100 + v)
            rows.append((path, f"P{p}", {f: float(rng.random() < 0.4) for f in FINDINGS}))
    return rows


def write_columns_csv(path: Path, rows, columns: dict[str, str | None], *, blank_every: int = 0) -> Path:
    """A CheXpert-style CSV: one column per finding. `columns` maps the model's finding to the CSV's
    column name (None: no column). Every `blank_every`-th row leaves the second column blank (unknown)."""
    present = [(f, name) for f, name in columns.items() if name is not None]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Path", *[name for _, name in present], "patient_id"])
        for i, (image, patient, labels) in enumerate(rows):
            cells = [str(int(labels[f])) for f, _ in present]
            if blank_every and i % blank_every == 0 and len(cells) > 1:
                cells[1] = ""
            writer.writerow([str(image), *cells, patient])
    return path


def write_run_folder(folder: Path, paths: list[str], targets: np.ndarray, patients: list[str], logits: np.ndarray, *,
                     findings: tuple[str, ...] = FINDINGS, bootstrap: int = 0) -> Path:
    """metrics.json (test block, task) and predictions_test.csv from logits, with temperature 1 and threshold 0.5."""
    folder.mkdir(parents=True, exist_ok=True)
    point = MultiLabelPoint(Task(MULTI_LABEL, findings), [1.0] * len(findings), [0.5] * len(findings), "youden")
    test = multilabel_split_metrics(logits, targets, patients, point, bootstrap=bootstrap, seed=0)
    write_multilabel_predictions(paths, targets, patients, logits, point, folder / "predictions_test.csv")
    write_metrics(folder, {"backbone": "resnet18", "classes": list(findings), "task": MULTI_LABEL, "test": test,
                           "operating_point": point.to_dict()})
    return folder


def cohort(n_patients: int = 40, per_patient: int = 3, seed: int = 0, findings: tuple[str, ...] = FINDINGS):
    """(paths, targets with some NaN, patient ids, informative logits, noise logits)."""
    rng = np.random.default_rng(seed)
    n = n_patients * per_patient
    patients = [f"P{i // per_patient}" for i in range(n)]
    targets = (rng.random((n, len(findings))) < 0.35).astype(float)
    targets[rng.random((n, len(findings))) < 0.1] = np.nan
    signal = np.nan_to_num(targets, nan=0.5) * 1.5
    good = signal + rng.normal(size=targets.shape)
    noisy = 0.3 * signal + rng.normal(size=targets.shape)
    return [f"/data/img{i:04d}.png" for i in range(n)], targets, patients, good, noisy
