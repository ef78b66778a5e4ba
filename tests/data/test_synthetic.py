"""Tests for the synthetic demo dataset (medtransfer.data.synthetic)."""

from __future__ import annotations

import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtransfer.data.synthetic import (
    CLASSES,
    SPLITS,
    DemoSummary,
    generate_demo_dataset,
    lesion_mask_path,
)
from medtransfer.errors import ConfigError, DataError

NORMAL_RE = re.compile(r"^IM-(?P<patient>\d{4})-(?P<k>\d{4})\.png$")
PNEUMONIA_RE = re.compile(r"^person(?P<patient>\d+)_(?P<kind>bacteria|virus)_(?P<image>\d+)\.png$")
SIZE = 128


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoSummary:
    root = tmp_path_factory.mktemp("demo")
    return generate_demo_dataset(
        root,
        patients_per_class=5,
        images_per_patient=(1, 3),
        val_patients_per_class=2,
        test_patients_per_class=3,
        image_size=SIZE,
        seed=3,
    )


def _images(root: Path, split: str, cls: str) -> list[Path]:
    return sorted((root / split / cls).glob("*.png"))


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im)


def _patient_id(name: str, cls: str) -> str:
    if cls == "NORMAL":
        m = NORMAL_RE.match(name)
        assert m, name
        return f"IM-{m['patient']}"
    m = PNEUMONIA_RE.match(name)
    assert m, name
    return f"person{m['patient']}"


def test_layout_and_counts_match_summary(demo: DemoSummary) -> None:
    root = demo.out_dir
    assert sorted(p.name for p in root.iterdir()) == ["README.txt", "masks", "test", "train", "val"]
    for split in SPLITS:
        for cls in CLASSES:
            files = _images(root, split, cls)
            assert len(files) == demo.images[split][cls]
            patients = {_patient_id(f.name, cls) for f in files}
            assert len(patients) == demo.patients[split][cls]
            for f in files:  # 8-bit grayscale at the requested size
                assert _load(f).shape == (SIZE, SIZE)
    assert demo.patients["train"] == {"NORMAL": 5, "PNEUMONIA": 5}
    assert demo.patients["test"] == {"NORMAL": 3, "PNEUMONIA": 3}
    # val is tiny, like the Kaggle one: one image per patient.
    assert demo.images["val"] == demo.patients["val"] == {"NORMAL": 2, "PNEUMONIA": 2}
    for split in ("train", "test"):
        for cls in CLASSES:
            n_p, n_i = demo.patients[split][cls], demo.images[split][cls]
            assert n_p <= n_i <= 3 * n_p
    assert demo.total_images == sum(len(_images(root, s, c)) for s in SPLITS for c in CLASSES)
    assert demo.masks == sum(demo.images[s]["PNEUMONIA"] for s in SPLITS)
    readme = (root / "README.txt").read_text(encoding="utf-8")
    assert "synthetic" in readme.lower() and "medtransfer" in readme and "masks/" in readme


def test_names_follow_kermany_patterns_and_patients_do_not_leak(demo: DemoSummary) -> None:
    split_of: dict[str, set[str]] = defaultdict(set)
    image_numbers: list[int] = []
    kinds_per_patient: dict[str, set[str]] = defaultdict(set)
    for split in SPLITS:
        for f in _images(demo.out_dir, split, "NORMAL"):
            assert NORMAL_RE.match(f.name), f.name
            split_of[_patient_id(f.name, "NORMAL")].add(split)
        for f in _images(demo.out_dir, split, "PNEUMONIA"):
            m = PNEUMONIA_RE.match(f.name)
            assert m, f.name
            image_numbers.append(int(m["image"]))
            kinds_per_patient[m["patient"]].add(m["kind"])
            split_of[_patient_id(f.name, "PNEUMONIA")].add(split)
    assert all(len(splits) == 1 for splits in split_of.values())
    # Patient numbers are unique across classes too (IM-0123 and person123 never coexist).
    numbers = [int(re.sub(r"\D", "", pid)) for pid in split_of]
    assert len(numbers) == len(set(numbers)) == demo.total_patients
    assert len(image_numbers) == len(set(image_numbers))  # global image counter
    assert all(len(k) == 1 for k in kinds_per_patient.values())  # one pneumonia type per patient


