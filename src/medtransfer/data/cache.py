"""Decode-once image cache.

Full-resolution chest X-rays (1-3k px JPEGs) cost more to decode than a 224 px forward
pass. This module decodes each image once, at reduced size, with
:func:`medtransfer.data.decode.decode_image` (the same function that prediction uses on
new images), and keeps the result as uint8 pixels in a memory-mapped file that train,
validation, test and later runs share.

Storage layout, one bucket per decode settings::

    cache_dir/v1-<settings hash>/
        settings.json   the settings, for humans
        data.bin        uint8 pixels of every entry, appended back to back
        index.sqlite    entries(hash -> offset, height, width, channels)
                        file_stats(path -> size, mtime, ctime, inode, hash), so unchanged
                        files are not re-hashed
        lock            held (fcntl.flock) by the process that builds

Entries are keyed by the blake2b hash of the file's bytes: a changed file is decoded
again, a moved or duplicated file is not, and a changed setting uses another bucket.

Crash safety: pixels are appended, flushed and fsync-ed *before* the index rows that
point at them are committed, so a killed build leaves at most unreferenced trailing
bytes, which the next build truncates. Index rows that point past the end of the data
file (a data file cut short) are ignored by readers and deleted by the next build.

Readers (DataLoader workers) only read ``data.bin`` through ``np.memmap``; the
:class:`CachedImages` view carries the offsets, so workers never touch the index.
Superseded entries (from files that changed) stay in ``data.bin``; delete the bucket
folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from medtransfer.data.cache_loader import file_loader
from medtransfer.data.decode import ResampleName, check_size, resample_filter
from medtransfer.errors import ConfigError, DataError

try:  # POSIX; elsewhere concurrent builds into one bucket are not guarded
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["CacheSettings", "CachedImages", "ImageCache"]

FORMAT_VERSION = 2  # 2: transparency composited, palette and 16-bit RGB DICOM decoded as colour
"""Bump when the on-disk layout or the output of :func:`~medtransfer.data.decode.decode_image` changes."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (hash TEXT PRIMARY KEY, offset INTEGER NOT NULL,
    height INTEGER NOT NULL, width INTEGER NOT NULL, channels INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS file_stats (path BLOB PRIMARY KEY, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, hash TEXT NOT NULL);
