"""Near-duplicate images found by content: a perceptual hash, confirmed by pixels, across splits.

File bytes only catch exact copies; a copy that was resized or re-encoded, as datasets
assembled from several sources often hold, has other bytes. A DCT perceptual hash
(`imagehash.phash`, after Zauner 2010) of the decoded image survives both. Measured on
Kermany chest X-rays (224 px JPEGs): with the 256-bit hash (hash_size 16) copies resized to
180 px, re-encoded at JPEG quality 60, or both, lie 0-12 bits from their original (quality
30 or 112 px: 14), while no two distinct images among the 5,546 of train, val and a test
half lie closer than 40 bits; within 24 bits the 5,216 train images give 28 pairs, all
byte-identical. The 64-bit hash separates them worse: at the 2 bits its copies need it pairs
12 distinct train images. Smooth images (the demo's synthetic phantoms) give the hash little
to hold on to: different patients there lie 22 bits apart, so a hash match is confirmed by
the correlation of 32 x 32 thumbnails (copies >= 0.9989, those phantoms <= 0.989).
Crops of 5% and rotations of 3 degrees are not caught (40+ bits).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medtransfer.data.decode import decode_image
from medtransfer.data.discover import Record
from medtransfer.errors import DataError

HASH_SIZE = 16  # a 16 x 16 = 256-bit hash
MAX_DISTANCE = 24  # bits; copies measured at <= 14, distinct radiographs at >= 40
# Pixel correlation of 32 x 32 thumbnails that confirms a hash match. Copies (also JPEG
# quality 30, 112 px, +15% brightness) measured >= 0.9989; the demo's synthetic phantoms of
# different patients, smooth images whose hashes can lie 22 bits apart, <= 0.989.
MIN_CORRELATION = 0.995
HASH_METHOD = f"{HASH_SIZE * HASH_SIZE}-bit perceptual hash"
THUMB_SIZE = 32
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint8)
_CHUNK = 64  # rows compared at once: CHUNK x N x 32 bytes (and twice that in counts) stay small


@dataclass(frozen=True)
class NearDuplicate:
    """Two images (in different splits, for leakage) whose hashes differ in `distance` bits and
    whose thumbnails correlate at `correlation`."""

    path_a: Path
    path_b: Path
    distance: int
    split_a: str | None = None
    split_b: str | None = None
    correlation: float | None = None


@dataclass
class ImageHashes:
    """Perceptual hashes and thumbnails of image files, computed once and shared by the split
    and the leakage check."""

    paths: list[Path]
    bits: np.ndarray  # (n, HASH_SIZE**2 / 8) uint8, packed
    thumbs: np.ndarray  # (n, THUMB_SIZE**2) uint8
    unreadable: list[Path]

    def __post_init__(self) -> None:
        self.row = {path: i for i, path in enumerate(self.paths)}

    def rows(self, paths: Sequence[Path]) -> tuple[list[int], list[int]]:
        """(positions in `paths` that were hashed, their rows in `bits`)."""
        kept = [i for i, p in enumerate(paths) if p in self.row]
        return kept, [self.row[paths[i]] for i in kept]

    def correlation(self, row_a: int, row_b: int) -> float:
        """Pearson correlation of two thumbnails (1.0 for two flat images)."""
        a, b = (self.thumbs[r].astype(np.float64) for r in (row_a, row_b))
        a, b = a - a.mean(), b - b.mean()
        scale = float(np.sqrt((a * a).sum() * (b * b).sum()))
        return float((a * b).sum() / scale) if scale > 0 else float(not a.any() and not b.any())


def fingerprint(source: str | Path | bytes) -> tuple[np.ndarray, np.ndarray]:
    """(packed 256-bit pHash, flattened 32 x 32 thumbnail) of one image, decoded as the cache
    decodes it (DICOM included)."""
    import imagehash
    from PIL import Image

    pixels = decode_image(source, size=HASH_SIZE * 4, keep_color=False)  # pHash's own working size
    bits = np.packbits(imagehash.phash(Image.fromarray(pixels), hash_size=HASH_SIZE).hash.reshape(-1))
    factor = pixels.shape[0] // THUMB_SIZE
    thumb = pixels.reshape(THUMB_SIZE, factor, THUMB_SIZE, factor).mean(axis=(1, 3))
    return bits, np.rint(thumb).astype(np.uint8).reshape(-1)


def _fingerprint_or_none(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        return fingerprint(path)
    except DataError:
        return None  # unreadable images are listed by the cache; here they are only counted


def hash_images(paths: Sequence[Path], *, workers: int | None = None) -> ImageHashes:
    """Hashes of every distinct path; files that cannot be decoded are set aside in `unreadable`.

    Threads suffice: decoding and the DCT run in C with the GIL released.
    """
    unique = list(dict.fromkeys(Path(p) for p in paths))
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_fingerprint_or_none, unique, chunksize=64))
    kept = [(p, r) for p, r in zip(unique, results) if r is not None]
    return ImageHashes(
        [p for p, _ in kept],
        np.stack([r[0] for _, r in kept]) if kept else np.zeros((0, HASH_SIZE**2 // 8), np.uint8),
        np.stack([r[1] for _, r in kept]) if kept else np.zeros((0, THUMB_SIZE**2), np.uint8),
        [p for p, r in zip(unique, results) if r is None],
    )


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
    """Hash matches between two groups, kept where the thumbnails confirm them."""
    kept_a, rows_a = hashes.rows([r.path for r in group_a])
    kept_b, rows_b = hashes.rows([r.path for r in group_b])
    pairs = []
    for i, j, distance in hamming_pairs(hashes.bits[rows_a], hashes.bits[rows_b], max_distance=max_distance, same=same):
        correlation = hashes.correlation(rows_a[i], rows_b[j])
        if correlation < MIN_CORRELATION:
            continue
        a, b = sorted((group_a[kept_a[i]], group_b[kept_b[j]]), key=lambda r: (r.split or "", str(r.path)))
        if a.path != b.path:
            pairs.append(NearDuplicate(a.path, b.path, distance, a.split, b.split, round(correlation, 4)))
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
