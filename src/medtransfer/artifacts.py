"""The saved model: RUN/model/weights.safetensors + RUN/model/model.json.

Loading never unpickles: tensors come from safetensors, everything else from JSON. The
JSON carries what is needed to rebuild the network and preprocess an image exactly as
in evaluation (decode size, crop, normalisation), plus the decision threshold, the
positive class and the calibration temperature chosen on validation.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medtransfer.data.transforms import eval_transform
from medtransfer.errors import WeightsError
from medtransfer.models.backbones import create_backbone
from medtransfer.models.heads import apply_head
from medtransfer.models.strategies import TransferModel

MODEL_DIR = "model"
WEIGHTS_FILE = "weights.safetensors"
MODEL_JSON = "model.json"
FORMAT_VERSION = 1


@dataclass
class SavedModel:
    model: TransferModel
    info: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return self.info["classes"]

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.info["positive_class"])

    @property
    def threshold(self) -> float:
        return float(self.info["threshold"])

    @property
    def temperature(self) -> float:
        return float(self.info.get("temperature", 1.0))

    def transform(self):
        return eval_transform(
            image_size=self.info["image_size"],
            mean=self.info["mean"],
            std=self.info["std"],
            channels=self.info.get("in_channels", 3),
            crop_fraction=self.info["eval_crop_fraction"],
        )


def model_info(
    model: TransferModel,
    *,
    classes: list[str],
    positive_class: str,
    threshold: float,
    image_size: int,
    decode_size: int,
    temperature: float = 1.0,
    eval_crop_fraction: float = 0.875,
    in_channels: int = 3,
    output_stride: int = 32,
    **extra: Any,
) -> dict[str, Any]:
    """The model.json fields that load_model and SavedModel.transform rely on, plus `extra`.

    Backbone name and normalisation come from the model itself, so they cannot disagree with
    the weights.
    """
    return {
        "backbone": model.spec.name,
        "classes": list(classes),
        "positive_class": positive_class,
        "threshold": float(threshold),
        "temperature": float(temperature),
        "image_size": image_size,
        "decode_size": decode_size,
        "eval_crop_fraction": eval_crop_fraction,
        "mean": list(model.spec.normalization.mean),
        "std": list(model.spec.normalization.std),
        "in_channels": in_channels,
        "output_stride": output_stride,
        **extra,
    }


def versions() -> dict[str, str]:
    import lightning
    import timm
    import torchvision

    import medtransfer

    return {
        "medtransfer": medtransfer.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
    }


def save_model(model: TransferModel, info: dict[str, Any], run_dir: Path) -> Path:
    """Write weights and JSON; the JSON is written last so a half-saved model is never taken as whole."""
    model_dir = run_dir / MODEL_DIR
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    save_file(state, str(model_dir / WEIGHTS_FILE), metadata={"format": "medtransfer", "backbone": info["backbone"]})
    payload = {"format_version": FORMAT_VERSION, **info, "versions": versions()}
    temporary = model_dir / (MODEL_JSON + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2))
    temporary.replace(model_dir / MODEL_JSON)
    return model_dir


def find_model_dir(path: str | Path) -> Path:
    """Accept a run directory or its model/ directory."""
    path = Path(path)
    for candidate in (path / MODEL_DIR, path):
        if (candidate / MODEL_JSON).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    raise WeightsError(
        f"--run {path}: no saved model found (expected {path}/{MODEL_DIR}/{MODEL_JSON} and {WEIGHTS_FILE}); "
        "pass a folder written by `medtransfer train`"
    )


def load_model(path: str | Path) -> SavedModel:
    model_dir = find_model_dir(path)
    try:
        info = json.loads((model_dir / MODEL_JSON).read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"--run {path}: {model_dir / MODEL_JSON} is not valid JSON ({exc.msg})") from None
    net, spec = create_backbone(
        info["backbone"],
        num_classes=len(info["classes"]),
        weights="none",
        in_channels=info.get("in_channels", 3),
        output_stride=info.get("output_stride", 32),
    )
    apply_head(net, spec, info.get("head", "linear"))  # models saved before heads existed have a Linear one
    state = load_file(str(model_dir / WEIGHTS_FILE))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"--run {path}: weights do not fit {info['backbone']}: {str(exc).splitlines()[0]}") from None
    model = TransferModel(net, spec)
    model.eval()
    return SavedModel(model=model, info=info)
