"""Decode-once image cache.

Full-resolution chest X-rays (1-3k px JPEGs) cost more to decode than a 224 px forward
pass. This module decodes each image once, at reduced size, and keeps the result as
uint8 pixels in a memory-mapped file that train, validation, test and later runs share.

Preprocessing (:func:`decode_image`, also used for prediction on new images):

1. JPEGs are decoded at reduced size by libjpeg's DCT scaling (``Image.draft``): the
   largest power-of-two reduction (up to 1/8) that keeps both sides >= ``size``.
2. EXIF orientation is applied.
3. Mode: grayscale sources ("1", "L", "LA") stay single-channel. 16-bit and 32-bit
   sources ("I;16", "I", "F") are stretched to 8 bits by their own min-max range.
   Colour sources ("RGB", "RGBA", "P", "CMYK", ...) become RGB, and then single-channel
   when the three channels agree to within ``GRAY_TOLERANCE`` (many X-rays are stored as
   RGB with identical channels), or always when ``keep_color=False``.
4. The image is resized to ``size x size`` **without keeping the aspect ratio** (the
   image is stretched, nothing is cropped or padded) with an antialiasing filter.

Result: uint8 array of shape ``(size, size)`` (grayscale) or ``(size, size, 3)`` (RGB).

Storage layout, one bucket per decode settings::

    cache_dir/v1-<settings hash>/
        settings.json   the settings, for humans
        data.bin        uint8 pixels of every entry, appended back to back
        index.sqlite    entries(hash -> offset, height, width, channels)
                        files(path -> size, mtime_ns, hash), so unchanged files are not re-hashed
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
import io
import json
import multiprocessing
import os
import re
import sqlite3
import warnings
from collections.abc import Callable, Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps

from medtransfer.errors import ConfigError, DataError

try:  # POSIX; elsewhere concurrent builds into one bucket are not guarded
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "GRAY_TOLERANCE",
    "RESAMPLE_FILTERS",
    "CacheSettings",
    "CachedImages",
    "ImageCache",
    "decode_image",
]

FORMAT_VERSION = 1
"""Bump when the on-disk layout or the output of :func:`decode_image` changes."""

GRAY_TOLERANCE = 2
"""An RGB image whose channels differ by at most this many levels everywhere is gray."""

RESAMPLE_FILTERS: dict[str, Image.Resampling] = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}
ResampleName = Literal["lanczos", "bicubic", "bilinear", "box"]

_HIGH_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
_GRAY_MODES = {"1", "L", "LA", "La"}
_FLUSH_EVERY = 256  # entries per fsync + index commit; a crash loses at most this many
_MAX_LISTED_BAD = 10
_SKIP_HINT = "use --skip-bad-images to leave them out"


# --------------------------------------------------------------------------- decoding


def decode_image(
    source: str | Path | bytes | BinaryIO,
    *,
    size: int,
    keep_color: bool = True,
    resample: ResampleName = "lanczos",
) -> np.ndarray:
    """Decode one image exactly as the cache does (see the module docstring).

    Args:
        source: a file path, the file's bytes, or a binary file object.
        size: output side length; the image is stretched to ``size x size``.
        keep_color: ``False`` makes every image single-channel.
        resample: resize filter, one of :data:`RESAMPLE_FILTERS`.

    Returns:
        uint8 array, ``(size, size)`` for grayscale or ``(size, size, 3)`` for colour.

    Raises:
        DataError: the file cannot be read or is not a decodable image.

    Example:
        >>> import io; from PIL import Image
        >>> buf = io.BytesIO(); Image.new("L", (600, 400), 90).save(buf, "JPEG")
        >>> decode_image(buf.getvalue(), size=64).shape
        (64, 64)
    """
    _check_size(size)
    filt = _resample_filter(resample)
    name = str(source) if isinstance(source, (str, Path)) else "<image bytes>"
    if isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise DataError(f"{name}: cannot read file ({exc.strerror or exc}).") from exc
    elif isinstance(source, bytes):
        data = source
    else:
        data = source.read()
    try:
        return _decode_bytes(data, size=size, keep_color=keep_color, resample=filt)
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise DataError(
            f"{name}: not a readable image ({_describe(exc)}); "
            "fix or remove the file, or use --skip-bad-images to leave it out."
        ) from exc


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble."""
    return len(data) > 132 and data[128:132] == b"DICM"


