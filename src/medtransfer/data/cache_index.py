"""The image cache's index (``index.sqlite``): its schema, its integrity, and a checksum per entry.

Kept apart from the store (cache.py), which decides what to decode and hands out views.

- ``entries(hash -> offset, height, width, channels, checksum)``: where each decoded image
  lies in ``data.bin``, and the CRC-32 of its pixel bytes (:func:`pixel_checksum`),
  checked whenever the pixels are read back. An index written before checksums existed
  gains the column; its entries get their checksum the next time a build reads them.
- ``file_stats(path -> size, mtime, ctime, inode, hash)``: so that unchanged files are not
  re-hashed.

A corrupt index (not a database, a truncated file, a page that fails SQLite's
``quick_check``) raises :class:`IndexCorruptError`; the store starts the bucket afresh.
"""

from __future__ import annotations

import os
import sqlite3
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = [
    "Entry", "EntryChecker", "IndexCorruptError", "append_entries", "discard", "open_index", "pixel_checksum",
    "read_index", "record_checksums", "repair",
]

Entry = tuple[int, tuple[int, int, int], bytes | None]
"""offset in data.bin, (height, width, channels), checksum of the pixel bytes (None: not yet recorded)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (hash TEXT PRIMARY KEY, offset INTEGER NOT NULL,
    height INTEGER NOT NULL, width INTEGER NOT NULL, channels INTEGER NOT NULL, checksum BLOB);
CREATE TABLE IF NOT EXISTS file_stats (path BLOB PRIMARY KEY, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, hash TEXT NOT NULL);
"""
# file_stats: keyed by the path's bytes (a name that is not UTF-8 is a valid key); a file rewritten
# in place with size and mtime restored gets a new ctime, a replaced one a new inode: it is re-hashed.


class IndexCorruptError(Exception):
    """``index.sqlite`` is not a readable SQLite database; ``args[0]`` says what SQLite found."""


def pixel_checksum(pixels: np.ndarray | memoryview | bytes) -> bytes:
    """CRC-32 of an entry's pixel bytes (C order, as stored in data.bin), 4 bytes big-endian.

    CRC-32 rather than a cryptographic hash: it guards against corruption (bad sectors, torn or
    stray writes: every burst of up to 32 bits is caught, anything else but 1 in 2**32), not
    against an attacker, who could rewrite the index as easily as the data. It runs at about
    2 GB/s where blake2b runs at 0.4 GB/s, and it is paid on every read
    (benchmarks/cache_checksum.py).
    """
    if isinstance(pixels, np.ndarray):
        pixels = np.ascontiguousarray(pixels).data
    return zlib.crc32(pixels).to_bytes(4, "big")


