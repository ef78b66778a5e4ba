"""The saved model: RUN/model/weights.safetensors + RUN/model/model.json.

Loading never unpickles: tensors come from safetensors, everything else from JSON. The
JSON (:class:`ModelInfo`) carries what is needed to rebuild the network and preprocess an
image exactly as in evaluation (decode size, crop, normalisation), plus the operating point
chosen on validation: the calibration temperature, the decision threshold and the positive
class, or for a multi-label model (``task``: ``multi-label``, one sigmoid per finding) one
temperature and one threshold per finding. :class:`SavedModel` turns an image into the model's input (:meth:`SavedModel.preprocess`)
and logits into a decision (:meth:`SavedModel.decide`), so predict, export, serve, explain
and the benchmarks prepare and decide one way.

    >>> saved = load_model("runs/demo")  # doctest: +SKIP
    >>> decision = saved.decide(saved.model(saved.preprocess("xray.png")[None]))  # doctest: +SKIP
    >>> saved.classes[decision.predicted[0]], decision.probabilities[0]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import io
import json
import platform
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms import v2

from medtransfer.artifacts.fields import PARSERS, FieldError, check_together
from medtransfer.data.datamodule import image_tensor
from medtransfer.data.decode import decode_image
from medtransfer.data.transforms import eval_transform, with_border_crop
from medtransfer.errors import ConfigError, DataError, MedtransferError, WeightsError
from medtransfer.models.inference import check_tta, inference_network, load_member
from medtransfer.models.strategies import TransferModel
from medtransfer.ood import OODDetector, load_detector
from medtransfer.safeio import atomic_path, write_text_atomic
from medtransfer.task import MULTI_LABEL, SINGLE_LABEL, Task

MODEL_DIR = "model"
WEIGHTS_FILE = "weights.safetensors"
MODEL_JSON = "model.json"
FORMAT_VERSION = 1
MAX_JSON_BYTES = 4 << 20  # model.json is a few KB; a larger file is not one medtransfer wrote
_FIX = "Correct the field, or train the model again with `medtransfer train`."

ImageSource = str | Path | bytes | np.ndarray


# ---------------------------------------------------------------------- model.json


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """model.json, typed. Field order is the file's key order; optional fields that are None are not written.

    Defaults exist only for fields that older model.json files may lack (output_stride came
    with the dilated backbones, task with multi-label models; the rest is description, not needed
    to predict), and for the operating point of the other task kind: a single-label model has
    positive_class, threshold and temperature; a multi-label one (``classes`` are its findings) has
    thresholds and temperatures instead, one per finding in ``classes`` order. ``task`` is written
    only for multi-label, so single-label files stay as they were.
    """

    backbone: str
    task: str = SINGLE_LABEL  # medtransfer.task: single-label (softmax) or multi-label (one sigmoid per finding)
    classes: tuple[str, ...]
    positive_class: str | None = None  # single-label only (required there)
    threshold: float | None = None  # single-label: on the temperature-scaled probability of positive_class
    temperature: float = 1.0  # single-label; not written for multi-label
    thresholds: tuple[float, ...] | None = None  # multi-label: on sigmoid(logit_k / temperatures[k]), per finding
    temperatures: tuple[float, ...] | None = None  # multi-label: one per finding
    image_size: int
    decode_size: int  # side of the decoded (cached) image, before resize + centre crop
    eval_crop_fraction: float = 0.875
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_channels: int = 3
    output_stride: int = 32
    threshold_policy: str | None = None  # how the threshold was chosen on validation, e.g. "youden"
    strategy: str | None = None
    frozen: tuple[str, ...] | None = None
    training_config: dict[str, Any] | None = None
    versions: dict[str, str] | None = None  # filled in by save_model
    head: str | None = None  # models/heads.py, rebuilt on load; None (files from before heads): linear
    wise_ft: dict[str, Any] | None = None  # WiSE-FT mixing chosen on validation (train/wise_ft.py)
    provenance: dict[str, Any] | None = None  # where a recalibrated model came from (trained, recalibrated)
    # test-time augmentation and seed ensembles (models/inference.py): the views averaged, and the weight
    # files of every member in order (None: one model, weights.safetensors); older files lack both
    tta: str = "none"
    members: tuple[str, ...] | None = None
    border_crop: float | None = None  # fraction cut off each side of the decoded image first (train --border-crop); None: 0

    @property
    def task_object(self) -> Task:
        """The task (medtransfer.task.Task): what the outputs mean and how they are decided."""
        return Task(self.task, self.classes)

    @property
    def positive_index(self) -> int:
        if self.positive_class is None:
            raise ConfigError(f"a {self.task} model has no positive class or single threshold: it decides per finding "
                              f"({', '.join(self.classes)}); this step supports single-label models only")
        return self.classes.index(self.positive_class)

    def to_json(self) -> dict[str, Any]:
        """The JSON object (lists for tuples; None fields left out), without format_version.
        ``task`` single-label (the default) and a multi-label model's unused temperature 1.0 are left out too."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (value is None or (f.name == "task" and value == SINGLE_LABEL)
                    or (f.name == "temperature" and self.task == MULTI_LABEL and value == 1.0)):
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, data: Any, *, source: str | Path) -> ModelInfo:
        """Validate a parsed model.json; every problem is a WeightsError naming source, field and value."""
        if not isinstance(data, dict):
            raise WeightsError(f"{source}: must hold a JSON object; got {type(data).__name__}. {_FIX}")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise WeightsError(
                f"{source}: field 'format_version' must be {FORMAT_VERSION}; got {version!r}. "
                "The model was written by another medtransfer version; load it with that version or train again."
            )
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                if f.default is dataclasses.MISSING:
                    raise WeightsError(f"{source}: field {f.name!r} is missing. {_FIX}")
                continue
            parse, expected = PARSERS[f.name]
            try:
                values[f.name] = parse(data[f.name])
            except (TypeError, ValueError):
                raise _field_error(source, f.name, expected, data[f.name]) from None
        try:
            check_together(values)  # task kind, classes, operating point
        except FieldError as problem:
            if problem.missing:
                raise WeightsError(f"{source}: field {problem.name!r} {problem.expected}. {_FIX}") from None
            raise _field_error(source, problem.name, problem.expected, data[problem.name]) from None
        return cls(**values)


