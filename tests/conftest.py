"""Shared fixtures: tiny images and Kaggle-layout chest X-ray trees on disk.

`make_image(path, mode="L")` writes one small image (JPEG or PNG by suffix; "L" grayscale
or "RGB"); its pixels are seeded by the path, so two files never share bytes by accident.

`make_kaggle_tree(spec, root=None)` writes DIR/{split}/{CLASS}/* and returns DIR
(default tmp_path / "chest_xray"). `spec` maps split -> class -> images, where images is
- an int n: n Kermany-named grayscale JPEGs (NORMAL: IM-0001-0001.jpeg ...,
  PNEUMONIA: person1_bacteria_1.jpeg ..., other classes: CLASS-0001.jpeg ...), or
- a list of file names, or of (file name, mode) pairs.

    root = make_kaggle_tree({"train": {"NORMAL": 3, "PNEUMONIA": ["person1_virus_7.png"]}})

`write_demo_data(root, **settings)` writes a tiny synthetic chest X-ray set (the demo's
phantoms, Kaggle layout) for training end to end: TINY_DEMO with `settings` changed. The
session fixture `demo_data(name="chest_xray", **settings)` builds each distinct set once and
returns its folder; tests only read it (one that changes its data writes its own copy).

    data = demo_data(test_patients_per_class=2, image_size=40)
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

ImageSpec = int | list[str | tuple[str, str]]
TreeSpec = dict[str, dict[str, ImageSpec]]

# Small enough to train a 32-48 px ResNet-18 for a few epochs in seconds; seed 0 puts both classes in every split.
TINY_DEMO = dict(patients_per_class=6, images_per_patient=(1, 1), val_patients_per_class=3, test_patients_per_class=3,
                 image_size=48, seed=0)


def write_image(path: Path, mode: str = "L", *, size: tuple[int, int] = (12, 10), seed: int | None = None) -> Path:
    """A small noise image at `path` (format from the suffix); pixels seeded by the path unless `seed` is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()) if seed is None else seed)
    channels = {"L": (), "RGB": (3,)}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], *channels), dtype=np.uint8)
    Image.fromarray(pixels).save(path)  # mode follows the array: 2-D -> L, HxWx3 -> RGB
    return path


def kermany_names(label: str, count: int, *, start: int = 1) -> list[str]:
    """`count` file names in the Kermany style for `label`, one patient each."""
    if label.upper() == "NORMAL":
        return [f"IM-{i:04d}-0001.jpeg" for i in range(start, start + count)]
    if label.upper() == "PNEUMONIA":
        kinds = ("bacteria", "virus")
        return [f"person{i}_{kinds[i % 2]}_{i * 3}.jpeg" for i in range(start, start + count)]
    return [f"{label}-{i:04d}.jpeg" for i in range(start, start + count)]


@pytest.fixture
def make_image() -> Callable[..., Path]:
    return write_image


@pytest.fixture
def make_kaggle_tree(tmp_path: Path) -> Callable[..., Path]:
    def build(spec: TreeSpec, root: Path | None = None) -> Path:
        root = Path(root) if root is not None else tmp_path / "chest_xray"
        for split, classes in spec.items():
            for label, images in classes.items():
                folder = root / split / label
                folder.mkdir(parents=True, exist_ok=True)
                entries = kermany_names(label, images) if isinstance(images, int) else images
                for entry in entries:
                    name, mode = (entry, "L") if isinstance(entry, str) else entry
                    write_image(folder / name, mode)
        return root

    return build


def write_demo_data(root: Path, **settings) -> Path:
    """A tiny synthetic chest X-ray set at `root` (generate_demo_dataset with TINY_DEMO, `settings` changed)."""
    from medtransfer.data.synthetic import generate_demo_dataset

    generate_demo_dataset(root, **{**TINY_DEMO, **settings})
    return root


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Callable[..., Path]:
    built: dict[tuple, Path] = {}

    def build(name: str = "chest_xray", **settings) -> Path:
        key = (name, *sorted({**TINY_DEMO, **settings}.items()))
        if key not in built:
            built[key] = write_demo_data(tmp_path_factory.mktemp("demo") / name, **settings)
        return built[key]

    return build
