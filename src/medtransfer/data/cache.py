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
        index.sqlite    entries(hash -> offset, height, width, channels, checksum)
                        file_stats(path -> size, mtime, ctime, inode, hash), so unchanged
                        files are not re-hashed (medtransfer.data.cache_index)
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

Integrity: each entry's pixel bytes have a CRC-32 in the index (cache_index.pixel_checksum).
A build checks every entry it hands out and decodes a bad one again from its source image
(a warning says how many); the view checks each image it reads and, on a mismatch, decodes
the source again in memory (warning once), or refuses in one line when the source is gone
or has changed. A corrupt ``index.sqlite`` (not a database, truncated, failing SQLite's
``quick_check``) is started afresh by the next build, with a warning: the index and an
empty data file replace the old ones (views that other processes still map keep the old
file) and every image is decoded again. ``stats()`` on a corrupt index raises a one-line
DataError naming the file and the fix (delete the cache folder, it is rebuilt).

Cost of the read-time check (``python benchmarks/cache_checksum.py --rounds 9``: 512
entries of 256 x 256 grayscale, 64 KiB each, read in order from the page cache, A/B
interleaved, medians; 3 runs on 2 shared cores under load): 9,200-13,200 img/s verified
vs 28,000-38,700 img/s unverified, ratio 0.31-0.45, i.e. 40-70 us more per image (the CRC
alone: 16 us; blake2b: 69 us). Small beside what a training step spends per image; a
build's check of its entries runs at 0.8-1 GB/s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Callable, Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from medtransfer.data.cache_index import (
    EntryChecker,
    IndexCorruptError,
    append_entries,
    discard,
    open_index,
    pixel_checksum,
    read_index,
    record_checksums,
    repair,
)
from medtransfer.data.cache_loader import file_loader, load_file
from medtransfer.data.decode import ResampleName, check_size, resample_filter
from medtransfer.errors import ConfigError, DataError

try:  # POSIX; elsewhere concurrent builds into one bucket are not guarded
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["CacheSettings", "CachedImages", "ImageCache"]