def _field_error(source: str | Path, name: str, expected: str, value: Any) -> WeightsError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return WeightsError(f"{source}: field {name!r} {expected}; got {shown}. {_FIX}")


def model_info(
    model: TransferModel,
    *,
    classes: list[str],
    positive_class: str | None = None,
    threshold: float | None = None,
    image_size: int,
    decode_size: int,
    temperature: float = 1.0,
    eval_crop_fraction: float = 0.875,
    in_channels: int = 3,
    output_stride: int = 32,
    threshold_policy: str | None = None,
    strategy: str | None = None,
    frozen: list[str] | None = None,
    training_config: dict[str, Any] | None = None,
    head: str | None = None,
    wise_ft: dict[str, Any] | None = None,
    tta: str = "none",
    border_crop: float = 0.0,
    task: str = SINGLE_LABEL,
    thresholds: list[float] | None = None,
    temperatures: list[float] | None = None,
) -> ModelInfo:
    """The ModelInfo of `model`: backbone name and normalisation come from the model itself,
    so they cannot disagree with the weights. Single-label: `positive_class` and `threshold` (and
    `temperature`); multi-label (`classes` are the findings): `thresholds` and `temperatures`, one
    per finding, and no positive class or threshold. save_model checks the result as load_model does."""
    return ModelInfo(
        backbone=model.spec.name,
        task=task,
        classes=tuple(classes),
        positive_class=positive_class,
        threshold=None if threshold is None else float(threshold),
        temperature=float(temperature),
        thresholds=None if thresholds is None else tuple(float(t) for t in thresholds),
        temperatures=None if temperatures is None else tuple(float(t) for t in temperatures),
        image_size=image_size,
        decode_size=decode_size,
        eval_crop_fraction=eval_crop_fraction,
        mean=tuple(model.spec.normalization.mean),
        std=tuple(model.spec.normalization.std),
        in_channels=in_channels,
        output_stride=output_stride,
        threshold_policy=threshold_policy,
        strategy=strategy,
        frozen=None if frozen is None else tuple(frozen),
        training_config=training_config,
        head=head,
        wise_ft=wise_ft,
        tta=tta,
        border_crop=float(border_crop) or None,  # 0 is not written: model.json stays as before the setting
    )


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


# ---------------------------------------------------------------------- the saved model


@dataclass(frozen=True)
class Decision:
    """What the saved operating point makes of a batch of logits."""

    probabilities: np.ndarray  # (n, classes) float64: softmax(logits / T); multi-label sigmoid(logit_k / T_k)
    predicted: np.ndarray  # (n,) class indices; multi-label (n, findings) 0/1 int: probability >= threshold_k


