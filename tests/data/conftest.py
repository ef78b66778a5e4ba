"""Fixtures for the data tests: images with structure that survives resizing and re-encoding."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image


def textured_image(seed: int, size: int = 224) -> Image.Image:
    """A grayscale image with structure at the scales a radiograph has.

    Plain pixel noise has none that survives resizing, and very smooth images give a
    perceptual hash little to hold on to; upsampled coarse noise has both.
    """
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).resize((size, size), Image.BICUBIC)


@pytest.fixture
def make_textured() -> Callable[..., Path]:
    """make_textured(path, seed, size=224, resize=None, **save_options) writes a textured image (or a resized copy)."""

    def write(path: Path, seed: int, *, size: int = 224, resize: int | None = None, **options) -> Path:
        image = textured_image(seed, size)
        if resize is not None:
            image = image.resize((resize, resize), Image.LANCZOS)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **options)
        return path

    return write
