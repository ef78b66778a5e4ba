"""DICOM coverage: medtransfer's decoder against pydicom itself on pydicom's own test corpus.

    python benchmarks/dicom_corpus.py [--size 64] [--extra DIR ...]

The corpus is every DICOM file (suffix ``.dcm`` or ``DICM`` after a 128-byte preamble) under
the ``test_files`` folder that pydicom ships inside its package and, when the
``pydicom-data`` package is installed, its ``data_store/data`` folder (plus any ``--extra``
folders). Nothing is downloaded. For each file:

- pydicom decodes it when ``dcmread(force=True).pixel_array`` succeeds with the installed
  plugins (pylibjpeg + pylibjpeg-libjpeg + pylibjpeg-openjpeg, pyjpegls);
- medtransfer decodes it when :func:`medtransfer.data.decode.decode_image` succeeds.

Prints ONE JSON line on stdout: ``files``, ``pydicom_decodes``, ``medtransfer_decodes``,
``failures`` (files pydicom decodes and medtransfer does not, with the reason; target:
empty), ``medtransfer_only`` (files medtransfer decodes and pydicom does not, e.g. no file
meta), ``refused`` (medtransfer's reason per file it does not decode, grouped),
``warnings_leaked`` (Python warnings that escaped decode_image; target 0), ``sources``,
``plugins``, ``seconds`` and ``target_met``. Multi-frame notices are logged to stderr.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

from medtransfer.data.decode import decode_image
from medtransfer.errors import DataError

PLUGINS = ("pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pyjpegls", "pydicom-data")


def corpus_roots(extra: list[Path]) -> dict[str, Path]:
    """Folders of DICOM files that are installed locally (no download)."""
    import pydicom.data

    roots = {"pydicom": Path(pydicom.data.__file__).parent / "test_files"}
    try:
        import data_store  # the pydicom-data package

        roots["pydicom-data"] = Path(data_store.__file__).parent / "data"
    except ImportError:
        pass
    roots.update({str(path): path for path in extra})
    return roots


def dicom_files(root: Path) -> list[Path]:
    def is_dicom_file(path: Path) -> bool:
        if path.suffix.lower() == ".dcm":
            return True
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"

    return sorted(p for p in root.rglob("*") if p.is_file() and is_dicom_file(p))


def pydicom_decodes(path: Path) -> bool:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pydicom.dcmread(path, force=True).pixel_array
        except Exception:
            return False
    return True


def medtransfer_decodes(path: Path, size: int) -> tuple[bool, str, int]:
    """(decoded, reason when not, warnings that escaped)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            decode_image(path, size=size)
        except DataError as exc:
            reason = str(exc).removeprefix(f"{path}: ").split("; fix or remove")[0]
            return False, reason, len(caught)
    return True, "", len(caught)


def reason_group(reason: str) -> str:
    return re.split(r" \(|[:;]", reason)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="decode size passed to decode_image")
    parser.add_argument("--extra", type=Path, nargs="*", default=[], help="more folders of DICOM files")
    args = parser.parse_args()

    start = time.perf_counter()
    roots = corpus_roots(args.extra)
    files = [(name, path) for name, root in roots.items() for path in dicom_files(root)]
    failures, only_ours, refused, leaked = [], [], Counter(), 0
    n_pydicom = n_ours = 0
    for name, path in files:
        label = f"{name}:{path.relative_to(roots[name])}"
        theirs = pydicom_decodes(path)
        ours, reason, escaped = medtransfer_decodes(path, args.size)
        n_pydicom += theirs
        n_ours += ours
        leaked += escaped
        if theirs and not ours:
            failures.append({"file": label, "reason": reason})
        if ours and not theirs:
            only_ours.append(label)
        if not ours:
            refused[reason_group(reason)] += 1
    result = {
        "files": len(files),
        "pydicom_decodes": n_pydicom,
        "medtransfer_decodes": n_ours,
        "failures": failures,
        "medtransfer_only": only_ours,
        "refused": dict(refused.most_common()),
        "warnings_leaked": leaked,
        "sources": {name: sum(1 for n, _ in files if n == name) for name in roots},
        "plugins": {p: _version(p) for p in PLUGINS},
        "seconds": round(time.perf_counter() - start, 2),
        "target_met": not failures and leaked == 0,
    }
    print(json.dumps(result))
    sys.stdout.flush()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
