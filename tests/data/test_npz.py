"""Tests for medtransfer.data.npz: MedMNIST .npz files as a data source (through discover)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtransfer.data.discover import discover
from medtransfer.data.split import resplit
from medtransfer.errors import ConfigError, DataError


def write_npz(path: Path, *, sizes=None, shape=(28, 28), classes: int = 2, seed: int = 0, **extra) -> Path:
    """An .npz laid out as the medmnist package writes it: {split}_images uint8, {split}_labels (N, 1)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (sizes or {"train": 12, "val": 4, "test": 6}).items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % classes).reshape(n, 1).astype(np.uint8)
    arrays.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


@pytest.mark.parametrize("shape", [(28, 28), (32, 32, 3)], ids=["grayscale", "rgb"])
def test_npz_records_keep_splits_labels_and_pixels(tmp_path, shape):
    source = write_npz(tmp_path / "pneumoniamnist.npz", shape=shape)
    records = discover(source, extract_dir=tmp_path / "cache")

    assert Counter((r.split, r.label) for r in records) == {
        ("train", "0"): 6, ("train", "1"): 6, ("val", "0"): 2, ("val", "1"): 2, ("test", "0"): 3, ("test", "1"): 3
    }
    with np.load(source) as arrays:
        for split in ("train", "val", "test"):
            mine = [r for r in records if r.split == split]
            for i, r in enumerate(mine):
                assert r.label == str(int(arrays[f"{split}_labels"][i, 0]))
                with Image.open(r.path) as im:
                    np.testing.assert_array_equal(np.asarray(im), arrays[f"{split}_images"][i])
    assert len({r.patient_id for r in records}) == len(records)  # MedMNIST has no patients: one per image
    assert all(Path(r.path).is_relative_to(tmp_path / "cache") for r in records)


def test_npz_class_names_name_the_indices(tmp_path):
    source = write_npz(tmp_path / "x.npz", classes=3)
    records = discover(source, extract_dir=tmp_path / "cache", class_names=["NORMAL", "BACTERIA", "VIRUS"])
    assert {r.label for r in records} == {"NORMAL", "BACTERIA", "VIRUS"}
    merged = discover(
        source, extract_dir=tmp_path / "cache", class_names=["NORMAL", "BACTERIA", "VIRUS"],
        class_map={"BACTERIA": "PNEUMONIA", "VIRUS": "PNEUMONIA"},
    )
    assert Counter(r.label for r in merged) == {"NORMAL": 8, "PNEUMONIA": 14}


def test_npz_images_are_written_once_and_follow_the_content(tmp_path):
    source = write_npz(tmp_path / "x.npz")
    first = discover(source, extract_dir=tmp_path / "cache")
    stamp = first[0].path.stat().st_mtime_ns
    again = discover(source, extract_dir=tmp_path / "cache")
    assert [r.path for r in again] == [r.path for r in first] and again[0].path.stat().st_mtime_ns == stamp
    write_npz(source, seed=1)  # new content: a new folder
    changed = discover(source, extract_dir=tmp_path / "cache")
    assert changed[0].path.parent.parent != first[0].path.parent.parent
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        {first[0].path.parent.parent.name, changed[0].path.parent.parent.name}
    )


def test_npz_with_only_a_test_split_and_a_resplit(tmp_path):
    only_test = discover(write_npz(tmp_path / "t.npz", sizes={"test": 6}), extract_dir=tmp_path / "c")
    assert {r.split for r in only_test} == {"test"}
    train_only = discover(write_npz(tmp_path / "tr.npz", sizes={"train": 40}), extract_dir=tmp_path / "c")
    assert {r.split for r in resplit(train_only, seed=0)} == {"train", "val", "test"}


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"train_images": np.zeros((2, 4, 4), np.uint8)}, "train_images and train_labels must come together"),
        ({"images": np.zeros((2, 4, 4), np.uint8)}, "no MedMNIST arrays (train_images, train_labels"),
        ({"train_images": np.zeros((2, 4, 4), np.float32), "train_labels": np.zeros((2, 1), np.uint8)},
         "train_images has dtype float32"),
        ({"train_images": np.zeros((2, 4, 4, 4), np.uint8), "train_labels": np.zeros((2, 1), np.uint8)},
         "3D volumes are not supported"),
        ({"train_images": np.zeros((2, 4, 4), np.uint8), "train_labels": np.full((2, 14), 2, np.uint8)},
         "multi-label labels must be (2, findings) of 0 / 1"),
        ({"train_images": np.zeros((2, 4, 4), np.uint8), "train_labels": np.zeros((3, 1), np.uint8)},
         "expected (2, 1) for 2 images"),
        ({"train_images": np.zeros((2, 4, 4), np.uint8), "train_labels": np.full((2, 1), -1)},
         "must be class indices 0, 1, ..."),
    ],
)
def test_npz_with_wrong_arrays_says_what_is_wrong(tmp_path, arrays, message):
    source = tmp_path / "bad.npz"
    np.savez(source, **arrays)
    with pytest.raises(DataError) as info:
        discover(source, extract_dir=tmp_path / "cache")
    assert message in str(info.value) and str(source) in str(info.value)


