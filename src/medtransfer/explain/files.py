"""Heatmaps for image files: decode and prepare as prediction does, explain, render, write.

:func:`explain_files` is what ``medtransfer explain``, ``predict --cam`` and the web page
call; :func:`prepare_images` is shared with the report's gallery, so that both show the
image exactly as the model saw it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtransfer.errors import ConfigError
from medtransfer.explain.cam import ClassActivationMap
from medtransfer.explain.render import gray_from_pixels, prediction_caption, save_overlay

__all__ = ["explain_files", "prepare_images"]


def explain_files(
    saved_model: Any,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    method: str | None = None,
    target_layer: str | None = None,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Explain the prediction of a saved model for each image file.

    ``method`` None is the run's own (``saved_model.cam_method``: its ``train --cam-method``, else
    Grad-CAM). Images are preprocessed as prediction does (see :func:`prepare_images`). The explained
    class is the prediction: for two classes the positive class when its temperature-scaled
    probability reaches the saved threshold, else the other class; for more classes the
    argmax; a seed ensemble or a model with test-time augmentation decides with every member
    and view (as predict does), while the map is the first member's on the evaluation crop.
    Writes, per image, ``out_dir/<stem>_<method>.png`` (the map over the image as the model saw it, i.e. the centre crop, with a caption such as ``PNEUMONIA p=0.93
    (threshold 0.41)``) and ``out_dir/<stem>_<method>.npy`` (the float32 map in [0, 1] at
    the model's input size). Repeated stems get ``-2``, ``-3``, ... appended.

    Returns one row per image: ``path``, ``predicted`` (class name), ``probability`` (of the
    predicted class), ``probabilities`` ({class: p}), ``overlay`` and ``map`` (paths).
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size: got {batch_size}; use 1 or more")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    method = method or getattr(saved_model, "cam_method", "gradcam")
    classes = list(saved_model.classes)
    positive, threshold = saved_model.positive_index, saved_model.threshold

    def decide(logits: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(saved_model.decide(logits).predicted, device=logits.device)

    network = getattr(saved_model, "network", saved_model.model)
    rows: list[dict[str, Any]] = []
    used_stems: dict[str, int] = {}
    with ClassActivationMap(saved_model.model, target_layer=target_layer, method=method) as cam:
        for start in range(0, len(paths), batch_size):
            batch_paths = [Path(p) for p in paths[start : start + batch_size]]
            shown, batch = prepare_images(saved_model, batch_paths)
            decision = None
            if network is not saved_model.model:  # an ensemble or TTA decides; the map is the first member's
                with torch.no_grad():
                    decision = saved_model.decide(network(batch))
            result = cam(batch, class_index=decide if decision is None else decision.predicted.tolist())
            probabilities = (decision or saved_model.decide(result.logits)).probabilities
            maps = result.maps.cpu().numpy().astype(np.float32)
            for i, path in enumerate(batch_paths):
                index = int(result.class_index[i])
                caption = prediction_caption(classes, probabilities[i], index, positive_index=positive, threshold=threshold)
                stem = _unique_stem(f"{path.stem}_{method}", used_stems)
                map_path = out_dir / f"{stem}.npy"
                np.save(map_path, maps[i])
                rows.append(
                    {
                        "path": str(path),
                        "predicted": classes[index],
                        "probability": float(probabilities[i, index]),
                        "probabilities": {c: float(probabilities[i, j]) for j, c in enumerate(classes)},
                        "overlay": save_overlay(out_dir / f"{stem}.png", shown[i], maps[i], caption),
                        "map": map_path,
                    }
                )
    return rows


def prepare_images(saved_model: Any, paths: Sequence[str | Path]) -> tuple[list[np.ndarray], torch.Tensor]:
    """Image files -> (the images as the model sees them, for display; the batch of model inputs).

    Each file goes through the saved model's own preprocessing (``decode``, ``crop``,
    ``normalise``: what ``SavedModel.preprocess`` does, bit for bit). The displayed image is
    the uint8 crop as an H x W grayscale array. The inputs come as one N x C x H x W tensor
    on the model's device and in its dtype.
    """
    parameter = next(saved_model.model.parameters())
    shown, inputs = [], []
    for path in paths:
        pixels = saved_model.crop(saved_model.decode(Path(path)))
        inputs.append(saved_model.normalise(pixels))
        shown.append(gray_from_pixels(pixels))
    return shown, torch.stack(inputs).to(device=parameter.device, dtype=parameter.dtype)


def _unique_stem(stem: str, used: dict[str, int]) -> str:
    count = used.get(stem, 0) + 1
    used[stem] = count
    return stem if count == 1 else f"{stem}-{count}"
