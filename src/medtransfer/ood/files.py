"""model/ood.safetensors (tensors) + model/ood.json (method, thresholds, layers, what it was fitted on); no pickle.

ood.json's ``version``: 1 (or absent) for the first guard, penultimate ``mahalanobis`` and ``knn``
only; 2 adds ``layers`` and the ``multilayer`` score. Both load.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from medtransfer.errors import WeightsError
from medtransfer.ood.detector import METHODS, PENULTIMATE_METHODS, OODDetector, _layer_key
from medtransfer.safeio import atomic_path, write_text_atomic

__all__ = ["FORMAT_VERSION", "OOD_JSON", "OOD_WEIGHTS", "load_detector", "save_detector"]

FORMAT_VERSION = 2
OOD_WEIGHTS = "ood.safetensors"
OOD_JSON = "ood.json"
_FIX = "Train the model again with `medtransfer train`, or delete ood.json and ood.safetensors to run without the guard."
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
    try:
        data = json.loads(json_path.read_text())
        version = int(data.get("version", 1))
        layers = [str(name) for name in data.get("layers", [])] if version >= 2 else []
        fitted = METHODS if layers else PENULTIMATE_METHODS
        method, k = data["method"], int(data["k"])
        thresholds = {m: float(data["thresholds"][m]) for m in fitted}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise WeightsError(f"{json_path}: not a valid OOD detector file ({type(exc).__name__}: {exc}). {_FIX}") from None
    if version > FORMAT_VERSION:
        raise WeightsError(f"{json_path}: format version {version} is newer than this medtransfer reads "
                           f"({FORMAT_VERSION}); upgrade medtransfer")
    if method not in fitted:
        raise WeightsError(f"{json_path}: field 'method' must be one of {', '.join(fitted)}; got {method!r}. {_FIX}")
    weights = model_dir / OOD_WEIGHTS
    if not weights.is_file():
        raise WeightsError(f"{weights}: missing (ood.json names it). {_FIX}")
    tensors = load_file(str(weights))
    expected = _expected_tensors(layers)
    if set(tensors) != expected:
        raise WeightsError(f"{weights}: holds {sorted(tensors)}; expected {sorted(expected)}. {_FIX}")
    info = {key: value for key, value in data.items() if key not in _OWN_KEYS}
    return OODDetector(method, thresholds, tensors, k=k, layers=tuple(layers), info=info)