def test_masks_live_in_parallel_tree_and_lie_inside_lungs(demo: DemoSummary) -> None:
    root = demo.out_dir
    for split in SPLITS:
        for f in _images(root, split, "NORMAL"):
            assert lesion_mask_path(f, root) is None
        assert not (root / "masks" / split / "NORMAL").exists()
        for f in _images(root, split, "PNEUMONIA"):
            assert "mask" not in f.name
            mp = lesion_mask_path(f, root)
            assert mp == root / "masks" / split / "PNEUMONIA" / f.name
            mask = _load(mp)
            assert mask.shape == (SIZE, SIZE)
            assert set(np.unique(mask)) == {0, 255}
            pos = mask > 0
            # Not in the background border, not below the lungs, not on the spine.
            b = SIZE // 10
            assert not pos[:b].any() and not pos[:, :b].any() and not pos[:, -b:].any()
            assert not pos[int(0.86 * SIZE) :].any()
            c = SIZE // 2
            assert not pos[:, c - SIZE // 40 : c + SIZE // 40].any()
            image = _load(f)
            assert image[pos].mean() > 40  # lung tissue, not the dark background
    assert lesion_mask_path(root.parent / "elsewhere.png", root) is None
    a_mask = next((root / "masks" / "train" / "PNEUMONIA").glob("*.png"))
    assert lesion_mask_path(a_mask, root) is None


def test_lesions_are_brighter_than_surrounding_lung(demo: DemoSummary) -> None:
    gaps = []
    for split in SPLITS:
        for f in _images(demo.out_dir, split, "PNEUMONIA"):
            image = _load(f).astype(np.float64)
            mask = _load(lesion_mask_path(f, demo.out_dir)) > 0
            grown = mask.copy()
            for _ in range(4):  # 4-pixel ring of the lung just outside the lesion
                grown |= np.roll(grown, 1, 0) | np.roll(grown, -1, 0) | np.roll(grown, 1, 1) | np.roll(grown, -1, 1)
            ring = grown & ~mask
            gaps.append(image[mask].mean() - image[ring].mean())
    # A lobar consolidation that abuts the heart or the chest wall has brighter soft tissue in
    # part of its ring (the silhouette sign), so not every ring is all lung.
    assert np.mean(np.array(gaps) > 0) >= 0.75
    assert np.mean(gaps) > 5  # grey levels: clearly visible on average


def test_images_of_one_patient_are_similar_but_not_identical(demo: DemoSummary) -> None:
    by_patient: dict[str, list[np.ndarray]] = defaultdict(list)
    for f in _images(demo.out_dir, "train", "NORMAL"):
        by_patient[_patient_id(f.name, "NORMAL")].append(_load(f).astype(np.float64))
    multi = [ims for ims in by_patient.values() if len(ims) > 1]
    assert multi, "fixture should contain a patient with several images"
    same = [np.abs(ims[0] - ims[1]).mean() for ims in multi]
    firsts = [ims[0] for ims in by_patient.values()]
    other = [np.abs(firsts[i] - firsts[i + 1]).mean() for i in range(len(firsts) - 1)]
    assert min(same) > 0
    assert np.mean(same) < np.mean(other)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    kw = dict(patients_per_class=2, val_patients_per_class=1, test_patients_per_class=1, image_size=64)
    generate_demo_dataset(tmp_path / "a", seed=7, **kw)
    generate_demo_dataset(tmp_path / "b", seed=7, **kw)
    generate_demo_dataset(tmp_path / "c", seed=8, **kw)
    a, b, c = (_tree_bytes(tmp_path / n) for n in "abc")
    assert a == b
    images_a = {k: v for k, v in a.items() if k.endswith(".png") and not k.startswith("masks")}
    images_c = {k: v for k, v in c.items() if k.endswith(".png") and not k.startswith("masks")}
    assert set(images_a.values()).isdisjoint(images_c.values())


def test_small_run_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    summary = generate_demo_dataset(tmp_path, patients_per_class=3, val_patients_per_class=1, test_patients_per_class=2)
    elapsed = time.perf_counter() - start
    assert summary.patients["train"] == {"NORMAL": 3, "PNEUMONIA": 3}
    assert _load(_images(tmp_path, "train", "NORMAL")[0]).shape == (224, 224)
    assert elapsed < 5.0


def test_existing_dataset_needs_overwrite(tmp_path: Path) -> None:
    kw = dict(patients_per_class=1, val_patients_per_class=0, test_patients_per_class=0, image_size=48)
    generate_demo_dataset(tmp_path, seed=1, **kw)
    stale = tmp_path / "train" / "NORMAL" / "stale.png"
    stale.write_bytes(b"x")
    with pytest.raises(DataError, match="overwrite"):
        generate_demo_dataset(tmp_path, seed=1, **kw)
    summary = generate_demo_dataset(tmp_path, seed=1, overwrite=True, **kw)
    assert not stale.exists()
    assert summary.total_images == len(list(tmp_path.glob("*/*/*.png")))  # masks are one level deeper


@pytest.mark.parametrize(
    "kwargs",
    [
        {"patients_per_class": 0},
        {"images_per_patient": (0, 2)},
        {"images_per_patient": (3, 2)},
        {"val_patients_per_class": -1},
        {"image_size": 8},
    ],
)
def test_invalid_settings_raise_config_error(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        generate_demo_dataset(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # nothing written before validation
