"""model.json, field by field: parsers (each returns the typed value or raises ValueError, and the caller
names the field), the table of every field's parser, and the rules that tie fields together (task kind,
classes and operating point), which raise :class:`FieldError` naming the field.

Every value is bounded, so that a crafted file cannot make a reader allocate much before the weights are
checked: image sides up to MAX_IMAGE_SIZE (config.py, as for training), at most MAX_CLASSES classes or
findings and MAX_MEMBERS ensemble members, names and other text up to MAX_TEXT characters."""

from __future__ import annotations

import math
from typing import Any, Callable

from medtransfer.config import MAX_IMAGE_SIZE
from medtransfer.models.backbones import OUTPUT_STRIDES
from medtransfer.models.heads import HEADS
from medtransfer.models.inference import TTA_MODES
from medtransfer.task import MULTI_LABEL, SINGLE_LABEL, TASK_KINDS


MAX_CLASSES = 1000  # classes of a single-label model, or findings of a multi-label one
MAX_MEMBERS = 100  # weight files of a seed ensemble
MAX_TEXT = 200  # characters of a name (class, finding, backbone, layer) or other text value
MAX_LIST = 10_000  # items of any other list (frozen layers)


def real(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError
    return float(value)


def checked(convert: Callable[[Any], Any], ok: Callable[[Any], bool]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        converted = convert(value)
        if not ok(converted):
            raise ValueError
        return converted

    return parse


def integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError
    return value


def text(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        raise ValueError
    return value


def texts(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise ValueError
    return tuple(text(v) for v in value)


def reals(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise ValueError
    return tuple(real(v) for v in value)


def mapping(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError
    return value


# field -> (parser, what the value must be); the rules across fields are check_together's
PARSERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "backbone": (text, f"must be a backbone name (text of at most {MAX_TEXT} characters)"),
    "task": (checked(text, lambda t: t in TASK_KINDS), f"must be one of {', '.join(TASK_KINDS)}"),
    "classes": (checked(texts, lambda c: len(c) <= MAX_CLASSES),
                f"must be a list of at most {MAX_CLASSES} class (or finding) names of at most {MAX_TEXT} characters"),
    "positive_class": (text, "must be a class name (text)"),
    "threshold": (checked(real, lambda t: 0.0 <= t <= 1.0), "must be a number between 0 and 1"),
    "temperature": (checked(real, lambda t: t > 0.0), "must be a number > 0"),
    "thresholds": (reals, "must be a list of numbers between 0 and 1, one per finding"),
    "temperatures": (reals, "must be a list of numbers > 0, one per finding"),
    "image_size": (checked(integer, lambda n: 1 <= n <= MAX_IMAGE_SIZE), f"must be a whole number of pixels in [1, {MAX_IMAGE_SIZE}]"),
    "decode_size": (checked(integer, lambda n: 1 <= n <= MAX_IMAGE_SIZE), f"must be a whole number of pixels in [1, {MAX_IMAGE_SIZE}]"),
    "eval_crop_fraction": (checked(real, lambda f: 0.0 < f <= 1.0), "must be a number in (0, 1]"),
    "mean": (checked(reals, lambda m: len(m) in (1, 3)), "must be a list of 1 or 3 numbers"),
    "std": (checked(reals, lambda s: len(s) in (1, 3) and min(s) > 0), "must be a list of 1 or 3 numbers > 0"),
    "in_channels": (checked(integer, lambda n: n in (1, 3)), "must be 1 or 3"),
    "output_stride": (checked(integer, lambda n: n in OUTPUT_STRIDES),
                      f"must be one of {', '.join(map(str, OUTPUT_STRIDES))}"),
    "threshold_policy": (text, "must be a threshold policy (text, e.g. 'youden')"),
    "strategy": (text, "must be a strategy name (text)"),
    "frozen": (texts, "must be a list of layer names"),
    "training_config": (mapping, "must be an object of setting: value"),
    "versions": (mapping, "must be an object of package: version"),
    "head": (checked(text, lambda h: h in HEADS), f"must be one of {', '.join(HEADS)}"),
    "wise_ft": (mapping, "must be an object (alpha, criterion, grid, val_loss)"),
    "provenance": (mapping, "must be an object (trained, recalibrated)"),
    "tta": (checked(text, lambda t: t in TTA_MODES), f"must be one of {', '.join(TTA_MODES)}"),
    "members": (checked(texts, lambda m: 1 <= len(m) <= MAX_MEMBERS and all(n.endswith(".safetensors") and "/" not in n
                                                              for n in m) and len(set(m)) == len(m)),
                f"must be a list of distinct .safetensors file names in the model folder (1 to {MAX_MEMBERS})"),
    "border_crop": (checked(real, lambda f: 0.0 <= f < 0.5), "must be a fraction in [0, 0.5)"),
}

_SINGLE_ONLY = ("positive_class", "threshold", "temperature")
_MULTI_ONLY = ("thresholds", "temperatures")
_PER_FINDING = {"thresholds": (lambda t: 0.0 <= t <= 1.0, "numbers between 0 and 1"),
                "temperatures": (lambda t: t > 0.0, "numbers > 0")}


class FieldError(ValueError):
    """A field that breaks a rule across fields: its name and what it must be (``missing``: it is absent)."""

    def __init__(self, name: str, expected: str, *, missing: bool = False):
        super().__init__(f"{name} {expected}")
        self.name, self.expected, self.missing = name, expected, missing


def check_together(values: dict[str, Any]) -> None:
    """The rules across the parsed fields present in the file; raises FieldError for the first one broken.

    single-label (``task`` absent, as in every file from before multi-label): at least 2 classes,
    ``positive_class`` (one of them) and ``threshold`` required, no per-finding lists. multi-label: at
    least 1 finding, ``thresholds`` and ``temperatures`` with one value per finding, and none of the
    single-label operating point (``positive_class``, ``threshold``, ``temperature``).
    """
    classes = values["classes"]
    multilabel = values.get("task", SINGLE_LABEL) == MULTI_LABEL
    if len(classes) < (1 if multilabel else 2) or len(set(classes)) != len(classes):
        raise FieldError("classes", "must be a list of at least 1 distinct finding name" if multilabel
                         else "must be a list of at least 2 distinct class names")
    if multilabel:
        for name in _SINGLE_ONLY:
            if name in values:
                raise FieldError(name, "is for single-label models; a multi-label model has 'thresholds' and "
                                       "'temperatures', one per finding")
        for name, (ok, words) in _PER_FINDING.items():
            if name not in values:
                raise FieldError(name, "is missing; a multi-label model needs one per finding", missing=True)
            if len(values[name]) != len(classes) or not all(ok(v) for v in values[name]):
                raise FieldError(name, f"must be a list of {len(classes)} {words}, one per finding "
                                       f"({', '.join(classes)})")
    else:
        for name in ("positive_class", "threshold"):
            if name not in values:
                raise FieldError(name, "is missing", missing=True)
        if values["positive_class"] not in classes:
            raise FieldError("positive_class", f"must be one of the classes ({', '.join(classes)})")
        for name in _MULTI_ONLY:
            if name in values:
                raise FieldError(name, f"is only for multi-label models (task {MULTI_LABEL!r})")
    resize = values["image_size"] / values.get("eval_crop_fraction", 0.875)
    if resize > 2 * MAX_IMAGE_SIZE:
        raise FieldError("eval_crop_fraction", f"must leave image_size / eval_crop_fraction ({resize:.0f}) at most "
                                               f"{2 * MAX_IMAGE_SIZE} pixels")
    if len(values["std"]) != len(values["mean"]):
        raise FieldError("std", f"must have as many values as 'mean' ({len(values['mean'])})")
