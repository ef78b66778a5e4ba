"""Reading, hashing and decoding the files that fill the image cache, in worker processes.

Kept apart from the store (cache.py): this is the part that runs in a multiprocessing pool,
so it holds only picklable, module-level functions and the per-worker state they need.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from collections.abc import Callable, Container, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.data.decode import decode_bytes
from medtransfer.errors import DataError

__all__ = ["LoadResult", "file_loader", "load_file"]

LoadResult = tuple[str, np.ndarray | str | None]


def load_file(path: str, decode_options: dict[str, Any], known: Container[str]) -> LoadResult:
    """Read and hash one file; decode it unless its content is in ``known``.

    Returns ``(hash, pixels)``, ``(hash, None)`` when already cached, or
    ``(hash, reason)`` when the file is bad.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return "", f"cannot read file ({exc.strerror or exc})"
    digest = hashlib.blake2b(data, digest_size=20).hexdigest()
    if digest in known:
        return digest, None
    try:
        return digest, decode_bytes(data, **decode_options)
    except DataError as exc:  # "not a readable image (<reason>)"
        return digest, str(exc)


_worker_state: tuple[dict[str, Any], frozenset[str]] | None = None


def _init_worker(decode_options: dict[str, Any], known: frozenset[str]) -> None:
    global _worker_state
    _worker_state = (decode_options, known)


def _load_in_worker(path: str) -> LoadResult:
    assert _worker_state is not None, "_init_worker was not called"
    return load_file(path, *_worker_state)


@contextmanager
def file_loader(
    decode_options: dict[str, Any], known: set[str], workers: int, n_tasks: int
) -> Iterator[Callable[[list[str]], Iterator[LoadResult]]]:
    """Yield ``load(paths)``: an iterator of :func:`load_file` results in input order."""
    if workers == 1 or n_tasks < 2:
        yield lambda paths: (load_file(p, decode_options, known) for p in paths)
        return
    ctx = multiprocessing.get_context()
    with ctx.Pool(min(workers, n_tasks), _init_worker, (decode_options, frozenset(known))) as pool:
        yield lambda paths: pool.imap(_load_in_worker, paths, chunksize=4)
