"""The new site's images: a folder searched recursively, file names and bytes only.

`adapt` must not learn anything from labels, so it never asks :mod:`medtransfer.data.discover`
(which reads class folders, CSV label columns and split names): it lists image files by
suffix, whatever folders they sit in, and derives each image's patient from its file name
(the run's ``patient_regex``, else the Kermany naming rules) for the patient-level bootstrap.
A folder named PNEUMONIA is just a folder.

The digest identifies the data by content: SHA-256 over the sorted SHA-256 digests of the
files, so renaming or moving a file keeps it and changing a pixel does not.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from medtransfer.data.discover import IMAGE_SUFFIXES, patient_id_from_name
from medtransfer.errors import DataError
from medtransfer.privacy import folder_name

__all__ = ["UnlabelledImages", "list_unlabelled"]

_SKIPPED_DIRS = {"__MACOSX"}


@dataclass(frozen=True)
class UnlabelledImages:
    """Image files (sorted), the patient of each (from its name) and the content digest of the set."""

    root: Path
    paths: list[Path]
    patient_ids: list[str]
    digest: str

    def to_dict(self) -> dict:
        return {"data": folder_name(self.root), "images": len(self.paths), "patients": len(set(self.patient_ids)),
                "sha256": self.digest, "digest_rule": "sha256 of the sorted per-file sha256 digests"}


def _visible(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return (path.suffix.lower() in IMAGE_SUFFIXES and not any(p.startswith(".") or p in _SKIPPED_DIRS for p in parts)
            and path.is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_unlabelled(data: Path, *, patient_regex: str | None = None) -> UnlabelledImages:
    """Every image under `data` (recursively; hidden files and folders skipped). DataError when there is none."""
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"--data {data}: not a folder; pass a folder of images (subfolders are searched, their names "
                        "are ignored)")
    paths = sorted(p for p in root.rglob("*") if _visible(p, root))
    if not paths:
        raise DataError(f"--data {data}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    files = hashlib.sha256()
    for file_digest in sorted(_sha256(p) for p in paths):
        files.update(file_digest.encode())
    patients = [patient_id_from_name(p, patient_regex) for p in paths]
    return UnlabelledImages(root, paths, patients, files.hexdigest())