"""
# file_stats: keyed by the path's bytes (a name that is not UTF-8 is a valid key); a file rewritten
# in place with size and mtime restored gets a new ctime, a replaced one a new inode: it is re-hashed.
_FLUSH_EVERY = 256  # entries per fsync + index commit; a crash loses at most this many
_MAX_LISTED_BAD = 10
_SKIP_HINT = "use --skip-bad-images to leave them out"


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class CacheSettings:
    """Decode settings; each distinct value gets its own cache bucket.

    Attributes:
        size: side of the stored square images, a little above the training size.
        keep_color: ``False`` stores every image as grayscale.
        resample: resize filter, one of :data:`medtransfer.data.decode.RESAMPLE_FILTERS`.
    """

    size: int = 256
    keep_color: bool = True
    resample: ResampleName = "lanczos"

    def __post_init__(self) -> None:
        check_size(self.size)
        resample_filter(self.resample)

    def key(self) -> str:
        """Short stable hash of the settings and the format version."""
        blob = json.dumps({"format": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


# --------------------------------------------------------------------------- the view


@dataclass(eq=False)
class CachedImages:
    """Cached pixels for a list of paths, in the order given to :meth:`ImageCache.build`.

    Picklable and cheap to send to DataLoader workers: it carries offsets, not pixels,
    and each process opens its own read-only memory map on first access.

    Attributes:
        paths: the images kept, in input order.
        positions: for each kept image, its index in the list given to ``build``
            (use it to select the matching labels when bad images were skipped).
        skipped: ``(path, reason)`` for each bad image left out (``skip_bad=True``).
        built: how many images this ``build`` call decoded (0 when all were cached).
    """

    paths: list[Path]
    positions: list[int]
    skipped: list[tuple[Path, str]]
    built: int
    data_file: Path
    offsets: np.ndarray  # int64, one per path
    shapes: list[tuple[int, ...]]
    _mm: np.memmap | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        """uint8 copy of image ``i``: ``(H, W)`` grayscale or ``(H, W, 3)`` RGB."""
        n = len(self.paths)
        if not -n <= i < n:
            raise IndexError(f"image index {i} out of range for {n} cached images")
        if self._mm is None:
            self._mm = np.memmap(self.data_file, dtype=np.uint8, mode="r")
        shape = self.shapes[i]
        start = int(self.offsets[i])
        return np.array(self._mm[start : start + int(np.prod(shape))].reshape(shape))

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def subset(self, indices: Sequence[int]) -> "CachedImages":
        """A view of some of these images (e.g. one split), sharing the same data file."""
        indices = list(indices)
        paths, shapes = [self.paths[i] for i in indices], [self.shapes[i] for i in indices]
        offsets = self.offsets[indices]
        return replace(self, paths=paths, positions=indices, skipped=[], built=0, offsets=offsets, shapes=shapes)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_mm"] = None  # never pickle the map; reopen in the receiving process
        return state


# --------------------------------------------------------------------------- the cache


class ImageCache:
    """Decode-once cache of resized uint8 images, keyed by file content and settings.

    Example:
        >>> cache = ImageCache("~/.cache/medtransfer/images")          # doctest: +SKIP
        >>> images = cache.build(paths, skip_bad=True, progress=True)   # doctest: +SKIP
        >>> images[0].shape                                             # doctest: +SKIP
        (256, 256)
    """

    def __init__(self, cache_dir: str | Path, settings: CacheSettings = CacheSettings()) -> None:
        self.settings = settings
        self.root = Path(cache_dir).expanduser()
        self.location = self.root / f"v{FORMAT_VERSION}-{settings.key()}"
        self._data_file = self.location / "data.bin"
        self._index_file = self.location / "index.sqlite"

    # ----------------------------------------------------------------- public API

    def build(
        self,
        paths: Sequence[str | Path],
        *,
        skip_bad: bool = False,
        progress: bool = False,
        workers: int = 1,
    ) -> CachedImages:
        """Decode the images not yet cached and return a view of exactly ``paths``.

        Args:
            paths: image files; a file listed twice is decoded once, identical
                content is stored once.
            skip_bad: leave unreadable images out (listed in ``CachedImages.skipped``)
                instead of raising.
            progress: show a progress bar.
            workers: processes used for decoding (writes stay in this process).

        Raises:
            DataError: some images are unreadable and ``skip_bad`` is False; the message
                lists them all (the good ones are cached before raising).
        """
        if not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be a positive integer, got {workers!r}.")
        in_paths = [Path(p) for p in paths]
        self._ensure_bucket()
        with self._locked(), self._connect() as conn, _progress(progress, len(in_paths)) as advance:
            end = self._repair(conn)
            entries, memo = _read_index(conn)
            hashes, bad, todo = _plan(in_paths, memo, entries, advance)

            # 2. New or changed files: read + hash, decode only content not cached yet.
            built = 0
            pending: dict[str, np.ndarray] = {}
            memo_updates: list[tuple] = []
            tasks = [str(in_paths[group[0]]) for group, _ in todo.values()]
            with file_loader(asdict(self.settings), set(entries), workers, len(tasks)) as load:
                for (key, (group, stat)), (digest, result) in zip(todo.items(), load(tasks)):
                    advance(len(group))
                    if isinstance(result, str):
                        bad.update((i, result) for i in group)
                        continue
                    hashes.update((i, digest) for i in group)
                    # stat predates the read: a file changed meanwhile is re-hashed next time
                    memo_updates.append((key, *stat, digest))
                    if result is not None:
                        built += 1
                        if digest not in entries:
                            pending[digest] = result
                    if len(pending) >= _FLUSH_EVERY:
                        end = self._append(conn, pending, end, entries, memo_updates)
                        pending, memo_updates = {}, []
            end = self._append(conn, pending, end, entries, memo_updates)

        if bad and not skip_bad:
            raise DataError(_bad_images_message([(in_paths[i], r) for i, r in sorted(bad.items())]))
        kept = [i for i in range(len(in_paths)) if i not in bad]
        return CachedImages(
            paths=[in_paths[i] for i in kept],
            positions=kept,
            skipped=[(in_paths[i], r) for i, r in sorted(bad.items())],
            built=built,
            data_file=self._data_file,
            offsets=np.array([entries[hashes[i]][0] for i in kept], dtype=np.int64),
            shapes=[_squeeze(entries[hashes[i]][1]) for i in kept],
        )

    def stats(self) -> dict:
        """``entries`` (valid cached images), ``bytes`` (data file size), ``location``."""
        data_bytes = self._data_file.stat().st_size if self._data_file.exists() else 0
        entries = 0
        if self._index_file.exists():
            with self._connect() as conn:
                (entries,) = conn.execute(
                    "SELECT COUNT(*) FROM entries WHERE offset + height * width * channels <= ?",
                    (data_bytes,),
                ).fetchone()
        return {
            "entries": entries,
            "bytes": data_bytes,
            "location": str(self.location),
            "settings": asdict(self.settings),
        }

    # ----------------------------------------------------------------- internals

    def _ensure_bucket(self) -> None:
        self.location.mkdir(parents=True, exist_ok=True)
        meta = self.location / "settings.json"
        if not meta.exists():
            meta.write_text(
                json.dumps({"format": FORMAT_VERSION, **asdict(self.settings)}, indent=2) + "\n"
            )
        self._data_file.touch(exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The bucket's lock; when another process builds, say so and wait for it (never mix writes)."""
        with open(self.location / "lock", "a+b") as fh:
            if fcntl is not None:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    print(f"Waiting for another process that is filling the image cache {self.location} ...",
                          file=sys.stderr, flush=True)
                    fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(fh, fcntl.LOCK_UN)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self._index_file, timeout=60)
        try:
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            yield conn
        finally:
            conn.close()

    def _repair(self, conn: sqlite3.Connection) -> int:
        """Drop index rows past the data file's end, cut unreferenced trailing bytes.

        Returns the end of the committed data, where the next entry goes.
        """
        size = self._data_file.stat().st_size
        conn.execute("DELETE FROM entries WHERE offset + height * width * channels > ?", (size,))
        conn.commit()
        (end,) = conn.execute(
            "SELECT COALESCE(MAX(offset + height * width * channels), 0) FROM entries"
        ).fetchone()
        if end < size:
            os.truncate(self._data_file, end)
        return end

    def _append(
        self,
        conn: sqlite3.Connection,
        pending: dict[str, np.ndarray],
        end: int,
        entries: dict[str, tuple[int, tuple[int, int, int]]],
        memo_updates: list[tuple],
    ) -> int:
        """Write pixels durably, then commit the index rows that point at them."""
        rows = []
        if pending:
            with open(self._data_file, "r+b") as fh:
                fh.seek(end)
                for digest, arr in pending.items():
                    h, w = arr.shape[:2]
                    c = arr.shape[2] if arr.ndim == 3 else 1
                    fh.write(np.ascontiguousarray(arr).data)
                    rows.append((digest, end, h, w, c))
                    end += arr.nbytes
                fh.flush()
                os.fsync(fh.fileno())
        conn.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?)", rows)
        conn.executemany("INSERT OR REPLACE INTO file_stats VALUES (?, ?, ?, ?, ?, ?)", memo_updates)
        conn.commit()
        for digest, offset, h, w, c in rows:
            entries[digest] = (offset, (h, w, c))
        return end


