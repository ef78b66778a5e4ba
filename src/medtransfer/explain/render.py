"""Pictures of heatmaps: the map over the image, its caption, and the grayscale image shown.

>>> rgb = overlay(np.full((4, 4), 128, np.uint8), np.eye(4))
>>> rgb.shape, rgb.dtype.name
((4, 4, 3), 'uint8')
>>> prediction_caption(["NORMAL", "PNEUMONIA"], [0.07, 0.93], 1, positive_index=1, threshold=0.41)
'PNEUMONIA p=0.93 (threshold 0.41)'
>>> finding_caption("Mass", 0.12, 0.3)
'Mass p=0.12 (below threshold 0.30)'
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtransfer.safeio import atomic_path

__all__ = [
    "finding_caption", "gray_from_pixels", "mask_edge", "overlay", "overlay_picture", "prediction_caption", "save_overlay",
]


def overlay(image_gray: np.ndarray, cam: np.ndarray, *, alpha: float = 0.4) -> np.ndarray:
    """Blend a [0, 1] map, coloured with matplotlib's "jet", over a grayscale image.

    ``image_gray``: H x W uint8, or float (taken as [0, 1] when it lies there, else min-max
    stretched). ``cam``: H x W in [0, 1]. Returns H x W x 3 uint8.
    """
    from matplotlib import colormaps

    image = np.asarray(image_gray)
    heat = np.asarray(cam, dtype=np.float64)
    if image.ndim != 2 or heat.shape != image.shape:
        raise ValueError(f"overlay: expected an H x W image and a map of the same shape; got {image.shape} and {heat.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay: alpha must lie in [0, 1]; got {alpha}")
    if image.dtype == np.uint8:
        gray = image / 255.0
    else:
        gray = image.astype(np.float64)
        low, high = float(gray.min()), float(gray.max())
        if low < 0 or high > 1:
            gray = (gray - low) / (high - low) if high > low else np.zeros_like(gray)
    colours = colormaps["jet"](np.clip(np.nan_to_num(heat), 0, 1))[..., :3]
    blended = (1 - alpha) * gray[..., None] + alpha * colours
    return np.clip(np.round(blended * 255), 0, 255).astype(np.uint8)


def save_overlay(
    path: str | Path, image_gray: np.ndarray, cam: np.ndarray, caption: str, *, alpha: float = 0.4,
    outline: np.ndarray | None = None,
) -> Path:
    """PNG of :func:`overlay_picture` at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        overlay_picture(image_gray, cam, caption, alpha=alpha, outline=outline).save(temporary, format="PNG")
    return path


def overlay_picture(
    image_gray: np.ndarray, cam: np.ndarray, caption: str, *, alpha: float = 0.4, outline: np.ndarray | None = None
) -> Any:
    """:func:`overlay` with a caption strip below it (PIL's default font), as a PIL image.

    The overlay keeps its H x W pixels (centred, the canvas widened when the caption is
    wider than the image). ``outline``: an H x W boolean region (a lesion mask, the border
    band) whose edge is drawn in white over the overlay.
    """
    from PIL import Image, ImageDraw, ImageFont

    rgb = overlay(image_gray, cam, alpha=alpha)
    if outline is not None:
        rgb[mask_edge(outline)] = OUTLINE_RGB
    picture = Image.fromarray(rgb, mode="RGB")
    font = ImageFont.load_default()
    pad = 4
    # whole pixels (Pillow types the box as floats; the default font's are ints)
    left, top, right, bottom = map(int, ImageDraw.Draw(picture).textbbox((0, 0), caption, font=font))
    width = max(picture.width, right - left + 2 * pad)
    strip = bottom - top + 2 * pad
    canvas = Image.new("RGB", (width, picture.height + strip), (0, 0, 0))
    canvas.paste(picture, ((width - picture.width) // 2, 0))
    ImageDraw.Draw(canvas).text((pad - left, picture.height + pad - top), caption, fill=(255, 255, 255), font=font)
    return canvas


OUTLINE_RGB = (255, 255, 255)


def mask_edge(mask: np.ndarray) -> np.ndarray:
    """The pixels of a boolean H x W region that touch a pixel outside it (4-neighbours); the
    image's own edge does not count, so a region reaching it is not framed there.

    >>> mask_edge(np.pad(np.ones((3, 3), bool), 1)).astype(int)[1:4, 1:4]
    array([[1, 1, 1],
           [1, 0, 1],
           [1, 1, 1]])
    """
    region = np.asarray(mask, dtype=bool)
    if region.ndim != 2:
        raise ValueError(f"outline: expected an H x W mask; got shape {region.shape}")
    padded = np.pad(region, 1, mode="edge")
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return region & ~inner


def prediction_caption(
    classes: Sequence[str], probabilities: Sequence[float], predicted: int, *, positive_index: int, threshold: float
) -> str:
    """The caption of an explained prediction: ``PNEUMONIA p=0.93 (threshold 0.41)``.

    ``p`` is the probability of the ``predicted`` class. Two classes: the threshold on the
    positive class is named, and a negative prediction shows the positive probability that
    fell short (``NORMAL p=0.88 (PNEUMONIA p=0.12 < threshold 0.41)``). More classes:
    ``b p=0.70``.
    """
    name, p = classes[predicted], float(probabilities[predicted])
    if len(classes) != 2:
        return f"{name} p={p:.2f}"
    if predicted == positive_index:
        return f"{name} p={p:.2f} (threshold {threshold:.2f})"
    p_positive = float(probabilities[positive_index])
    return f"{name} p={p:.2f} ({classes[positive_index]} p={p_positive:.2f} < threshold {threshold:.2f})"


def finding_caption(finding: str, probability: float, threshold: float) -> str:
    """The caption of one finding of a multi-label model: ``Effusion p=0.93 (threshold 0.50)`` when
    its calibrated probability reaches its threshold (present), ``Mass p=0.12 (below threshold 0.30)``
    when it does not (drawn only on request)."""
    p, t = float(probability), float(threshold)
    return f"{finding} p={p:.2f} (threshold {t:.2f})" if p >= t else f"{finding} p={p:.2f} (below threshold {t:.2f})"


def gray_from_pixels(pixels: torch.Tensor) -> np.ndarray:
    """uint8 C x H x W image tensor -> uint8 H x W (channel mean): the image as the model saw it."""
    return pixels.float().mean(dim=0).round().clamp(0, 255).to(torch.uint8).numpy()