def test_npz_that_is_not_an_npz(tmp_path):
    (tmp_path / "fake.NPZ").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz file"):
        discover(tmp_path / "fake.NPZ", extract_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"class_names": ["A"]}, DataError, "labels go up to 1 but --class-names lists 1 name(s) (A)"),
        ({"class_names": ["A", "A"]}, DataError, "names must be non-empty and distinct"),
        ({"patient_regex": r"(\d+)"}, ConfigError, "--patient-regex: an .npz file has no patient IDs"),
        ({"extract_dir": None}, ConfigError, "needs a folder to write its images to"),
    ],
)
def test_npz_option_errors(tmp_path, kwargs, error, message):
    source = write_npz(tmp_path / "x.npz")
    with pytest.raises(error) as info:
        discover(source, **{"extract_dir": tmp_path / "cache", **kwargs})
    assert message in str(info.value)


def test_class_names_with_a_folder_source_is_refused(make_kaggle_tree):
    root = make_kaggle_tree({"train": {"NORMAL": 1, "PNEUMONIA": 1}})
    with pytest.raises(ConfigError, match="to rename folder classes use --class-map"):
        discover(root, class_names=["A", "B"])


def test_multilabel_npz_gives_findings_and_the_findings_present(tmp_path):
    """ChestMNIST-style (N, 14) labels: a multi-label task over ChestX-ray14's findings, in file order."""
    from medtransfer.data.discover import discover_data
    from medtransfer.data.npz import CHESTMNIST_FINDINGS

    rng = np.random.default_rng(0)
    labels = {split: rng.integers(0, 2, (n, 14)).astype(np.uint8) for split, n in (("train", 6), ("val", 3), ("test", 3))}
    arrays = {f"{split}_images": rng.integers(0, 255, (len(y), 8, 8)).astype(np.uint8) for split, y in labels.items()}
    arrays.update({f"{split}_labels": y for split, y in labels.items()})
    np.savez(tmp_path / "chestmnist.npz", **arrays)
    found = discover_data(tmp_path / "chestmnist.npz", extract_dir=tmp_path / "x")
    assert found.task.multilabel and found.task.classes == CHESTMNIST_FINDINGS
    train = [r for r in found.records if r.split == "train"]
    assert found.task.targets([r.label for r in train]).tolist() == labels["train"].astype(float).tolist()


def test_multilabel_npz_class_names_must_match_the_columns(tmp_path):
    arrays = {"train_images": np.zeros((2, 4, 4), np.uint8), "train_labels": np.zeros((2, 3), np.uint8)}
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(DataError, match="give 3 distinct names, one per label column"):
        discover(tmp_path / "m.npz", extract_dir=tmp_path / "x", class_names=["a", "b"])


# ----------------------------------------------------------------- split by split (memory)


def png_bytes(image: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_npz_extraction_writes_exactly_the_pngs_of_its_arrays(tmp_path):
    source = write_npz(tmp_path / "x.npz", sizes={"train": 5, "val": 2, "test": 3}, shape=(9, 7, 3))
    records = discover(source, extract_dir=tmp_path / "cache")
    with np.load(source) as arrays:
        expected = [(split, i) for split in ("train", "val", "test") for i in range(len(arrays[f"{split}_labels"]))]
        assert [(r.split, int(r.path.stem.split("-")[1])) for r in records] == expected
        for r in records:
            assert r.path.name == f"{r.split}-{int(r.path.stem.split('-')[1]):05d}.png"
            assert r.path.read_bytes() == png_bytes(arrays[f"{r.split}_images"][int(r.path.stem.split("-")[1])])
    folder = records[0].path.parent.parent
    assert sorted(p.name for p in folder.iterdir()) == [".complete", "test", "train", "val"]


def test_npz_extraction_holds_one_split_of_images_at_a_time(tmp_path):
    """Three splits of 3 MiB each: the peak stays near one split, not the three (about 9 MiB)."""
    import tracemalloc

    source = tmp_path / "big.npz"
    split_images = np.tile(np.arange(256, dtype=np.uint8), (48, 256, 1))  # 48 x 256 x 256 = 3 MiB, compresses well
    np.savez_compressed(source, **{f"{s}_{kind}": a for s in ("train", "val", "test") for kind, a in (
        ("images", split_images), ("labels", (np.arange(48) % 2).reshape(48, 1).astype(np.uint8)))})
    tracemalloc.start()
    records = discover(source, extract_dir=tmp_path / "cache")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(records) == 144
    assert peak < 2 * split_images.nbytes, f"peak {peak / 2**20:.1f} MiB"  # all at once: about 10 MiB


def test_npz_with_a_corrupt_member_is_refused_and_leaves_no_folder(tmp_path):
    import zipfile

    source = write_npz(tmp_path / "x.npz", sizes={"train": 40, "test": 40}, shape=(32, 32))
    with zipfile.ZipFile(source) as archive:
        info = archive.getinfo("test_images.npy")
    data = bytearray(source.read_bytes())
    middle = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
    data[middle : middle + 16] = bytes(16)
    source.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"not a readable \.npz file \(.*\); pass a file the medmnist package wrote"):
        discover(source, extract_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # no partial extraction