# --------------------------------------------------------------------------- helpers


def _read_index(
    conn: sqlite3.Connection,
) -> tuple[dict[str, tuple[int, tuple[int, int, int]]], dict[str, tuple[int, int, str]]]:
    """``(entries, memo)``: hash -> (offset, (h, w, c)), and path bytes -> (size, mtime, ctime, inode, hash)."""
    rows = conn.execute("SELECT hash, offset, height, width, channels FROM entries")
    entries = {digest: (offset, (h, w, c)) for digest, offset, h, w, c in rows}
    rows = conn.execute("SELECT path, size, mtime_ns, ctime_ns, inode, hash FROM file_stats")
    memo = {bytes(path): tuple(stat) for path, *stat in rows}
    return entries, memo


def _plan(
    paths: list[Path],
    memo: dict[bytes, tuple],
    entries: Container[str],
    advance: Callable[[int], None],
) -> tuple[dict[int, str], dict[int, str], dict[bytes, tuple[list[int], tuple[int, int, int, int]]]]:
    """Cheap pass over ``paths``: stat each file and look it up in the memo.

    Returns ``(hashes, bad, todo)``: content hash of each position already cached,
    failure reason of each unreadable position, and for each remaining file (by absolute
    path, as bytes) its positions and ``(size, mtime_ns, ctime_ns, inode)`` taken before it is read.
    """
    hashes: dict[int, str] = {}
    bad: dict[int, str] = {}
    todo: dict[bytes, tuple[list[int], tuple[int, int, int, int]]] = {}
    for i, path in enumerate(paths):
        key = os.fsencode(os.path.abspath(path))
        if key in todo:
            todo[key][0].append(i)
            continue
        try:
            st = os.stat(path)
        except OSError as exc:
            bad[i] = f"cannot read file ({exc.strerror or exc})"
            advance(1)
            continue
        stat = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        known = memo.get(key)
        if known is not None and tuple(known[:4]) == stat and known[4] in entries:
            hashes[i] = known[4]
            advance(1)
        else:
            todo[key] = ([i], stat)
    return hashes, bad, todo


def _squeeze(shape: tuple[int, int, int]) -> tuple[int, ...]:
    h, w, c = shape
    return (h, w) if c == 1 else (h, w, c)


def _bad_images_message(bad: list[tuple[Path, str]]) -> str:
    """One line (the CLI prints errors as one line): every bad file with its reason, then the fix."""
    listed = "; ".join(f"{path} ({reason})" for path, reason in bad[:_MAX_LISTED_BAD])
    more = f"; ... and {len(bad) - _MAX_LISTED_BAD} more" if len(bad) > _MAX_LISTED_BAD else ""
    return f"{len(bad)} image(s) cannot be read: {listed}{more}. Fix or remove them, or {_SKIP_HINT}."


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n=1)``: a rich progress bar, or nothing when disabled."""
    if not enabled:
        yield lambda n=1: None
        return
    from rich.progress import Progress

    with Progress(transient=False) as bar:
        task = bar.add_task("Caching images", total=total)
        yield lambda n=1: bar.advance(task, n)
