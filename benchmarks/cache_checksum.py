"""Cost of the image cache's per-entry checksum (medtransfer.data.cache) on reads.

    python benchmarks/cache_checksum.py [--images 512] [--size 256] [--rounds 7] [--color]

Builds an image cache of ``--images`` generated PNGs (decoded to ``--size`` px, not timed),
then reads every image of the view, in order, with the read-time check (A: ``verify=True``,
blake2b of each image's pixel bytes compared with the index) and without it (B:
``verify=False``), interleaved A B A B for ``--rounds`` rounds after one warm-up pass of each
(the data file is in the page cache). Also times the check a build makes of every entry it
hands out (``EntryChecker``), and, for the choice of checksum, blake2b over the same bytes.

Prints ONE JSON line: ``verified_img_s`` and ``unverified_img_s`` (medians over rounds),
``ratio`` = verified / unverified, ``check_us_per_image`` (the difference per image),
``build_check_mb_s`` (the build's pass), ``crc32_us_per_image`` and ``blake2b_us_per_image``
(the checksum alone over one image, median of 200), images, size, bytes per image, rounds, cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from medtransfer.data.cache import CacheSettings, ImageCache
from medtransfer.data.cache_index import EntryChecker, open_index, pixel_checksum, read_index


def _sources(folder: Path, n: int, size: int, color: bool) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    side = size + size // 4
    for i in range(n):
        coarse = rng.integers(0, 256, (16, 16, 3) if color else (16, 16), dtype=np.uint8)
        path = folder / f"img{i:05d}.png"
        Image.fromarray(coarse).resize((side, side), Image.BICUBIC).save(path)
        paths.append(path)
    return paths


def _pass(view) -> float:
    started = time.perf_counter()
    for i in range(len(view)):
        view[i]
    return len(view) / (time.perf_counter() - started)


def _us(function, pixels: np.ndarray, calls: int = 200) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        function(pixels)
        times.append(time.perf_counter() - started)
    return round(1e6 * statistics.median(times), 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--color", action="store_true", help="RGB sources (3 bytes per pixel)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "src").mkdir()
        print(f"writing {args.images} images ...", file=sys.stderr)
        paths = _sources(root / "src", args.images, args.size, args.color)
        cache = ImageCache(root / "cache", CacheSettings(size=args.size))
        view = cache.build(paths, workers=min(2, os.cpu_count() or 1))
        rates: dict[bool, list[float]] = {True: [], False: []}
        for verify in (True, False):  # warm-up
            view.verify = verify
            _pass(view)
        for _ in range(args.rounds):
            for verify in (True, False):
                view.verify = verify
                rates[verify].append(_pass(view))
        with open_index(cache.location / "index.sqlite") as conn:
            entries, _ = read_index(conn)
        total = sum(h * w * c for _, (h, w, c), _ in entries.values())
        started = time.perf_counter()
        checked = EntryChecker(view.data_file, entries)
        assert all(checked(digest) for digest in list(entries))
        build_check_s = time.perf_counter() - started
        one = view[0]
        crc_us = _us(pixel_checksum, one)
        blake_us = _us(lambda a: hashlib.blake2b(a.data, digest_size=16).digest(), one)
    verified, unverified = statistics.median(rates[True]), statistics.median(rates[False])
    result = {
        "verified_img_s": round(verified, 1),
        "unverified_img_s": round(unverified, 1),
        "ratio": round(verified / unverified, 3),
        "check_us_per_image": round(1e6 * (1 / verified - 1 / unverified), 1),
        "build_check_mb_s": round(total / build_check_s / 1e6, 1),
        "crc32_us_per_image": crc_us,
        "blake2b_us_per_image": blake_us,
        "images": args.images,
        "size": args.size,
        "bytes_per_image": total // max(len(entries), 1),
        "rounds": args.rounds,
        "cores": os.cpu_count(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