@dataclass
class SavedModel:
    model: TransferModel
    info: ModelInfo
    ood: OODDetector | None = None  # model/ood.*; None for a model saved before the OOD guard
    extra: tuple[TransferModel, ...] = ()  # the other members of a seed ensemble (`model` is the first)

    @cached_property
    def network(self) -> torch.nn.Module:
        """What predicts: the members over the TTA views, logits averaged (`model` itself for one model
        without TTA). `model` stays the first member alone, for CAMs and the OOD features."""
        return inference_network([self.model, *self.extra], self.info.tta)

    def with_tta(self, tta: str | None) -> SavedModel:
        """This model with another TTA setting (None: as saved); the saved operating point is kept."""
        if tta is None or check_tta(tta) == self.info.tta:
            return self
        return SavedModel(self.model, dataclasses.replace(self.info, tta=tta), self.ood, self.extra)

    @property
    def classes(self) -> list[str]:
        return list(self.info.classes)

    @property
    def task(self) -> Task:
        return self.info.task_object

    @property
    def positive_index(self) -> int:
        return self.info.positive_index

    @property
    def threshold(self) -> float | None:
        """The single-label threshold (None for multi-label: info.thresholds, one per finding)."""
        return self.info.threshold

    @property
    def cam_method(self) -> str:
        """The heatmap method the run was trained to draw (`train --cam-method`): explain, predict --cam,
        shortcuts and serve default to it, so they show what the report's gallery showed."""
        method = (self.info.training_config or {}).get("cam_method")
        return method if isinstance(method, str) and method else "gradcam"

    @property
    def temperature(self) -> float:
        return self.info.temperature

    def transform(self) -> v2.Compose:
        """The evaluation transform: uint8 C x H x W at decode size -> normalised float model input."""
        return with_border_crop(eval_transform(
            image_size=self.info.image_size,
            mean=self.info.mean,
            std=self.info.std,
            channels=self.info.in_channels,
            crop_fraction=self.info.eval_crop_fraction,
        ), self.info.border_crop or 0.0)

    @cached_property
    def _halves(self) -> tuple[v2.Compose, v2.Compose]:
        steps = list(self.transform().transforms)
        cut = next(i for i, step in enumerate(steps) if isinstance(step, v2.ToDtype))
        return v2.Compose(steps[:cut]), v2.Compose(steps[cut:])

    def decode(self, source: ImageSource) -> torch.Tensor:
        """uint8 C x H x W at the saved decode size, as the cache stores it (evaluation's input).

        `source` is a file path, the file's bytes, or a uint8 (or 16-bit grayscale) H x W [x 3]
        array, which is decoded as the PNG file it would be saved as.
        """
        if isinstance(source, np.ndarray):
            source = _png_bytes(source)
        return image_tensor(decode_image(source, size=self.info.decode_size))

    def crop(self, decoded: torch.Tensor) -> torch.Tensor:
        """The image as the model sees it, still uint8: border crop, resize, centre crop, channels matched."""
        return self._halves[0](decoded)

    def normalise(self, cropped: torch.Tensor) -> torch.Tensor:
        """crop()'s output -> the float model input (scaled to [0, 1], then mean/std normalised)."""
        return self._halves[1](cropped)

    def preprocess(self, source: ImageSource) -> torch.Tensor:
        """One image -> float C x image_size x image_size, bit for bit what evaluation feeds the model."""
        return self.normalise(self.crop(self.decode(source)))

    def decide(self, logits: np.ndarray | torch.Tensor) -> Decision:
        """Probabilities softmax(logits / temperature); predicted class by the saved operating point.
        Multi-label: sigmoid(logit_k / temperatures[k]) per finding, predicted 1 where it reaches thresholds[k]."""
        if isinstance(logits, torch.Tensor):
            logits = logits.detach().float().cpu().numpy()
        if self.info.task == MULTI_LABEL:
            task, temperatures, thresholds = self.task, self.info.temperatures, self.info.thresholds
            assert temperatures is not None and thresholds is not None  # checked on save and load
            probabilities = task.probabilities(logits, temperatures)
            return Decision(probabilities, task.decide(probabilities, thresholds))
        assert self.info.threshold is not None  # checked on save and load
        probabilities = calibrated_probabilities(logits, self.info.temperature)
        return Decision(probabilities, predicted_classes(probabilities, self.info.positive_index, self.info.threshold))


def calibrated_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) per row, in float64 (a stable log-softmax)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise DataError(f"logits must be an (n, classes) array with 2 or more classes; got shape {z.shape}")
    z = z / temperature
    z = z - z.max(axis=1, keepdims=True)
    return np.exp(z - np.log(np.exp(z).sum(axis=1, keepdims=True)))


