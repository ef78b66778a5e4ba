"""Reading, hashing and decoding the files that fill the image cache, in worker processes.

Kept apart from the store (cache.py): this is the part that runs in worker processes, so it
holds only picklable, module-level functions and the per-worker state they need.

Workers run in a :class:`concurrent.futures.ProcessPoolExecutor`. A worker killed by the
kernel (out of memory on a huge image) breaks that pool (``BrokenProcessPool``) where
``multiprocessing.Pool.imap`` would wait forever. Each worker notes in a shared slot which
task it is decoding and clears it when done, and also when the pool terminates it
(SIGTERM, after another worker died): once the pool has shut down, a slot still set names
the image the dead worker was decoding, in a one-line :class:`DataError`.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Container, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.data.decode import decode_bytes
from medtransfer.data.limits import MAX_PIXELS_ENV
from medtransfer.errors import DataError

__all__ = ["LoadResult", "file_loader", "load_file"]

LoadResult = tuple[str, np.ndarray | str | None]

_QUEUED_PER_WORKER = 4  # tasks in flight per worker: results wait in order, memory stays bounded
_LISTED = 5


def load_file(path: str, decode_options: dict[str, Any], known: Container[str]) -> LoadResult:
    """Read and hash one file; decode it unless its content is in ``known``.

    Returns ``(hash, pixels)``, ``(hash, None)`` when already cached, or
    ``(hash, reason)`` when the file is bad (``("", reason)`` when it cannot be read).
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


_worker_state: tuple[dict[str, Any], frozenset[str], Any, int] | None = None


def _init_worker(decode_options: dict[str, Any], known: frozenset[str], slots: Any, claimed: Any) -> None:
    global _worker_state
    with claimed.get_lock():
        slot = claimed.value
        claimed.value += 1
    slots[slot] = -1
    _worker_state = (decode_options, known, slots, slot)
    signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum: int, frame: object) -> None:
    """Terminated by the pool (another worker died): this worker's image is not the culprit."""
    if _worker_state is not None:
        _worker_state[2][_worker_state[3]] = -1
    os._exit(128 + signum)


def _load_in_worker(index: int, path: str) -> LoadResult:
    assert _worker_state is not None, "_init_worker was not called"
    options, known, slots, slot = _worker_state
    slots[slot] = index
    try:
        return load_file(path, options, known)
    finally:
        slots[slot] = -1


@contextmanager
def file_loader(
    decode_options: dict[str, Any], known: set[str], workers: int, n_tasks: int
) -> Iterator[Callable[[list[str]], Iterator[LoadResult]]]:
    """Yield ``load(paths)``: an iterator of :func:`load_file` results in input order.

    ``load`` raises :class:`DataError` naming the image when a worker process dies while
    decoding it (killed by the kernel, e.g. out of memory), instead of waiting forever.
    """
    if workers == 1 or n_tasks < 2:
        yield lambda paths: (load_file(p, decode_options, known) for p in paths)
        return
    n = min(workers, n_tasks)
    ctx = multiprocessing.get_context()
    slots, claimed = ctx.Array("q", [-1] * n, lock=False), ctx.Value("i", 0)  # -1: not decoding
    executor = ProcessPoolExecutor(
        n, mp_context=ctx, initializer=_init_worker, initargs=(decode_options, frozenset(known), slots, claimed)
    )
    try:
        yield lambda paths: _in_order(executor, paths, n * _QUEUED_PER_WORKER, slots)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _in_order(executor: ProcessPoolExecutor, paths: list[str], window: int, slots: Any) -> Iterator[LoadResult]:
    """Results of ``paths`` in order, at most ``window`` tasks queued at a time."""
    tasks = iter(enumerate(paths))
    queued: deque[tuple[str, Future]] = deque()
    try:
        while True:
            for i, path in itertools.islice(tasks, window - len(queued)):
                queued.append((path, executor.submit(_load_in_worker, i, path)))
            if not queued:
                return
            result = queued[0][1].result()
            queued.popleft()
            yield result
    except BrokenProcessPool:
        executor.shutdown(wait=True, cancel_futures=True)  # every worker has exited; the slots are final
        raise DataError(_died_message([paths[i] for i in slots if i >= 0], [p for p, _ in queued])) from None


def _died_message(culprits: list[str], in_flight: list[str]) -> str:
    """One line: the image whose decoding killed a worker (or the images in flight when that is unknown)."""
    fix = (f"set {MAX_PIXELS_ENV} lower so that such an image is refused before it is decoded, "
           "use fewer decoding workers, or leave the file out")
    cause = "killed by the system, most likely out of memory"
    if len(culprits) == 1:
        return f"{culprits[0]}: the worker process decoding this image died ({cause}); {fix}"
    names = culprits or in_flight
    listed = ", ".join(names[:_LISTED]) + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")
    which = "these images" if culprits else "one of these images"
    return f"a worker process died ({cause}) while decoding {which}: {listed}; {fix}"
