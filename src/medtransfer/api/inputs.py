"""What the API accepts as data and as images, turned into what the pipeline reads.

- Labelled data (:func:`data_path`): a folder, a CSV manifest or a MedMNIST ``.npz`` (passed on
  as is), or a pandas DataFrame, written once as a CSV manifest (:func:`write_manifest`).
- Images (:func:`image_items`): file paths, folders, encoded bytes, numpy arrays or PIL images,
  one or a list (a DataFrame: its ``path`` column).

Nothing here imports pandas, torch or PIL at module level.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medtransfer.errors import ConfigError, DataError, missing_extra

__all__ = [
    "IMAGE_COLUMNS", "MANIFESTS_DIR", "data_path", "image_items", "is_dataframe", "require_pandas", "to_source", "write_manifest",
]

MANIFESTS_DIR = "manifests"  # under the cache folder, as an .npz source's images are
IMAGE_COLUMNS = ("path", "Path", "Image Index")  # the image columns CSV discovery reads
_ACCEPTED_DATA = (
    "a folder, a CSV manifest or an .npz file, or a pandas DataFrame with columns path, label[, patient_id][, split] "
    "(multi-label: path, labels[, patient_id][, split])"
)


def require_pandas(what: str) -> Any:
    """The pandas module, or an ImportError that names the [notebook] extra and its install line."""
    try:
        import pandas
    except ImportError:
        raise ImportError(f"{missing_extra(what, 'notebook')} (it returns a pandas DataFrame)") from None
    return pandas


def is_dataframe(value: Any) -> bool:
    """Whether ``value`` is a pandas DataFrame (without importing pandas when nobody has)."""
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(value, pandas.DataFrame)


def data_path(data: Any, *, cache_dir: str | Path, what: str) -> str:
    """The path the pipeline reads for ``data``: a path as given, or a DataFrame's manifest (:func:`write_manifest`).

    ``what`` names the argument in errors, e.g. ``"medtransfer.train(data=...)"``.
    """
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    if is_dataframe(data):
        return str(write_manifest(data, Path(cache_dir) / MANIFESTS_DIR))
    raise ConfigError(f"{what}: got {type(data).__name__}; pass {_ACCEPTED_DATA}")


def write_manifest(frame: Any, folder: Path) -> Path:
    """Write a DataFrame as a CSV manifest named by its content; return its path.

    Image paths are made absolute (relative ones are taken from the working directory), and a
    ``labels`` column holding lists (multi-label findings) is written ``|``-joined, as NIH's CSV
    writes them. Every other column is written as it is, for discovery to read and check: the
    same DataFrame always gives the same file, so a run's config.yaml names a manifest that
    stays (the run folder itself must be empty when training starts).

    >>> import pandas as pd, tempfile
    >>> frame = pd.DataFrame({"path": ["/data/a.png"], "label": ["NORMAL"], "patient_id": ["p1"]})
    >>> write_manifest(frame, Path(tempfile.mkdtemp())).name.startswith("dataframe-")
    True
    """
    column = _image_column(frame)
    if frame.empty:
        raise DataError("DataFrame: no rows; pass one row per image")
    table = frame.copy()
    table[column] = [os.path.abspath(os.fspath(p)) for p in table[column]]
    if "labels" in table.columns:
        table["labels"] = [_joined(v) for v in table["labels"]]
    text = table.to_csv(index=False, lineterminator="\n")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"dataframe-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}.csv"
    if not path.is_file():
        from medtransfer.safeio import write_text_atomic

        write_text_atomic(path, text)
    return path


def _image_column(frame: Any) -> str:
    column = next((c for c in IMAGE_COLUMNS if c in frame.columns), None)
    if column is None:
        raise DataError(
            f"DataFrame: no image column (one of {', '.join(IMAGE_COLUMNS)}); found {', '.join(map(str, frame.columns))}"
        )
    return column


def _joined(value: Any) -> Any:
    if isinstance(value, (list, tuple, set, frozenset)):
        return "|".join(str(v) for v in value)
    return value


def image_items(images: Any) -> tuple[list[Any], bool]:
    """``images`` as a list of single images, and whether every item is a file path.

    One image (a path, bytes, a 2-D or 3-D array, a PIL image) becomes a list of one; a folder
    its images (sorted, as ``medtransfer predict`` lists them); a 4-D array (N x H x W x C) its N
    images; a DataFrame its ``path`` column; any other sequence its items.
    """
    if is_dataframe(images):
        items: list[Any] = [Path(p) for p in images[_image_column(images)]]
    elif _is_single(images):
        items = [images]
    elif _is_array(images) and images.ndim != 4:
        raise ConfigError(f"images: got an array of shape {images.shape}; pass one image (H x W or H x W x 3) "
                          "or a batch (N x H x W x C)")
    elif isinstance(images, Sequence) or hasattr(images, "__iter__"):
        items = list(images)
    else:
        raise ConfigError(f"images: got {type(images).__name__}; pass {_ACCEPTED_IMAGES}")
    if not items:
        raise DataError("images: none given; pass image files, a folder, bytes, arrays or PIL images")
    if all(isinstance(item, (str, os.PathLike)) for item in items):
        from medtransfer.predict import expand_inputs

        return list(expand_inputs(items)), True  # folders expanded; a missing file is one clear error
    return items, False


_ACCEPTED_IMAGES = "image files or folders, bytes, numpy arrays (H x W or H x W x 3), PIL images, a list of them, or a DataFrame with a path column"


def _is_array(value: Any) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.ndarray)


def _is_pil(value: Any) -> bool:
    image = sys.modules.get("PIL.Image")
    return image is not None and isinstance(value, image.Image)


def _is_single(value: Any) -> bool:
    return (
        isinstance(value, (str, os.PathLike, bytes, bytearray))
        or _is_pil(value)
        or (_is_array(value) and value.ndim in (2, 3))
    )


def to_source(item: Any) -> Path | bytes | Any:
    """One image as :meth:`~medtransfer.artifacts.SavedModel.decode` takes it: a path, bytes or a numpy array
    (a PIL image is encoded as PNG, so its mode and transparency are handled as a file's would be)."""
    if isinstance(item, (str, os.PathLike)):
        return Path(item)
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if _is_array(item):
        return item
    if _is_pil(item):
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        return buffer.getvalue()
    raise ConfigError(f"images: got an item of type {type(item).__name__}; pass {_ACCEPTED_IMAGES}")
