"""Tests for medtransfer.data.near_duplicates: perceptual hashes, pairs across splits."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtransfer.data.discover import Record
from medtransfer.data.near_duplicates import (
    MAX_DISTANCE,
    MIN_CORRELATION,
    ImageHashes,
    NearDuplicate,
    closest_distance,
    hamming_pairs,
    hash_images,
    near_duplicate_pairs,
    fingerprint,
)


def bits_apart(a: Path, b: Path) -> int:
    """Reference Hamming distance, bit by bit in Python."""
    x = int.from_bytes(fingerprint(a)[0].tobytes(), "big")
    y = int.from_bytes(fingerprint(b)[0].tobytes(), "big")
    return bin(x ^ y).count("1")


# --------------------------------------------------------------------------- what the hash catches


COPIES = {  # (new suffix, resize to, save options)
    "resized 224 -> 180 px": (".png", 180, {}),
    "re-encoded JPEG quality 60": (".jpeg", None, {"quality": 60}),
    "resized and re-encoded": (".JPG", 180, {"quality": 60}),
}


@pytest.mark.parametrize(("suffix", "resize", "options"), COPIES.values(), ids=COPIES.keys())
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resized_and_re_encoded_copies_are_near_duplicates(tmp_path, make_textured, suffix, resize, options, seed):
    original = make_textured(tmp_path / "original.png", seed)
    copy = make_textured(tmp_path / f"copy{suffix}", seed, resize=resize, **options)
    assert original.read_bytes() != copy.read_bytes()  # a byte comparison misses it
    assert bits_apart(original, copy) <= MAX_DISTANCE


def test_rgb_copy_of_a_grayscale_image_is_a_near_duplicate(tmp_path, make_textured):
    original = make_textured(tmp_path / "original.png", 5)
    with Image.open(original) as im:
        im.convert("RGB").save(tmp_path / "rgb.png")
    assert bits_apart(original, tmp_path / "rgb.png") <= MAX_DISTANCE


def test_distinct_images_are_not_near_duplicates(tmp_path, make_textured):
    paths = [make_textured(tmp_path / f"{seed}.png", seed) for seed in range(12)]
    hashes = hash_images(paths)
    for i, a in enumerate(paths):
        for b in paths[i + 1 :]:
            assert bits_apart(a, b) > MAX_DISTANCE
    assert list(hamming_pairs(hashes.bits, hashes.bits, max_distance=MAX_DISTANCE, same=True)) == []


def test_hamming_pairs_match_a_bit_by_bit_reference():
    rng = random.Random(3)
    rows = np.array([[rng.getrandbits(8) for _ in range(32)] for _ in range(40)], dtype=np.uint8)
    rows[7] = rows[3]
    rows[9] = rows[3] ^ np.array([1] + [0] * 31, dtype=np.uint8)  # one bit off
    reference = {
        (i, j, bin(int.from_bytes(rows[i].tobytes(), "big") ^ int.from_bytes(rows[j].tobytes(), "big")).count("1"))
        for i in range(40)
        for j in range(i + 1, 40)
    }
    for limit in (1, 120, 256):
        expected = {t for t in reference if t[2] <= limit}
        assert set(hamming_pairs(rows, rows, max_distance=limit, same=True)) == expected
    assert {(3, 7, 0), (3, 9, 1), (7, 9, 1)} <= set(hamming_pairs(rows, rows, max_distance=1, same=True))


# --------------------------------------------------------------------------- pairs across splits


@pytest.fixture
def split_images(tmp_path, make_textured):
    """train: images 0-3 and a resized copy of image 2; test: image 10 and a resized, re-encoded copy of image 1."""
    train = [make_textured(tmp_path / "train" / f"img {seed}.png", seed) for seed in range(4)]
    train.append(make_textured(tmp_path / "train" / "copy of 2.png", 2, resize=180))
    test = [
        make_textured(tmp_path / "test" / "img 10.png", 10),
        make_textured(tmp_path / "test" / "copy of 1.JPEG", 1, resize=180, quality=60),
    ]
    records = [Record(p, "A", p.stem, "train") for p in train] + [Record(p, "A", p.stem, "test") for p in test]
    return records, train, test


def test_near_duplicate_pairs_only_across_splits(split_images):
    records, train, test = split_images
    (pair,) = near_duplicate_pairs(records)
    assert isinstance(pair, NearDuplicate)
    assert (pair.path_a, pair.split_a, pair.path_b, pair.split_b) == (test[1], "test", train[1], "train")
    assert pair.distance == bits_apart(test[1], train[1]) <= MAX_DISTANCE


def test_near_duplicate_pairs_within_splits_when_asked(split_images):
    records, train, test = split_images
    pairs = near_duplicate_pairs(records, across_splits=False)
    assert {frozenset((p.path_a, p.path_b)) for p in pairs} == {
        frozenset((train[2], train[4])),
        frozenset((train[1], test[1])),
    }
    assert [p.distance for p in pairs] == sorted(p.distance for p in pairs)  # closest first


def test_unreadable_files_are_set_aside_not_fatal(split_images, tmp_path):
    records, _, _ = split_images
    broken = tmp_path / "train" / "broken.png"
    broken.write_bytes(b"not an image")
    records = records + [Record(broken, "A", "broken", "train"), Record(tmp_path / "gone.png", "A", "gone", "test")]
    hashes = hash_images([r.path for r in records])
    assert sorted(hashes.unreadable) == sorted([broken, tmp_path / "gone.png"])
    assert len(near_duplicate_pairs(records, hashes)) == 1


def test_closest_distance_between_two_sets(split_images):
    records, train, test = split_images
    hashes = hash_images([r.path for r in records])
    assert closest_distance(train, [test[1]], hashes) == bits_apart(train[1], test[1])
    assert closest_distance([train[0]], [test[0]], hashes) > MAX_DISTANCE
    assert closest_distance([Path("/nowhere.png")], test, hashes) is None


def test_thumbnail_correlation_matches_numpy_and_confirms_hash_matches(tmp_path):
    rng = np.random.default_rng(0)
    thumbs = rng.integers(0, 256, (3, 1024), dtype=np.uint8)
    thumbs[1] = np.clip(thumbs[0].astype(int) // 2 + 40, 0, 255)  # a darker copy: correlation 1
    bits = np.zeros((3, 32), np.uint8)  # identical hashes: only the pixels tell them apart
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    hashes = ImageHashes(paths, bits, thumbs, [])
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        expected = np.corrcoef(thumbs[a].astype(float), thumbs[b].astype(float))[0, 1]
        assert hashes.correlation(a, b) == pytest.approx(expected, abs=1e-12)
    records = [Record(paths[0], "A", "a", "train"), Record(paths[1], "A", "b", "test"), Record(paths[2], "A", "c", "val")]
    pairs = near_duplicate_pairs(records, hashes)
    assert [(p.path_a, p.path_b, p.distance) for p in pairs] == [(paths[1], paths[0], 0)]
    assert pairs[0].correlation == pytest.approx(1.0, abs=1e-3) and MIN_CORRELATION < 1
