"""`medtransfer predict`: class probabilities for new images from a saved model (no pickle)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from medtransfer.artifacts import SavedModel
from medtransfer.data.decode import decode_image
from medtransfer.data.datamodule import image_tensor
from medtransfer.data.discover import IMAGE_SUFFIXES
from medtransfer.errors import DataError
from medtransfer.evaluation.evaluate import OperatingPoint
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


def operating_point(saved: SavedModel) -> OperatingPoint:
    return OperatingPoint(saved.positive_index, saved.temperature, saved.threshold, saved.info.get("threshold_policy", ""))


def load_batch(saved: SavedModel, paths: list[Path], *, skip_bad: bool = False) -> tuple[torch.Tensor, list[Path], list[str]]:
    """Decode exactly as evaluation did (same decode size, crop, normalisation); list every bad file."""
    transform = saved.transform()
    tensors, kept, bad = [], [], []
    for path in paths:
        try:
            array = decode_image(path, size=saved.info["decode_size"])
        except DataError as exc:
            bad.append(str(exc).split("; fix or remove")[0])  # "<path>: not a readable image (reason)"
            continue
        tensors.append(transform(image_tensor(array)))
        kept.append(path)
    if bad and not skip_bad:
        more = f"; ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(f"{len(bad)} unreadable image(s): {'; '.join(bad[:5])}{more}. Use --skip-bad-images to leave them out")
    return (torch.stack(tensors) if tensors else torch.zeros(0)), kept, bad


def predict_files(
    saved: SavedModel,
    paths: list[Path],
    *,
    batch_size: int = 32,
    accelerator: str = "auto",
    precision: str = "auto",
    skip_bad: bool = False,
) -> list[dict]:
    """One row per image: path, calibrated probability per class, predicted class (saved threshold)."""
    device = device_for(accelerator)
    precision = resolve_precision(precision, resolve_accelerator(accelerator))
    model = saved.model.eval().to(device).to(memory_format=torch.channels_last)
    point = operating_point(saved)
    rows = []
    for start in range(0, len(paths), batch_size):
        images, kept, _ = load_batch(saved, paths[start : start + batch_size], skip_bad=skip_bad)
        if not kept:
            continue
        with torch.inference_mode(), autocast(device, precision):
            logits = model(images.to(device).contiguous(memory_format=torch.channels_last)).float().cpu().numpy()
        probs = point.probabilities(logits)
        predicted = point.predict(probs)
        for i, path in enumerate(kept):
            row = {"path": str(path)}
            row.update({f"prob_{c}": float(probs[i, k]) for k, c in enumerate(saved.classes)})
            row["pred"] = saved.classes[int(predicted[i])]
            rows.append(row)
    return rows


def write_rows(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})