def predicted_classes(probabilities: np.ndarray, positive_index: int, threshold: float) -> np.ndarray:
    """Two classes: the positive one when its probability reaches the threshold, else the other.
    More classes: the argmax (the threshold then applies to positive-vs-rest metrics only)."""
    if probabilities.shape[1] == 2:
        return np.where(probabilities[:, positive_index] >= threshold, positive_index, 1 - positive_index)
    return probabilities.argmax(axis=1)


def _png_bytes(array: np.ndarray) -> bytes:
    try:
        image = Image.fromarray(array)
    except (TypeError, ValueError):
        raise DataError(
            f"image array: got shape {array.shape}, dtype {array.dtype}; pass uint8 H x W or H x W x 3 (or uint16 H x W)"
        ) from None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------- files


def save_model(model: TransferModel, info: ModelInfo, run_dir: Path, *, extra: tuple[TransferModel, ...] = ()) -> Path:
    """Write weights and model.json (the one writer of that file). The JSON is written last, so a
    half-saved model is never taken as whole, and is checked as load_model checks it. `extra`:
    the other members of a seed ensemble, written as member_2.safetensors, ... and listed in "members"."""
    model_dir = run_dir / MODEL_DIR
    model_dir.mkdir(parents=True, exist_ok=True)
    files = (WEIGHTS_FILE, *(f"member_{i}.safetensors" for i in range(2, len(extra) + 2)))
    info = dataclasses.replace(info, versions=versions(), members=files if extra else None)
    payload = {"format_version": FORMAT_VERSION, **info.to_json()}
    ModelInfo.from_json(payload, source=model_dir / MODEL_JSON)
    for member, name in zip((model, *extra), files):
        state = {k: v.detach().cpu().contiguous() for k, v in member.net.state_dict().items()}
        with atomic_path(model_dir / name) as temporary:  # never overwrite weights in place
            save_file(state, str(temporary), metadata={"format": "medtransfer", "backbone": info.backbone})
    write_text_atomic(model_dir / MODEL_JSON, json.dumps(payload, indent=2))
    return model_dir


def replace_fields(model_dir: Path, **fields: Any) -> bool:
    """Rewrite model.json with other values of descriptive `fields` (training_config, provenance; None: left out),
    every other key as it was; checked as load_model checks it, written atomically. False when nothing changed."""
    json_path = model_dir / MODEL_JSON
    read_model_info(model_dir)  # the checks (size, JSON, fields) before anything is written
    payload = json.loads(json_path.read_text())
    changed = {**payload, **fields}
    changed = {k: v for k, v in changed.items() if v is not None or k not in fields}
    if changed == payload:
        return False
    ModelInfo.from_json(changed, source=json_path)
    write_text_atomic(json_path, json.dumps(changed, indent=2))
    return True


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


def read_model_info(model_dir: Path) -> ModelInfo:
    json_path = model_dir / MODEL_JSON
    if json_path.stat().st_size > MAX_JSON_BYTES:
        raise WeightsError(f"{json_path}: {json_path.stat().st_size:,} bytes, more than a model.json holds "
                           f"({MAX_JSON_BYTES:,}); restore the model folder from a backup or train again")
    try:
        data = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = f"{exc.msg}, line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise WeightsError(f"{json_path}: not valid JSON ({reason}). {_FIX}") from None
    return ModelInfo.from_json(data, source=json_path)


def load_model(path: str | Path) -> SavedModel:
    """The saved model of a run (or model) folder. Every file is checked before the network is built:
    model.json's values are bounded (fields.py), each weight file's header must hold the tensors of the
    declared architecture (shapes compared on the meta device), and a truncated or corrupt file is a
    WeightsError naming it and what to do."""
    model_dir = find_model_dir(path)
    info = read_model_info(model_dir)
    members = []
    for name in info.members or (WEIGHTS_FILE,):  # a seed ensemble lists every member's weights
        try:
            members.append(load_member(
                model_dir / name, backbone=info.backbone, num_classes=len(info.classes), in_channels=info.in_channels,
                output_stride=info.output_stride, head=info.head or "linear", source=str(path),
            ))
        except WeightsError:
            raise
        except MedtransferError as exc:
            raise WeightsError(f"{model_dir / MODEL_JSON}: field 'backbone' {info.backbone!r}: {exc}") from None
    ood = load_detector(model_dir)
    for layer in ood.layers if ood is not None else ():
        try:
            members[0].net.get_submodule(layer)
        except AttributeError:
            raise WeightsError(f"{model_dir}/ood.json: layer {layer[:80]!r} is not a layer of {info.backbone}; restore the "
                               "model folder from a backup, or delete ood.json and ood.safetensors") from None
    return SavedModel(model=members[0], info=info, ood=ood, extra=tuple(members[1:]))