@contextmanager
def open_index(index_file: Path, *, check: bool = True) -> Iterator[sqlite3.Connection]:
    """A connection to the index, schema created or brought up to date.

    Raises:
        IndexCorruptError: SQLite cannot read the file, or (``check``) its ``quick_check`` fails.
    """
    conn = sqlite3.connect(index_file, timeout=60)
    try:
        try:
            conn.execute("PRAGMA synchronous=FULL")
            if check:
                problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
                if problems != ["ok"]:
                    raise IndexCorruptError("; ".join(str(p) for p in problems[:3]))
            conn.executescript(_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(entries)")}
            if "checksum" not in columns:  # an index from before checksums
                conn.execute("ALTER TABLE entries ADD COLUMN checksum BLOB")
                conn.commit()
        except sqlite3.DatabaseError as exc:
            raise IndexCorruptError(" ".join(str(exc).split()) or type(exc).__name__) from exc
        yield conn
    finally:
        conn.close()


def discard(index_file: Path, data_file: Path) -> None:
    """Start a bucket afresh: remove the index (and SQLite's side files) and replace the data file by an
    empty one. The data file is replaced, not truncated, so that views other processes still map keep
    their (old) pixels."""
    for path in (index_file, *(index_file.with_name(index_file.name + s) for s in ("-journal", "-wal", "-shm"))):
        path.unlink(missing_ok=True)
    fresh = data_file.with_name(f".{data_file.name}.{os.getpid()}")
    fresh.write_bytes(b"")
    os.replace(fresh, data_file)


def read_index(conn: sqlite3.Connection) -> tuple[dict[str, Entry], dict[bytes, tuple]]:
    """``(entries, memo)``: hash -> :data:`Entry`, and path bytes -> (size, mtime, ctime, inode, hash)."""
    rows = conn.execute("SELECT hash, offset, height, width, channels, checksum FROM entries")
    entries = {digest: (offset, (h, w, c), None if s is None else bytes(s)) for digest, offset, h, w, c, s in rows}
    rows = conn.execute("SELECT path, size, mtime_ns, ctime_ns, inode, hash FROM file_stats")
    memo = {bytes(path): tuple(stat) for path, *stat in rows}
    return entries, memo


def repair(conn: sqlite3.Connection, data_file: Path) -> int:
    """Drop index rows past the data file's end, cut unreferenced trailing bytes.

    Returns the end of the committed data, where the next entry goes.
    """
    size = data_file.stat().st_size
    conn.execute("DELETE FROM entries WHERE offset + height * width * channels > ?", (size,))
    conn.commit()
    (end,) = conn.execute("SELECT COALESCE(MAX(offset + height * width * channels), 0) FROM entries").fetchone()
    if end < size:
        os.truncate(data_file, end)
    return end


def append_entries(
    conn: sqlite3.Connection,
    data_file: Path,
    pending: dict[str, np.ndarray],
    end: int,
    entries: dict[str, Entry],
    memo_updates: list[tuple],
) -> int:
    """Write pixels durably, then commit the index rows (with their checksums) that point at them."""
    rows = []
    if pending:
        with open(data_file, "r+b") as fh:
            fh.seek(end)
            for digest, arr in pending.items():
                h, w = arr.shape[:2]
                c = arr.shape[2] if arr.ndim == 3 else 1
                data = np.ascontiguousarray(arr).data
                fh.write(data)
                rows.append((digest, end, h, w, c, pixel_checksum(data)))
                end += arr.nbytes
            fh.flush()
            os.fsync(fh.fileno())
    conn.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?)", rows)
    conn.executemany("INSERT OR REPLACE INTO file_stats VALUES (?, ?, ?, ?, ?, ?)", memo_updates)
    conn.commit()
    for digest, offset, h, w, c, checksum in rows:
        entries[digest] = (offset, (h, w, c), checksum)
    return end


def record_checksums(conn: sqlite3.Connection, checksums: dict[str, bytes]) -> None:
    """Store checksums of entries that had none (indexes from before checksums: trust on first use)."""
    if checksums:
        conn.executemany("UPDATE entries SET checksum = ? WHERE hash = ?", [(s, d) for d, s in checksums.items()])
        conn.commit()


class EntryChecker:
    """``checked(digest)``: whether an entry's pixels in the data file still match their checksum.

    Each entry is read once; a bad one is removed from ``entries`` (so that it is decoded
    again) and counted in ``failed``; one without a checksum (an index from before checksums)
    is trusted and its checksum kept in ``recorded``, for the index.
    """

    def __init__(self, data_file: Path, entries: dict[str, Entry]) -> None:
        size = data_file.stat().st_size
        self._mm = np.memmap(data_file, dtype=np.uint8, mode="r") if size else None
        self._entries = entries
        self._seen: set[str] = set()
        self.failed = 0
        self.recorded: dict[str, bytes] = {}

    def __call__(self, digest: str) -> bool:
        if digest in self._seen or digest not in self._entries:
            return digest in self._entries
        self._seen.add(digest)
        offset, (h, w, c), expected = self._entries[digest]
        if self._mm is None or offset + h * w * c > len(self._mm):
            return True  # written by this build, after the map was opened
        actual = pixel_checksum(self._mm[offset : offset + h * w * c])
        if expected is None:
            self.recorded[digest] = actual
            self._entries[digest] = (offset, (h, w, c), actual)
        elif actual != expected:
            del self._entries[digest]
            self.failed += 1
            return False
        return True
