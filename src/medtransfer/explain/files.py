"""Heatmaps for image files: decode and prepare as prediction does, explain, render, write.

:func:`explain_files` is what ``medtransfer explain``, ``predict --cam`` and the web page
call; :func:`prepare_images` is shared with the report's gallery, so that both show the
image exactly as the model saw it. A multi-label model (one sigmoid per finding) gets one
map per finding: those at or above their thresholds, or those named (``explain --finding``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from medtransfer.errors import ConfigError
from medtransfer.explain.cam import ClassActivationMap
from medtransfer.explain.layers import eval_mode
from medtransfer.explain.render import finding_caption, gray_from_pixels, prediction_caption, save_overlay
from medtransfer.safeio import atomic_path

__all__ = ["check_findings", "explain_files", "is_multilabel", "prepare_images"]


def explain_files(
    saved_model: Any,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    method: str | None = None,
    target_layer: str | None = None,
    batch_size: int = 8,
    findings: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Explain the prediction of a saved model for each image file.

    A multi-label model is explained per finding instead: see :func:`explain_findings`, which
    ``findings`` is passed to (``None`` or empty: the findings each image is decided to show).
    A single-label model refuses ``findings`` (it explains its predicted class).

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
    method = method or cast(str, getattr(saved_model, "cam_method", "gradcam"))  # SavedModel.cam_method: a str
    if is_multilabel(saved_model):
        return explain_findings(saved_model, paths, out_dir, method=method, target_layer=target_layer,
                                batch_size=batch_size, findings=findings)
    if findings:
        raise ConfigError(
            f"--finding is for multi-label models; this model is single-label (classes {', '.join(saved_model.classes)}) "
            "and its heatmap explains the predicted class: leave --finding out"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
                map_path = _save_map(out_dir / f"{stem}.npy", maps[i])
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


def explain_findings(
    saved_model: Any,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    method: str = "gradcam",
    target_layer: str | None = None,
    batch_size: int = 8,
    findings: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Heatmaps per finding of a multi-label model for each image file.

    Each map targets the finding's output logit (CAM, Grad-CAM, Grad-CAM++, LayerCAM; occlusion:
    its log-sigmoid), as a class's logit is targeted for a single-label model. ``findings``
    (validated by :func:`check_findings`) names the findings to draw for every image, whatever
    their probability; ``None`` or empty draws, per image, every finding whose calibrated
    probability (``sigmoid(logit_k / T_k)``) is at or above its saved threshold, and **none**
    for an image where no finding reaches its threshold (its row then has no ``heatmaps``: a
    map of a finding the model does not report would read as evidence for it). The decision
    is the saved model's (every member and view of an ensemble or TTA), the map the first
    member's on the evaluation crop, as for single-label models.

    Writes, per image and finding, ``out_dir/<stem>_<finding>_<method>.png`` (the overlay with a
    caption such as ``Effusion p=0.93 (threshold 0.50)`` or ``Mass p=0.12 (below threshold 0.30)``)
    and the ``.npy`` map (float32 in [0, 1] at the model's input size); characters other than
    letters, digits, ``.``, ``_`` and ``-`` in a finding become ``-``; a repeated name gets ``-2``, ...

    Returns one row per image: ``path``, ``predicted`` (the findings at or above their thresholds),
    ``probabilities`` ({finding: p}), ``thresholds`` ({finding: threshold}) and ``heatmaps``: a
    list of ``{"finding", "probability", "threshold", "present", "caption", "overlay", "map"}``.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size: got {batch_size}; use 1 or more")
    names = list(saved_model.classes)
    thresholds = [float(t) for t in saved_model.info.thresholds]
    requested = check_findings(names, findings) if findings else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    network = getattr(saved_model, "network", saved_model.model)
    rows: list[dict[str, Any]] = []
    used_stems: dict[str, int] = {}
    with ClassActivationMap(saved_model.model, target_layer=target_layer, method=method, multilabel=True) as cam:
        for start in range(0, len(paths), batch_size):
            batch_paths = [Path(p) for p in paths[start : start + batch_size]]
            shown, batch = prepare_images(saved_model, batch_paths)
            with eval_mode(network), torch.no_grad():
                decision = saved_model.decide(network(batch))
            present = np.asarray(decision.predicted).astype(bool)
            pairs = [(i, k) for i in range(len(batch_paths))
                     for k in (requested if requested is not None else np.flatnonzero(present[i]).tolist())]
            maps: dict[tuple[int, int], np.ndarray] = {}
            for first in range(0, len(pairs), batch_size):  # one backward pass per (image, finding)
                chunk = pairs[first : first + batch_size]
                result = cam(batch[[i for i, _ in chunk]], class_index=[k for _, k in chunk])
                maps.update(zip(chunk, result.maps.cpu().numpy().astype(np.float32)))
            for i, path in enumerate(batch_paths):
                probabilities = decision.probabilities[i]
                heatmaps = []
                for _, k in (pair for pair in pairs if pair[0] == i):
                    caption = finding_caption(names[k], probabilities[k], thresholds[k])
                    stem = _unique_stem(f"{path.stem}_{_file_part(names[k])}_{method}", used_stems)
                    heatmaps.append({
                        "finding": names[k], "probability": float(probabilities[k]), "threshold": thresholds[k],
                        "present": bool(present[i, k]), "caption": caption,
                        "overlay": save_overlay(out_dir / f"{stem}.png", shown[i], maps[i, k], caption),
                        "map": _save_map(out_dir / f"{stem}.npy", maps[i, k]),
                    })
                rows.append({
                    "path": str(path),
                    "predicted": [c for c, flag in zip(names, present[i]) if flag],
                    "probabilities": {c: float(p) for c, p in zip(names, probabilities)},
                    "thresholds": dict(zip(names, thresholds)),
                    "heatmaps": heatmaps,
                })
    return rows


def check_findings(findings: Sequence[str], requested: Sequence[str]) -> list[int]:
    """Output indices of the ``requested`` findings (``--finding``), in the order given, repeats dropped.

    A name matches exactly, else case-insensitively when that is unambiguous.

    >>> check_findings(["Effusion", "Mass"], ["mass", "Effusion", "Mass"])
    [1, 0]

    Raises:
        ConfigError: a name that is not one of ``findings``; the message lists them.
    """
    findings = list(findings)
    folded: dict[str, list[int]] = {}
    for k, name in enumerate(findings):
        folded.setdefault(name.casefold(), []).append(k)
    indices, unknown = [], []
    for name in requested:
        matches = [findings.index(name)] if name in findings else folded.get(name.casefold(), [])
        if len(matches) != 1:
            unknown.append(name)
        elif matches[0] not in indices:
            indices.append(matches[0])
    if unknown:
        shown = ", ".join(repr(name) for name in unknown)
        raise ConfigError(f"--finding {shown}: not a finding of this model; choose from {', '.join(findings)}")
    return indices


def is_multilabel(saved_model: Any) -> bool:
    """Whether a saved model decides per finding (``task`` multi-label: one sigmoid and threshold each)."""
    return bool(getattr(getattr(saved_model, "task", None), "multilabel", False))


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


def _save_map(path: Path, heat: np.ndarray) -> Path:
    with atomic_path(path) as temporary:  # keeps the .npy suffix, so np.save adds none
        np.save(temporary, heat)
    return path


def _file_part(text: str) -> str:
    """A file-name fragment: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "finding"


def _unique_stem(stem: str, used: dict[str, int]) -> str:
    count = used.get(stem, 0) + 1
    used[stem] = count
    return stem if count == 1 else f"{stem}-{count}"
