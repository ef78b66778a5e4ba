"""One model copy per request slot: concurrent requests never share a module.

Grad-CAM registers a forward hook on the model and reads the activation the hook
captured; two requests on one model overwrite each other's activation (a heatmap of the
wrong image, or "does not depend on it"). A lock around one model would also fix that,
but it would serialise plain predictions behind every heatmap. Instead the server keeps
``max_concurrent`` deep copies, each placed on the device once at start-up (never a
``.to()`` per request); a request checks one out, owns it exclusively (hooks included)
and returns it. The admission limit (:mod:`medtransfer.serving.limits`) lets at most
``max_concurrent`` requests run, so a copy is always free; memory is bounded by
``max_concurrent`` x the model's size (45 MB for resnet18).

With ``runtime="onnxruntime"`` each slot also owns an onnxruntime session of the exported
model (with its share of the cores) that answers the predictions; Grad-CAM needs gradients,
which onnxruntime has not, so heatmaps still come from the slot's torch copy of the same
weights (on the CPU), drawn for the class onnxruntime predicted.

A multi-label model answers per finding: ``findings``, a list of ``{"finding", "probability",
"threshold", "positive"}`` sorted by probability (most probable first), ``predicted`` the
findings called (same order) and ``probabilities`` by finding; its heatmap is drawn for the most
probable finding (``cam_finding``).
"""

from __future__ import annotations

import base64
import copy
import io
import queue
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from medtransfer.artifacts import SavedModel
from medtransfer.explain.cam import ClassActivationMap
from medtransfer.explain.render import gray_from_pixels, overlay_picture, prediction_caption
from medtransfer.predict import Classifier, called_findings, decision_row
from medtransfer.runtime import available_cores

OOD_MESSAGE = "This image does not look like the training data: the prediction may be meaningless."


@dataclass
class Replica:
    saved: SavedModel
    classify: Classifier


class Replicas:
    """``count`` exclusive copies of ``saved`` on ``accelerator`` (or in onnxruntime with ``onnx_path``);
    :meth:`answer` is thread-safe."""

    def __init__(self, saved: SavedModel, *, count: int, accelerator: str = "cpu", onnx_path: Path | None = None) -> None:
        self.saved = saved
        self.free: queue.Queue[Replica] = queue.Queue()
        threads = max(1, available_cores() // count)  # onnxruntime: the slots share the cores instead of fighting
        for i in range(count):
            own = saved if i == 0 else copy.deepcopy(saved)  # every ensemble member and the detector
            self.free.put(Replica(own, Classifier.on(own, accelerator=accelerator, onnx_path=onnx_path, threads=threads)))
        self.runtime = "torch" if onnx_path is None else "onnxruntime"

    @contextmanager
    def checkout(self) -> Iterator[Replica]:
        replica = self.free.get()
        try:
            yield replica
        finally:
            self.free.put(replica)

    def answer(self, decoded: torch.Tensor, filename: str, *, cam: bool = False, cam_values: bool = False) -> dict:
        """The API's answer for one decoded image (uint8 C x H x W at the saved decode size)."""
        saved = self.saved
        cropped = saved.crop(decoded)
        image = saved.normalise(cropped)[None]
        multilabel = saved.task.multilabel
        with self.checkout() as replica:
            decision, scores = replica.classify.scored(image)  # scores: None without an OOD detector
            row = decision_row(saved, filename, decision, 0, scores)
            # the class shown, or for multi-label the most probable finding
            index = int(decision.probabilities[0].argmax() if multilabel else decision.predicted[0])
            heat = self._heatmap(replica, image, index) if cam or cam_values else None
        if multilabel:
            answer: dict[str, Any] = {"filename": filename, "task": saved.info.task, **per_finding(saved, decision)}
        else:
            answer = {
                "filename": filename,
                "predicted": row["pred"],
                "probabilities": {c: row[f"prob_{c}"] for c in saved.classes},
                "positive_class": saved.info.positive_class,
                "threshold": saved.threshold,
            }
        if "ood_score" in row:  # absent for a model saved without an OOD detector
            assert saved.ood is not None
            answer.update(ood_score=row["ood_score"], ood=row["ood"] == "out", ood_threshold=saved.ood.threshold)
            if answer["ood"]:
                answer["ood_message"] = OOD_MESSAGE
        if heat is not None:
            answer["cam_method"] = saved.cam_method  # the keys below keep their historical gradcam_ names
            if multilabel:
                answer["cam_finding"] = saved.classes[index]
                caption = finding_caption(answer["findings"][0])
            else:
                assert saved.threshold is not None, "a saved single-label model has a threshold (checked on load)"
                caption = prediction_caption(saved.classes, decision.probabilities[0], index,
                                             positive_index=saved.positive_index, threshold=saved.threshold)
            if cam:
                buffer = io.BytesIO()
                overlay_picture(gray_from_pixels(cropped), heat, caption).save(buffer, format="PNG")
                answer["gradcam_png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
            if cam_values:
                answer["gradcam_map"] = {"shape": list(heat.shape),
                                         "float32_base64": base64.b64encode(heat.astype("<f4").tobytes()).decode("ascii")}
        return answer

    @staticmethod
    def _heatmap(replica: Replica, image: torch.Tensor, index: int) -> np.ndarray:
        """The run's heatmap (Grad-CAM unless trained with another --cam-method) of the class shown to the
        user, on this request's own model copy."""
        x = image.to(replica.classify.device)
        with ClassActivationMap(replica.saved.model, method=replica.saved.cam_method,
                                multilabel=replica.saved.task.multilabel) as explain:
            result = explain(x, class_index=index)
        return result.maps[0].cpu().numpy().astype(np.float32)


def per_finding(saved: SavedModel, decision) -> dict[str, Any]:
    """A multi-label answer for the first image of `decision`: findings (every one, most probable first,
    with its threshold and whether it is called), predicted (the called ones) and probabilities by finding."""
    probabilities, predicted = decision.probabilities[0], decision.predicted[0]
    thresholds = saved.info.thresholds
    assert thresholds is not None, "a saved multi-label model has thresholds (checked on load)"
    order = sorted(range(len(saved.classes)), key=lambda k: -float(probabilities[k]))
    return {
        "findings": [{"finding": saved.classes[k], "probability": float(probabilities[k]),
                      "threshold": float(thresholds[k]), "positive": bool(predicted[k])} for k in order],
        "predicted": called_findings(saved.classes, probabilities, predicted),
        "probabilities": {c: float(probabilities[k]) for k, c in enumerate(saved.classes)},
    }


def finding_caption(entry: dict[str, Any]) -> str:
    """``Effusion p=0.81 (threshold 0.35)``, or ``Effusion p=0.20 < threshold 0.35`` when not called."""
    name, p, t = entry["finding"], entry["probability"], entry["threshold"]
    return f"{name} p={p:.2f} (threshold {t:.2f})" if entry["positive"] else f"{name} p={p:.2f} < threshold {t:.2f}"
