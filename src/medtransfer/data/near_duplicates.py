"""Near-duplicate images found by content: a perceptual hash, compared across splits.

File bytes only catch exact copies; a copy that was resized or re-encoded, as datasets
assembled from several sources often hold, has other bytes. A DCT perceptual hash
(`imagehash.phash`, after Zauner 2010) of the decoded image survives both. Measured on 20
Kermany chest X-rays (224 px JPEGs): with the 256-bit hash (hash_size 16) copies resized to
180 px, re-encoded at JPEG quality 60, or both, lie 0-12 bits from their original, while no
two distinct images among the 5,546 of train, val and a test half lie closer than 40 bits;
within 24 bits the 5,216 train images give 28 pairs, all byte-identical. The 64-bit hash
separates them worse: at the 2 bits its copies need it pairs 12 distinct train images.
Crops of 5% and rotations of 3 degrees are not caught (40+ bits), nor are very smooth
images hashed reliably (their low DCT coefficients sit near the median).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medtransfer.data.cache import decode_image
from medtransfer.data.discover import Record
from medtransfer.errors import DataError

HASH_SIZE = 16  # a 16 x 16 = 256-bit hash
MAX_DISTANCE = 24  # bits; copies measured at <= 12, distinct radiographs at >= 40
HASH_METHOD = f"{HASH_SIZE * HASH_SIZE}-bit perceptual hash"
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint8)
_CHUNK = 64  # rows compared at once: CHUNK x N x 32 bytes (and twice that in counts) stay small


@dataclass(frozen=True)
class NearDuplicate:
    """Two images (in different splits, for leakage) whose hashes differ in `distance` bits."""

    path_a: Path
    path_b: Path
    distance: int
    split_a: str | None = None
    split_b: str | None = None


@dataclass
class ImageHashes:
    """Perceptual hashes of image files, computed once and shared by the split and the leakage check."""

    paths: list[Path]
    bits: np.ndarray  # (len(paths), HASH_SIZE**2 / 8) uint8, packed
    unreadable: list[Path]

    def __post_init__(self) -> None:
        self.row = {path: i for i, path in enumerate(self.paths)}

    def rows(self, paths: Sequence[Path]) -> tuple[list[int], list[int]]:
        """(positions in `paths` that were hashed, their rows in `bits`)."""
        kept = [i for i, p in enumerate(paths) if p in self.row]
        return kept, [self.row[paths[i]] for i in kept]


def perceptual_hash(source: str | Path | bytes) -> np.ndarray:
    """The packed 256-bit pHash of one image, decoded as the cache decodes it (DICOM included)."""
    import imagehash
    from PIL import Image

    pixels = decode_image(source, size=HASH_SIZE * 4, keep_color=False)  # pHash's own working size
    return np.packbits(imagehash.phash(Image.fromarray(pixels), hash_size=HASH_SIZE).hash.reshape(-1))


def _hash_or_none(path: Path) -> np.ndarray | None:
    try:
        return perceptual_hash(path)
    except DataError:
        return None  # unreadable images are listed by the cache; here they are only counted


def hash_images(paths: Sequence[Path], *, workers: int | None = None) -> ImageHashes:
    """Hashes of every distinct path; files that cannot be decoded are set aside in `unreadable`.

    Threads suffice: decoding and the DCT run in C with the GIL released.
    """
    unique = list(dict.fromkeys(Path(p) for p in paths))
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        hashes = list(pool.map(_hash_or_none, unique, chunksize=64))
    kept = [(p, h) for p, h in zip(unique, hashes) if h is not None]
    bits = np.stack([h for _, h in kept]) if kept else np.zeros((0, HASH_SIZE * HASH_SIZE // 8), np.uint8)
    return ImageHashes([p for p, _ in kept], bits, [p for p, h in zip(unique, hashes) if h is None])


def hamming_pairs(
    a: np.ndarray, b: np.ndarray, *, max_distance: int, same: bool = False
) -> Iterator[tuple[int, int, int]]:
    """(i, j, bits) for rows of `a` and `b` at most `max_distance` bits apart (i < j when `same`)."""
    for start in range(0, len(a), _CHUNK):
        distances = _bit_distances(a[start : start + _CHUNK], b)
        for i, j in zip(*np.nonzero(distances <= max_distance)):
            if not same or start + i < j:
                yield start + int(i), int(j), int(distances[i, j])


def near_duplicate_pairs(
    records: Sequence[Record],
    hashes: ImageHashes | None = None,
    *,
    max_distance: int = MAX_DISTANCE,
    across_splits: bool = True,
) -> list[NearDuplicate]:
    """Pairs of records whose images are near-duplicates, closest first.

    With `across_splits` (the leakage check) only pairs in different splits count; without,
    every pair (to keep near-duplicates of different patients on one side of a split).
    """
    hashes = hashes if hashes is not None else hash_images([r.path for r in records])
    groups: dict[str | None, list[Record]] = {}
    for r in records:
        groups.setdefault(r.split if across_splits else None, []).append(r)
    names = sorted(groups, key=lambda s: s or "")
    pairs = []
    for n, first in enumerate(names):
        for second in names[n if not across_splits else n + 1 :]:
            pairs += _pairs_between(groups[first], groups[second], hashes, max_distance, same=first == second)
    return sorted(pairs, key=lambda p: (p.distance, str(p.path_a), str(p.path_b)))


def _pairs_between(
    group_a: list[Record], group_b: list[Record], hashes: ImageHashes, max_distance: int, *, same: bool
) -> list[NearDuplicate]:
    kept_a, rows_a = hashes.rows([r.path for r in group_a])
    kept_b, rows_b = hashes.rows([r.path for r in group_b])
    pairs = []
    for i, j, distance in hamming_pairs(hashes.bits[rows_a], hashes.bits[rows_b], max_distance=max_distance, same=same):
        a, b = sorted((group_a[kept_a[i]], group_b[kept_b[j]]), key=lambda r: (r.split or "", str(r.path)))
        if a.path != b.path:
            pairs.append(NearDuplicate(a.path, b.path, distance, a.split, b.split))
    return pairs


def closest_distance(paths_a: Sequence[Path], paths_b: Sequence[Path], hashes: ImageHashes) -> int | None:
    """The smallest distance between an image of `paths_a` and one of `paths_b` (None: nothing hashed)."""
    _, rows_a = hashes.rows(paths_a)
    _, rows_b = hashes.rows(paths_b)
    if not rows_a or not rows_b:
        return None
    return int(_bit_distances(hashes.bits[rows_a], hashes.bits[rows_b]).min())


def _bit_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) Hamming distances between packed hashes."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2: count 64 bits at a time, ~8x faster than the table
        return np.bitwise_count(a.view(np.uint64)[:, None, :] ^ b.view(np.uint64)[None, :, :]).sum(axis=-1, dtype=np.int64)
    return _POPCOUNT[a[:, None, :] ^ b[None, :, :]].sum(axis=-1, dtype=np.int64)