def dicom_to_image(data: bytes) -> Image.Image:
    """A DICOM radiograph as an 8-bit grayscale image, as a radiologist's viewer would show it.

    Stored values are turned into modality values (RescaleSlope/Intercept), then the file's
    own window (VOI LUT or WindowCenter/Width) is applied when present, else the full range;
    MONOCHROME1 (bright = low values) is inverted so that bone is always bright.
    """
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise DataError("DICOM images need pydicom: pip install pydicom") from None
    dataset = pydicom.dcmread(io.BytesIO(data))
    pixels = dataset.pixel_array
    if pixels.ndim == 3 and getattr(dataset, "SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: the first frame
    if getattr(dataset, "SamplesPerPixel", 1) == 3:
        return Image.fromarray(pixels.astype(np.uint8), mode="RGB")
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    if "VOILUTSequence" in dataset or "WindowCenter" in dataset:
        values = apply_voi_lut(values, dataset).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if getattr(dataset, "PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        scaled = 1.0 - scaled
    return Image.fromarray(np.rint(scaled * 255.0).astype(np.uint8), mode="L")


def _decode_bytes(
    data: bytes, *, size: int, keep_color: bool, resample: Image.Resampling
) -> np.ndarray:
    if is_dicom(data):
        im = dicom_to_image(data)
        im = _to_8bit_mode(im, keep_color=keep_color)
        return np.asarray(im.resize((size, size), resample, reducing_gap=3.0), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
        if im.format == "JPEG":
            # DCT-domain downscaling; "L" also makes libjpeg skip colour conversion.
            want = "RGB" if keep_color and im.mode not in _GRAY_MODES else "L"
            im.draft(want, (size, size))
        im.load()
    im = ImageOps.exif_transpose(im)
    im = _to_8bit_mode(im, keep_color=keep_color)
    if im.size != (size, size):
        im = im.resize((size, size), resample, reducing_gap=3.0)
    return np.asarray(im, dtype=np.uint8)


def _to_8bit_mode(im: Image.Image, *, keep_color: bool) -> Image.Image:
    """Return an "L" or "RGB" image (see module docstring, step 3)."""
    if im.mode in _GRAY_MODES:
        return im if im.mode == "L" else im.convert("L")
    if im.mode in _HIGH_DEPTH_MODES:
        arr = np.asarray(im).astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    if not keep_color or _channels_equal(rgb):
        return rgb.convert("L")
    return rgb


def _channels_equal(rgb: Image.Image) -> bool:
    """True when R, G and B agree to within GRAY_TOLERANCE at every pixel."""
    arr = np.asarray(rgb)
    r = arr[..., 0].astype(np.int16)
    return bool(
        np.abs(r - arr[..., 1]).max() <= GRAY_TOLERANCE
        and np.abs(r - arr[..., 2]).max() <= GRAY_TOLERANCE
    )


def _describe(exc: BaseException) -> str:
    # PIL names an in-memory buffer ("<_io.BytesIO object at 0x...>"), which means nothing to the user.
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"Image cache size must be a positive integer, got {size!r}.")


def _resample_filter(name: str) -> Image.Resampling:
    try:
        return RESAMPLE_FILTERS[name]
    except KeyError:
        choices = ", ".join(RESAMPLE_FILTERS)
        raise ConfigError(f"Unknown resample filter {name!r}; choose one of: {choices}.") from None


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class CacheSettings:
    """Decode settings; each distinct value gets its own cache bucket.

    Attributes:
        size: side of the stored square images, a little above the training size.
        keep_color: ``False`` stores every image as grayscale.
        resample: resize filter, one of :data:`RESAMPLE_FILTERS`.
    """

    size: int = 256
    keep_color: bool = True
    resample: ResampleName = "lanczos"

    def __post_init__(self) -> None:
        _check_size(self.size)
        _resample_filter(self.resample)

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
        return CachedImages(
            paths=[self.paths[i] for i in indices],
            positions=indices,
            skipped=[],
            built=0,
            data_file=self.data_file,
            offsets=self.offsets[indices],
            shapes=[self.shapes[i] for i in indices],
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_mm"] = None  # never pickle the map; reopen in the receiving process
        return state


# --------------------------------------------------------------------------- the cache


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_decode_workers() -> int:
    """Decoding is CPU-bound and runs before training starts: use the cores (up to 8)."""
    return max(1, min(8, available_cores()))


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
        with self._locked(), self._connect() as conn, _Progress(progress, len(in_paths)) as bar:
            end = self._repair(conn)
            entries = {
                row[0]: (row[1], (row[2], row[3], row[4]))
                for row in conn.execute("SELECT hash, offset, height, width, channels FROM entries")
            }
            memo = {
                row[0]: (row[1], row[2], row[3])
                for row in conn.execute("SELECT path, size, mtime_ns, hash FROM files")
            }

            hashes, bad, todo = _plan(in_paths, memo, entries, bar)

            # 2. New or changed files: read + hash, decode only content not cached yet.
            built = 0
            pending: dict[str, np.ndarray] = {}
            memo_updates: list[tuple[str, int, int, str]] = []
            tasks = [str(in_paths[group[0]]) for group, _ in todo.values()]
            with _loader(self.settings, set(entries), workers, len(tasks)) as load:
                for (key, (group, stat)), (digest, result) in zip(todo.items(), load(tasks)):
                    bar.advance(len(group))
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
        with open(self.location / "lock", "a+b") as fh:
            if fcntl is not None:
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
            conn.execute(
                "CREATE TABLE IF NOT EXISTS entries (hash TEXT PRIMARY KEY,"
                " offset INTEGER NOT NULL, height INTEGER NOT NULL, width INTEGER NOT NULL,"
                " channels INTEGER NOT NULL)"
            )
            conn.execute(
                "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER NOT NULL,"
                " mtime_ns INTEGER NOT NULL, hash TEXT NOT NULL)"
            )
            conn.commit()
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
        memo_updates: list[tuple[str, int, int, str]],
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
        conn.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", memo_updates)
        conn.commit()
        for digest, offset, h, w, c in rows:
            entries[digest] = (offset, (h, w, c))
        return end


# --------------------------------------------------------------------------- helpers


def _new_hasher() -> hashlib._Hash:
    return hashlib.blake2b(digest_size=20)


def _plan(
    paths: list[Path],
    memo: dict[str, tuple[int, int, str]],
    entries: Container[str],
    bar: _Progress,
) -> tuple[dict[int, str], dict[int, str], dict[str, tuple[list[int], tuple[int, int]]]]:
    """Cheap pass over ``paths``: stat each file and look it up in the memo.

    Returns ``(hashes, bad, todo)``: content hash of each position already cached,
    failure reason of each unreadable position, and for each remaining file (by absolute
    path) its positions and ``(size, mtime_ns)`` taken before it is read.
    """
    hashes: dict[int, str] = {}
    bad: dict[int, str] = {}
    todo: dict[str, tuple[list[int], tuple[int, int]]] = {}
    for i, path in enumerate(paths):
        key = os.path.abspath(path)
        if key in todo:
            todo[key][0].append(i)
            continue
        try:
            st = os.stat(path)
        except OSError as exc:
            bad[i] = f"cannot read file ({exc.strerror or exc})"
            bar.advance()
            continue
        known = memo.get(key)
        if known is not None and known[:2] == (st.st_size, st.st_mtime_ns) and known[2] in entries:
            hashes[i] = known[2]
            bar.advance()
        else:
            todo[key] = ([i], (st.st_size, st.st_mtime_ns))
    return hashes, bad, todo


LoadResult = tuple[str, np.ndarray | str | None]


def _load_file(
    path: str, settings: CacheSettings, known: Container[str]
) -> LoadResult:
    """Read and hash one file; decode it unless its content is in ``known``.

    Returns ``(hash, pixels)``, ``(hash, None)`` when already cached, or
    ``(hash, reason)`` when the file is bad.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return "", f"cannot read file ({exc.strerror or exc})"
    hasher = _new_hasher()
    hasher.update(data)
    digest = hasher.hexdigest()
    if digest in known:
        return digest, None
    try:
        arr = _decode_bytes(
            data,
            size=settings.size,
            keep_color=settings.keep_color,
            resample=RESAMPLE_FILTERS[settings.resample],
        )
    except Exception as exc:  # any decoder failure marks the file bad
        return digest, f"not a readable image ({_describe(exc)})"
    return digest, arr


_worker_state: tuple[CacheSettings, frozenset[str]] | None = None


def _init_worker(settings: CacheSettings, known: frozenset[str]) -> None:
    global _worker_state
    _worker_state = (settings, known)


def _load_in_worker(path: str) -> LoadResult:
    assert _worker_state is not None, "_init_worker was not called"
    return _load_file(path, *_worker_state)


@contextmanager
def _loader(
    settings: CacheSettings, known: set[str], workers: int, n_tasks: int
) -> Iterator[Callable[[list[str]], Iterator[LoadResult]]]:
    """Yield ``load(paths)``: an iterator of :func:`_load_file` results in input order."""
    if workers == 1 or n_tasks < 2:
        yield lambda paths: (_load_file(p, settings, known) for p in paths)
        return
    ctx = multiprocessing.get_context()
    with ctx.Pool(min(workers, n_tasks), _init_worker, (settings, frozenset(known))) as pool:
        yield lambda paths: pool.imap(_load_in_worker, paths, chunksize=4)


def _squeeze(shape: tuple[int, int, int]) -> tuple[int, ...]:
    h, w, c = shape
    return (h, w) if c == 1 else (h, w, c)


def _bad_images_message(bad: list[tuple[Path, str]]) -> str:
    """One line (the CLI prints errors as one line): every bad file with its reason, then the fix."""
    listed = "; ".join(f"{path} ({reason})" for path, reason in bad[:_MAX_LISTED_BAD])
    more = f"; ... and {len(bad) - _MAX_LISTED_BAD} more" if len(bad) > _MAX_LISTED_BAD else ""
    return f"{len(bad)} image(s) cannot be read: {listed}{more}. Fix or remove them, or {_SKIP_HINT}."


class _Progress:
    """A rich progress bar, or nothing when disabled."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._bar = None
        self._task = None
        if enabled:
            from rich.progress import Progress

            self._bar = Progress(transient=False)
            self._task = self._bar.add_task("Caching images", total=total)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)
