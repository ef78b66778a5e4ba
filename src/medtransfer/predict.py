"""`medtransfer predict`: class probabilities for new images from a saved model (no pickle)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medtransfer.artifacts import Decision, SavedModel
from medtransfer.data.discover import IMAGE_SUFFIXES
from medtransfer.errors import DataError
from medtransfer.ood import ScoredModel
from medtransfer.runtime import autocast, device_for, resolve_accelerator, resolve_precision


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded to the images inside them (sorted, hidden files skipped)."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths.extend(
                sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            )
        elif item.is_file():
            paths.append(item)
        else:
            raise DataError(f"PATH {item}: no such file or folder; pass image files or folders of images")
    if not paths:
        raise DataError(f"PATH {', '.join(map(str, inputs))}: no images found (.jpg, .jpeg, .png, .bmp, .tif, .dcm)")
    return paths


def load_batch(saved: SavedModel, paths: list[Path], *, skip_bad: bool = False) -> tuple[torch.Tensor, list[Path], list[str]]:
    """Preprocess exactly as evaluation did (SavedModel.preprocess); list every bad file."""
    tensors, kept, bad = [], [], []
    for path in paths:
        try:
            tensors.append(saved.preprocess(path))
        except DataError as exc:
            bad.append(str(exc).split("; fix or remove")[0])  # "<path>: not a readable image (reason)"
            continue
        kept.append(path)
    if bad and not skip_bad:
        more = f"; ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(f"{len(bad)} unreadable image(s): {'; '.join(bad[:5])}{more}. Use --skip-bad-images to leave them out")
    return (torch.stack(tensors) if tensors else torch.zeros(0)), kept, bad


@dataclass
class Classifier:
    """The saved model on a device at a precision: preprocessed images in, decisions out."""

    saved: SavedModel
    device: torch.device
    precision: str

    @classmethod
    def on(cls, saved: SavedModel, *, accelerator: str = "auto", precision: str = "auto") -> Classifier:
        device = device_for(accelerator)
        precision = resolve_precision(precision, resolve_accelerator(accelerator))
        saved.model.eval().to(device).to(memory_format=torch.channels_last)
        return cls(saved, device, precision)

    def __call__(self, images: torch.Tensor) -> Decision:
        with torch.inference_mode(), autocast(self.device, self.precision):
            logits = self.saved.model(images.to(self.device).contiguous(memory_format=torch.channels_last))
        return self.saved.decide(logits)

    def scored(self, images: torch.Tensor) -> tuple[Decision, np.ndarray | None]:
        """The decision and, when the model has an OOD detector, each image's ood_score (one forward pass)."""
        if self.saved.ood is None:
            return self(images), None
        with torch.inference_mode(), autocast(self.device, self.precision):
            logits, scores = ScoredModel(self.saved.model, self.saved.ood)(
                images.to(self.device).contiguous(memory_format=torch.channels_last)
            )
        return self.saved.decide(logits), scores.float().cpu().numpy()


def decision_row(saved: SavedModel, path: str, decision: Decision, i: int, scores: np.ndarray | None = None) -> dict:
    """path, prob_<class> per class, pred (and ood_score, ood = in/out with a detector): one image's row."""
    row = {"path": path}
    row.update({f"prob_{c}": float(decision.probabilities[i, k]) for k, c in enumerate(saved.classes)})
    row["pred"] = saved.classes[int(decision.predicted[i])]
    if scores is not None:
        row["ood_score"] = float(scores[i])
        row["ood"] = "out" if saved.ood.flags(scores[i]) else "in"
    return row


def predict_files(
    saved: SavedModel,
    paths: list[Path],
    *,
    batch_size: int = 32,
    accelerator: str = "auto",
    precision: str = "auto",
    skip_bad: bool = False,
) -> list[dict]:
    """One row per image: path, calibrated probability per class, predicted class (saved threshold),
    and with an OOD detector ood_score (higher = more foreign) and ood ("out" above its threshold)."""
    classify = Classifier.on(saved, accelerator=accelerator, precision=precision)
    rows = []
    for start in range(0, len(paths), batch_size):
        images, kept, _ = load_batch(saved, paths[start : start + batch_size], skip_bad=skip_bad)
        if not kept:
            continue
        decision, scores = classify.scored(images)
        rows.extend(decision_row(saved, str(path), decision, i, scores) for i, path in enumerate(kept))
    return rows


def write_rows(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})

