"""Crash-safe files: atomic writes and the one-writer lock of a folder.

A process killed at any moment (SIGKILL, power loss) leaves each file either as it was or
whole and new, never a part: every writer here writes a temporary file in the same folder,
flushes it to disk, renames it over the target with one ``os.replace`` and makes the rename
durable. :func:`atomic_path` serves libraries that write to a path themselves
(``savefig``, ``safetensors.save_file``, ``torch.save``): the temporary name keeps the
target's suffix, so a format guessed from it stays right.

:class:`FolderLock` lets one process at a time write a folder (a run folder): a second
writer fails at once with one line naming the folder and the holder's PID. The lock is an
OS lock (``filelock``), released by the kernel when its holder dies, so a killed run never
leaves a stale lock behind.

Imports nothing from medtransfer but ``errors``, so every layer may use it.
"""

from __future__ import annotations

import csv
import io
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout

from medtransfer.errors import ConfigError

__all__ = [
    "FolderLock", "atomic_path", "write_bytes_atomic", "write_csv_atomic", "write_text_atomic", "write_yaml_atomic",
]


def _fsync_folder(folder: Path) -> None:
    if os.name == "posix":  # make the rename itself durable
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends without error, the file
    written there replaces ``path`` atomically (removed again on error).

    >>> with atomic_path(run / "model" / "weights.safetensors") as tmp:  # doctest: +SKIP
    ...     save_file(state, str(tmp))
    """
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` so that readers see the old file or the whole new one, never a part.
    (The file is opened with mode "x" rather than by ``mkstemp``, whose 0600 permissions would stick.)"""
    path = Path(path)
    with atomic_path(path) as temporary, open(temporary, "xb") as handle:
        handle.write(data)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`write_bytes_atomic` of UTF-8 text; file names that are not UTF-8 survive (surrogateescape)."""
    return write_bytes_atomic(path, text.encode("utf-8", errors="surrogateescape"))


def write_csv_atomic(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """A CSV (header, then rows) written atomically."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


def write_yaml_atomic(path: str | Path, data: Any) -> Path:
    """``data`` as YAML (keys in their given order), written atomically."""
    return write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


class FolderLock:
    """One writer per folder: ``with FolderLock(run, what="--out"):`` holds ``run/.lock``.

    A second holder fails at once (ConfigError, one line naming the folder and the PID of
    the process that holds it). The PID is written into ``.lock.pid`` for that message;
    the lock itself is the OS lock on ``.lock``, which dies with its process.
    """

    def __init__(self, folder: str | Path, *, what: str = "--out"):
        self.folder = Path(folder)
        self.what = what
        self._lock = FileLock(str(self.folder / ".lock"), timeout=0)

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            holder = self.holder()
            by = f" by process {holder}" if holder else " by another process"
            raise ConfigError(
                f"{self.what} {self.folder}: the run is in use{by} (still training?); wait for it to finish, "
                f"stop it, or choose another folder"
            ) from None
        write_text_atomic(self.folder / ".lock.pid", f"{os.getpid()}\n")
        return self

    def release(self) -> None:
        (self.folder / ".lock.pid").unlink(missing_ok=True)
        self._lock.release()

    def holder(self) -> int | None:
        """PID of the process holding the lock, when it wrote one."""
        try:
            return int((self.folder / ".lock.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
