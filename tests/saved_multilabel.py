"""Test helper: a random-weight multi-label model (one sigmoid per finding) saved as training will save it."""

from __future__ import annotations

from pathlib import Path

import torch

from medtransfer.artifacts import model_info, save_model
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import TransferModel

FINDINGS = ["Atelectasis", "Effusion", "Mass", "Nodule"]
# Finding 0 is always called (threshold 0), finding 2 never (threshold 1): rows always call something and never all.
THRESHOLDS = [0.0, 0.45, 1.0, 0.55]
TEMPERATURES = [1.0, 0.5, 2.0, 1.5]


def save_multilabel_model(folder: Path, findings: list[str] = FINDINGS, *, thresholds: list[float] = THRESHOLDS,
                          temperatures: list[float] = TEMPERATURES, seed: int = 5, **settings) -> Path:
    """resnet18, random init, len(findings) outputs, saved under folder/model; returns `folder`."""
    torch.manual_seed(seed)
    net, spec = create_backbone("resnet18", num_classes=len(findings), weights="none")
    model = TransferModel(net, spec)
    settings = {"image_size": 40, "decode_size": 48, **settings}
    info = model_info(model, classes=findings, positive_class=None, threshold=None, task="multi-label",
                      thresholds=thresholds, temperatures=temperatures, **settings)
    save_model(model, info, folder)
    return folder