LOGGER = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: transparency composited, palette and 16-bit RGB DICOM decoded as colour
"""Bump when the on-disk layout or the output of :func:`~medtransfer.data.decode.decode_image` changes."""

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
        verify: check each image read against its checksum (see the module docstring).
    """

    paths: list[Path]
    positions: list[int]
    skipped: list[tuple[Path, str]]
    built: int
    data_file: Path
    offsets: np.ndarray  # int64, one per path
    shapes: list[tuple[int, ...]]
    checksums: list[bytes | None] | None = None  # of each image's pixel bytes; None: not checked
    hashes: list[str] | None = None  # content hash of each source file when the cache was built
    decode_options: dict | None = None  # CacheSettings as a dict: decodes a bad entry's source again
    verify: bool = True
    _mm: np.memmap | None = field(default=None, init=False, repr=False)
    _redecoded: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False)

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
        pixels = np.array(self._mm[start : start + int(np.prod(shape))].reshape(shape))
        if self.verify and self.checksums is not None:
            expected = self.checksums[i]
            if expected is not None and pixel_checksum(pixels) != expected:
                return self._from_source(i % n)
        return pixels

    def _from_source(self, i: int) -> np.ndarray:
        """Image ``i`` decoded again from its source file (its cached pixels failed their checksum)."""
        if i in self._redecoded:
            return self._redecoded[i].copy()
        path = self.paths[i]
        where = f"{path}: its cached pixels in {self.data_file} fail their checksum"
        fix = f"delete the cache folder {self.data_file.parent} (it is rebuilt from the images)"
        if self.decode_options is None:
            raise DataError(f"{where}; {fix}")
        digest, result = load_file(str(path), self.decode_options, ())
        if not digest:
            raise DataError(f"{where} and the source image is gone ({result}); restore it, or {fix}")
        if self.hashes is not None and digest != self.hashes[i]:
            raise DataError(f"{where} and the source image has changed since the cache was built; "
                            "build the cache again (run the command again)")
        if not isinstance(result, np.ndarray) or result.shape != tuple(self.shapes[i]):
            raise DataError(f"{where} and the source image no longer decodes to them ({result}); {fix}")
        LOGGER.warning("%s; decoded again from the source image (the next cache build rewrites the entry)", where)
        self._redecoded[i] = result
        return result.copy()

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def subset(self, indices: Sequence[int]) -> "CachedImages":
        """A view of some of these images (e.g. one split), sharing the same data file."""
        indices = list(indices)
        paths, shapes = [self.paths[i] for i in indices], [self.shapes[i] for i in indices]
        offsets = self.offsets[indices]
        checksums = None if self.checksums is None else [self.checksums[i] for i in indices]
        hashes = None if self.hashes is None else [self.hashes[i] for i in indices]
        return replace(self, paths=paths, positions=indices, skipped=[], built=0, offsets=offsets, shapes=shapes,
                       checksums=checksums, hashes=hashes)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_mm"] = None  # never pickle the map; reopen in the receiving process
        state["_redecoded"] = {}
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
        options = asdict(self.settings)
        self._ensure_bucket()
        with self._locked(), self._index_for_build() as conn, _progress(progress, len(in_paths)) as advance:
            try:
                end = repair(conn, self._data_file)
                entries, memo = read_index(conn)
                checked = EntryChecker(self._data_file, entries)
                for key in {os.fsencode(os.path.abspath(p)) for p in in_paths}:  # entries the memo would reuse
                    if key in memo and memo[key][4] in entries:
                        checked(memo[key][4])  # a bad one leaves ``entries``: its file is decoded again
                hashes, bad, todo = _plan(in_paths, memo, entries, advance)

                # 2. New or changed files: read + hash, decode only content not cached yet.
                built = 0
                pending: dict[str, np.ndarray] = {}
                memo_updates: list[tuple] = []
                tasks = [str(in_paths[group[0]]) for group, _ in todo.values()]
                with file_loader(options, set(entries), workers, len(tasks)) as load:
                    try:
                        for (key, (group, stat)), task, (digest, result) in zip(todo.items(), tasks, load(tasks)):
                            advance(len(group))
                            if result is None and not checked(digest):  # its content's entry is bad: decode
                                digest, result = load_file(task, options, ())
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
                                end = append_entries(conn, self._data_file, pending, end, entries, memo_updates)
                                pending, memo_updates = {}, []
                    except DataError:  # a decode worker died: keep what was decoded
                        append_entries(conn, self._data_file, pending, end, entries, memo_updates)
                        raise
                end = append_entries(conn, self._data_file, pending, end, entries, memo_updates)
                record_checksums(conn, checked.recorded)
            except sqlite3.DatabaseError as exc:
                raise DataError(self._corrupt_message(exc)) from None
        if checked.failed:
            LOGGER.warning("%d cached image(s) in %s failed their checksum and were decoded again from their source "
                           "images", checked.failed, self._data_file)

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
            checksums=[entries[hashes[i]][2] for i in kept],
            hashes=[hashes[i] for i in kept],
            decode_options=options,
        )

    def stats(self) -> dict:
        """``entries`` (valid cached images), ``bytes`` (data file size), ``location``."""
        data_bytes = self._data_file.stat().st_size if self._data_file.exists() else 0
        entries = 0
        if self._index_file.exists():
            try:
                with open_index(self._index_file) as conn:
                    (entries,) = conn.execute(
                        "SELECT COUNT(*) FROM entries WHERE offset + height * width * channels <= ?",
                        (data_bytes,),
                    ).fetchone()
            except (IndexCorruptError, sqlite3.DatabaseError) as exc:
                raise DataError(self._corrupt_message(exc)) from None
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
    def _index_for_build(self) -> Iterator[sqlite3.Connection]:
        """The index; a corrupt one is started afresh with a warning (every image is decoded again)."""
        try:
            with open_index(self._index_file) as conn:
                yield conn
                return
        except IndexCorruptError as exc:
            LOGGER.warning("%s; it is started afresh: every image is decoded again", self._corrupt_text(exc))
            discard(self._index_file, self._data_file)
        with open_index(self._index_file) as conn:
            yield conn

    def _corrupt_text(self, exc: Exception) -> str:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return f"image cache index {self._index_file} is corrupt ({reason})"

    def _corrupt_message(self, exc: Exception) -> str:
        return f"{self._corrupt_text(exc)}; delete the cache folder {self.location} (it is rebuilt from the images)"


# --------------------------------------------------------------------------- helpers


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
    """Yield ``advance(n)``: a rich progress bar, or nothing when disabled."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import Progress

    with Progress(transient=False) as bar:
        task = bar.add_task("Caching images", total=total)
        yield lambda n: bar.advance(task, n)
