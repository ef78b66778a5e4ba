"""model/ood.safetensors (tensors) + model/ood.json (method, thresholds, layers, what it was fitted on); no pickle.

ood.json's ``version``: 1 (or absent) for the first guard, penultimate ``mahalanobis`` and ``knn``
only; 2 adds ``layers`` and the ``multilayer`` score. Both load.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medtransfer.errors import WeightsError
from medtransfer.ood.detector import METHODS, PENULTIMATE_METHODS, OODDetector, _layer_key
from medtransfer.safeio import atomic_path, write_text_atomic

__all__ = ["FORMAT_VERSION", "OOD_JSON", "OOD_WEIGHTS", "load_detector", "save_detector"]

FORMAT_VERSION = 2
OOD_WEIGHTS = "ood.safetensors"
OOD_JSON = "ood.json"
_FIX = ("Restore the model folder from a backup, train the model again with `medtransfer train`, or delete ood.json "
        "and ood.safetensors to run without the guard.")
MAX_JSON_BYTES = 1 << 20  # ood.json is a few KB
_OWN_KEYS = ("version", "method", "thresholds", "k", "methods", "layers")


def save_detector(detector: OODDetector, model_dir: Path) -> None:
    """The tensors first, the JSON (which names them) last, each written atomically."""
    model_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(model_dir / OOD_WEIGHTS) as temporary:
        save_file({k: v.contiguous() for k, v in detector.tensors.items()}, str(temporary))
    payload = {"version": FORMAT_VERSION, "method": detector.method, "thresholds": detector.thresholds,
               "k": detector.k, "methods": list(detector.methods), "layers": list(detector.layers), **detector.info}
    write_text_atomic(model_dir / OOD_JSON, json.dumps(payload, indent=2))


def _expected_tensors(layers: list[str]) -> set[str]:
    names = {"mahalanobis.whitening", "mahalanobis.means", "knn.bank"}
    if layers:
        names |= {"multilayer.centre", "multilayer.scale"}
        names |= {_layer_key(layer, part) for layer in layers for part in ("whitening", "centres")}
    return names


def load_detector(model_dir: Path) -> OODDetector | None:
    """The saved detector, or None for a model saved before the guard existed (no ood.json)."""
    json_path = model_dir / OOD_JSON
    if not json_path.is_file():
        return None
    if json_path.stat().st_size > MAX_JSON_BYTES:
        raise WeightsError(f"{json_path}: {json_path.stat().st_size:,} bytes, more than an OOD detector file holds "
                           f"({MAX_JSON_BYTES:,}). {_FIX}")
    try:
        data = json.loads(json_path.read_text())
        version = int(data.get("version", 1))
        layers = [str(name) for name in data.get("layers", [])] if version >= 2 else []
        fitted = METHODS if layers else PENULTIMATE_METHODS
        method, k = data["method"], int(data["k"])
        thresholds = {m: float(data["thresholds"][m]) for m in fitted}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise WeightsError(f"{json_path}: not a valid OOD detector file ({type(exc).__name__}: {str(exc)[:120]}). {_FIX}") from None
    if version > FORMAT_VERSION:
        raise WeightsError(f"{json_path}: format version {version} is newer than this medtransfer reads "
                           f"({FORMAT_VERSION}); upgrade medtransfer")
    if method not in fitted:
        raise WeightsError(f"{json_path}: field 'method' must be one of {', '.join(fitted)}; got {str(method)[:60]!r}. {_FIX}")
    weights = model_dir / OOD_WEIGHTS
    if not weights.is_file():
        raise WeightsError(f"{weights}: missing (ood.json names it). {_FIX}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{weights}: truncated or corrupt, not a readable safetensors file "
                           f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}). {_FIX}") from None
    expected = _expected_tensors(layers)
    if set(tensors) != expected:
        raise WeightsError(f"{weights}: holds {_names(sorted(tensors))}; expected {_names(sorted(expected))}. {_FIX}")
    problem = _shape_problem(tensors, layers)
    if problem:
        raise WeightsError(f"{weights}: {problem}. {_FIX}")
    info = {key: value for key, value in data.items() if key not in _OWN_KEYS}
    return OODDetector(method, thresholds, tensors, k=k, layers=tuple(layers), info=info)


def _names(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _shape_problem(tensors: dict, layers: list[str]) -> str | None:
    """What makes the tensors unusable together (a whitening that is not square, widths that differ), or None."""
    groups: list[tuple[str, str, str | None]] = [("mahalanobis.whitening", "mahalanobis.means", "knn.bank")]
    groups += [(_layer_key(name, "whitening"), _layer_key(name, "centres"), None) for name in layers]
    for whitening, means, bank in groups:
        w, m = tensors[whitening], tensors[means]
        width = w.shape[0] if w.ndim == 2 and w.shape[0] == w.shape[1] else None
        if width is None or m.ndim != 2 or m.shape[1] != width or (bank and (tensors[bank].ndim != 2 or
                                                                           tensors[bank].shape[1] != width)):
            return f"tensors {whitening} {tuple(w.shape)} and {means} {tuple(m.shape)} do not fit together"
    if layers and any(tensors[f"multilayer.{part}"].shape != (1 + len(layers),) for part in ("centre", "scale")):
        return f"multilayer.centre/scale must hold {1 + len(layers)} values"
    return None
