"""`medtransfer export`: the saved model as ONNX, checked against PyTorch with onnxruntime.

The graph takes a normalised image batch (N x C x H x W, float32) and returns both the raw
logits and the calibrated probabilities (softmax of logits / temperature), and, when the model
has an OOD detector, a third output ood_score (its threshold is "ood_threshold" in the
metadata; above it the image does not look like the training data), so a deployment
applies the threshold chosen on validation to exactly what `predict` reports. Everything
needed to preprocess and decide (classes, positive class, threshold, image size, crop,
mean/std) travels in the file's metadata as JSON under the key "medtransfer".

A multi-label model (metadata "task": "multi-label"; "classes" are its findings) has the same
outputs, but "probabilities" is sigmoid(logits_k / temperature_k) per finding, the per-finding
temperatures applied inside the graph; a finding is called where its probability reaches its
threshold, "thresholds" in the metadata (one per finding, in "classes" order, beside
"temperatures").

The graph is `SavedModel.network`: a seed ensemble's members and the test-time augmentation
views (models/inference.py) run inside it and their logits are averaged there, so a
deployment feeds the one evaluation crop and gets what `predict` reports.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medtransfer.artifacts import SavedModel, find_model_dir, load_model
from medtransfer.errors import ConfigError, WeightsError, missing_extra
from medtransfer.ood import ScoredModel

PREPROCESSING_KEYS = (
    "backbone", "classes", "positive_class", "threshold", "threshold_policy", "temperature", "image_size",
    "decode_size", "eval_crop_fraction", "mean", "std", "in_channels", "output_stride", "tta", "members",
    "border_crop", "task", "thresholds", "temperatures",
)


class CalibratedClassifier(nn.Module):
    """logits and softmax(logits / temperature), as `predict` computes them; with ``multilabel``,
    sigmoid(logits / temperature) where ``temperature`` holds one value per finding."""

    temperature: torch.Tensor  # a buffer (exported with the graph)

    def __init__(self, model: nn.Module, temperature: float | tuple[float, ...], *, multilabel: bool = False):
        super().__init__()
        self.model = model
        self.multilabel = multilabel
        self.register_buffer("temperature", torch.tensor(temperature, dtype=torch.float32))

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        scaled = logits / self.temperature  # multi-label: (findings,) broadcast over the batch
        return torch.sigmoid(scaled) if self.multilabel else torch.softmax(scaled, dim=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:  # (logits, probabilities)
        logits = self.model(image)
        return logits, self.calibrated(logits)


class ScoredCalibratedClassifier(CalibratedClassifier):
    """CalibratedClassifier plus a third output, ood_score (the saved OOD detector's, higher = more foreign)."""

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, score = self.model(image)
        return logits, self.calibrated(logits), score


def calibration_of(saved: SavedModel) -> dict:
    """CalibratedClassifier's settings for `saved`: its one temperature, or one per finding (multi-label)."""
    if saved.task.multilabel:
        assert saved.info.temperatures is not None, "a saved multi-label model has temperatures (checked on load)"
        return {"temperature": tuple(saved.info.temperatures), "multilabel": True}
    return {"temperature": float(saved.temperature)}


def export_onnx(run: str | Path, out: Path | None = None, *, opset: int = 17, tolerance: float = 1e-4) -> Path:
    """Write the ONNX file (default RUN/model/model.onnx) and verify it with onnxruntime."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise missing_extra("medtransfer export", "onnx") from None
    saved = load_model(run)
    out = out or find_model_dir(run) / "model.onnx"
    if out.suffix != ".onnx":
        raise ConfigError(f"--out {out}: name a .onnx file")
    out.parent.mkdir(parents=True, exist_ok=True)
    network = saved.network.eval()  # every ensemble member over every TTA view, averaged inside the graph
    if saved.ood is None:
        wrapper = CalibratedClassifier(network, **calibration_of(saved)).eval()
    else:  # an extra output ood_score (the first member's, evaluation crop); its threshold travels in the metadata
        wrapper = ScoredCalibratedClassifier(ScoredModel(network, saved.ood), **calibration_of(saved)).eval()
    outputs = ["logits", "probabilities"] + (["ood_score"] if saved.ood is not None else [])
    size = saved.info.image_size
    example = torch.randn(2, saved.info.in_channels, size, size)
    with warnings.catch_warnings():  # the TTA crops' sizes become constants: the graph's image size is fixed
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        _export(wrapper, example, out, outputs, opset)
    graph = onnx.load(str(out))
    entry = graph.metadata_props.add()
    info = saved.info.to_json()
    metadata = {k: info[k] for k in PREPROCESSING_KEYS if k in info}
    if saved.ood is not None:
        metadata.update(ood_method=saved.ood.method, ood_threshold=saved.ood.threshold)
    entry.key, entry.value = "medtransfer", json.dumps(metadata)
    onnx.save(graph, str(out))
    verify(saved, out, onnxruntime, tolerance=tolerance)
    return out


def _export(wrapper: nn.Module, example: torch.Tensor, out: Path, outputs: list[str], opset: int) -> None:
    torch.onnx.export(
        wrapper,
        (example,),
        str(out),
        input_names=["image"],
        output_names=outputs,
        dynamic_axes={name: {0: "batch"} for name in ["image", *outputs]},
        opset_version=opset,
        dynamo=False,  # the TorchScript exporter needs no extra packages and handles every registered backbone
    )


def verify(saved: SavedModel, path: Path, onnxruntime, *, tolerance: float) -> float:
    """Largest difference between onnxruntime's probabilities and SavedModel.decide's on a random batch."""
    size = saved.info.image_size
    batch = torch.randn(3, saved.info.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_probs = session.run(None, {"image": batch.numpy()})[1]
    with torch.no_grad():
        torch_probs = saved.decide(saved.network.eval()(batch)).probabilities
    difference = float(np.abs(onnx_probs - torch_probs).max())
    if difference > tolerance:
        raise WeightsError(f"--out {path}: ONNX probabilities differ from PyTorch by {difference:.2e} (> {tolerance:g})")
    if saved.ood is not None:
        onnx_scores = session.run(["ood_score"], {"image": batch.numpy()})[0]
        with torch.no_grad():
            torch_scores = ScoredModel(saved.network.eval(), saved.ood)(batch)[1].numpy()
        gap = float(np.abs(onnx_scores - torch_scores).max() / max(1.0, float(np.abs(torch_scores).max())))
        if gap > tolerance:
            raise WeightsError(f"--out {path}: ONNX ood_score differs from PyTorch by {gap:.2e} (> {tolerance:g})")
    return difference
