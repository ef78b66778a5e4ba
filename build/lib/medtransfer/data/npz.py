"""MedMNIST `.npz` files as a data source.

The `medmnist` package writes one `.npz` per dataset holding `{split}_images` (uint8,
`(N, H, W)` grayscale or `(N, H, W, 3)` colour) and `{split}_labels` (`(N, 1)` class
indices) for the splits train, val and test. The arrays are written out once as PNG files
under `extract_dir` (a folder named after the file's content, so a changed file gets a new
folder and an unchanged one is reused), because every later step - the decode cache,
split.csv, evaluate, explain - works on image files. MedMNIST records no patients: each
image is its own patient.

Memory: a compressed npz cannot be memory-mapped, so the file is read one array at a time.
All labels are read and checked first (small), the images only by their .npy headers
(dtype and shape); then each split's images are loaded, written out and dropped before
the next split is loaded: the peak is one split's images, not the whole file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from medtransfer.errors import DataError

NPZ_SPLITS = ("train", "val", "test")
_COMPLETE = ".complete"  # written last: a folder without it is an interrupted extraction


def _digest(path: Path) -> str:
    hasher = hashlib.blake2b(digest_size=8)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


@contextmanager
def _opened(path: Path) -> Iterator[np.lib.npyio.NpzFile]:
    """The npz, open; its arrays are read one at a time (:func:`_array`, :func:`_header`)."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise _unreadable(path, exc) from None
    if not isinstance(npz, np.lib.npyio.NpzFile):  # a bare .npy array
        raise _unreadable(path, ValueError("a single .npy array, not an .npz archive"))
    with npz:
        yield npz


def _unreadable(path: Path, exc: BaseException) -> DataError:
    return DataError(f"--data {path}: not a readable .npz file ({exc}); pass a file the medmnist package wrote")


def _array(path: Path, npz, key: str) -> np.ndarray:
    """One array, read now (and only this one)."""
    try:
        return npz[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise _unreadable(path, exc) from None


def _header(path: Path, npz, key: str) -> tuple[np.dtype, tuple[int, ...]]:
    """dtype and shape of one array from its .npy header, without reading its data."""
    try:
        with npz.zip.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(member)  # 3.0 differs from 2.0 only in utf-8 field names
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise _unreadable(path, exc) from None
    if dtype.hasobject:  # what reading it says: pickled objects are refused
        _array(path, npz, key)
    return dtype, shape


def _read_splits(path: Path, npz) -> dict[str, tuple[int, np.ndarray]]:
    """{split: (image count, labels)} for the splits the file holds; labels read and checked, images by header."""
    keys = set(npz.files)
    found = ", ".join(sorted(keys)) or "no arrays"
    out = {}
    for split in NPZ_SPLITS:
        images, labels = f"{split}_images", f"{split}_labels"
        if images not in keys and labels not in keys:
            continue
        if images not in keys or labels not in keys:
            raise DataError(f"--data {path}: {split}_images and {split}_labels must come together; found {found}")
        n = _check_images(path, split, *_header(path, npz, images))
        out[split] = (n, _check_labels(path, split, _array(path, npz, labels), n))
    if not out:
        raise DataError(
            f"--data {path}: no MedMNIST arrays (train_images, train_labels, val_..., test_...); found {found}"
        )
    return out


def _check_images(path: Path, split: str, dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """The image count of a ``{split}_images`` array of this dtype and shape, if MedMNIST 2D images."""
    grayscale = len(shape) == 3
    colour = len(shape) == 4 and shape[-1] == 3
    if dtype != np.uint8 or not (grayscale or colour):
        raise DataError(
            f"--data {path}: {split}_images has dtype {dtype} and shape {shape}; expected uint8 "
            "(N, H, W) or (N, H, W, 3) as MedMNIST 2D datasets store them (3D volumes are not supported)"
        )
    return shape[0]


def _check_labels(path: Path, split: str, labels: np.ndarray, n: int) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] != 1:  # multi-label: one 0/1 column per finding (ChestMNIST)
        if len(labels) != n or not np.isin(labels, (0, 1)).all():
            raise DataError(
                f"--data {path}: {split}_labels has shape {labels.shape}; multi-label labels must be ({n}, findings) of 0 / 1"
            )
        return labels.astype(np.int64)
    flat = labels.reshape(-1) if labels.ndim in (1, 2) else labels
    if flat.ndim != 1 or len(flat) != n:
        raise DataError(f"--data {path}: {split}_labels has shape {labels.shape}; expected ({n}, 1) for {n} images")
    if not np.issubdtype(flat.dtype, np.integer) or (len(flat) and flat.min() < 0):
        raise DataError(f"--data {path}: {split}_labels must be class indices 0, 1, ...; got dtype {flat.dtype}")
    return flat.astype(np.int64)


# MedMNIST v2 ChestMNIST's 14 label columns (NIH ChestX-ray14's findings), in file order.
CHESTMNIST_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)


def is_multilabel_npz(labels: Sequence[np.ndarray]) -> bool:
    return any(a.ndim == 2 for a in labels)


def npz_class_names(labels: Sequence[np.ndarray], class_names: Sequence[str] | None, path: Path) -> list[str]:
    """Names for class indices ("0", "1", ... or the given list), or for a multi-label file's columns
    (ChestMNIST's findings for 14 columns, else "finding_0", ...)."""
    if is_multilabel_npz(labels):
        width = next(a.shape[1] for a in labels if a.ndim == 2)
        if class_names is None:
            return list(CHESTMNIST_FINDINGS) if width == len(CHESTMNIST_FINDINGS) else [f"finding_{i}" for i in range(width)]
        names = [str(n).strip() for n in class_names]
        if len(names) != width or any(not n for n in names) or len(set(names)) != len(names):
            raise DataError(f"--class-names {', '.join(names)}: give {width} distinct names, one per label column of {path}")
        return names
    top = max((int(a.max()) for a in labels if len(a)), default=0)
    if class_names is None:
        return [str(i) for i in range(top + 1)]
    names = [str(n).strip() for n in class_names]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise DataError(f"--class-names {', '.join(names)}: names must be non-empty and distinct")
    if top >= len(names):
        raise DataError(
            f"--data {path}: labels go up to {top} but --class-names lists {len(names)} name(s) "
            f"({', '.join(names)}); give one name per class index 0..{top}"
        )
    return names


def _write_pngs(path: Path, npz, splits: Sequence[str], folder: Path) -> None:
    """Every image as folder/{split}/{split}-{index}.png, then the completion mark; one split's
    images are read at a time and dropped before the next split's."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for split in splits:
            _write_split(_array(path, npz, f"{split}_images"), tmp / split)  # nothing of it outlives the call
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / _COMPLETE).write_text("")
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same extraction first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / _COMPLETE).is_file():
            raise


def _write_split(images: np.ndarray, folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{folder.name}-{i:05d}.png")


def extract_npz(
    path: Path, extract_dir: Path, *, class_names: Sequence[str] | None = None
) -> tuple[list[tuple[Path, str, str]], list[str] | None]:
    """(png path, class name, split) for every image of a MedMNIST `.npz`, writing the PNGs once, and
    the findings of a multi-label file (its labels are then the findings present, '|'-joined), else None."""
    with _opened(path) as npz:
        splits = _read_splits(path, npz)
        labels_of = [labels for _, labels in splits.values()]
        names = npz_class_names(labels_of, class_names, path)
        folder = Path(extract_dir) / f"{path.stem}-{_digest(path)}"
        if not (folder / _COMPLETE).is_file():
            shutil.rmtree(folder, ignore_errors=True)
            try:
                folder.parent.mkdir(parents=True, exist_ok=True)
                _write_pngs(path, npz, list(splits), folder)
            except OSError as exc:
                raise DataError(
                    f"--data {path}: cannot write its images under {extract_dir} ({exc.strerror or exc}); "
                    "choose a writable --cache-dir"
                ) from None
    rows = [
        (folder / split / f"{split}-{i:05d}.png", _label_text(label, names), split)
        for split, (_, labels) in splits.items()
        for i, label in enumerate(labels)
    ]
    return rows, names if is_multilabel_npz(labels_of) else None


def _label_text(label: np.ndarray, names: list[str]) -> str:
    """A class name, or a multi-label row's findings present, '|'-joined (medtransfer.task)."""
    if np.ndim(label) == 0:
        return names[int(label)]
    return "|".join(name for name, value in zip(names, label) if value == 1)
