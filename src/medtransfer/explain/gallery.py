"""A CAM gallery for a run: the cases worth looking at, with their heatmaps.

:func:`write_gallery` reads ``RUN/predictions_<split>.csv`` (``path,label,prob_<class>...,
pred,patient_id``), picks per group the ``per_group`` most telling images and writes

- ``RUN/plots/gallery/<group>_<rank>_<method>.png``: the class activation map of the
  *predicted* class over the image as the model saw it (the centre crop), with a caption that names
  the labels and probabilities, never the file (the image's stem joins the file name only with
  ``keep_names``, as ``train --keep-identifiers`` asks: a stem often carries the patient ID);
- ``RUN/gallery.json``: ``{"sections": [{"title": str, "items": [{"image": "plots/gallery/...png",
  "caption": str}]}]}``, which :func:`medtransfer.evaluation.report.write_report` renders.

Groups, two classes (``p`` is the probability of the predicted class, the confidence):

- true positives, false positives, false negatives, true negatives, each sorted by ``p``
  from high to low (for the errors: the most confidently wrong first);
- top losses: highest cross-entropy ``-log p(true class)``.

More than two classes: the most confident correct images of each class, and the top losses.
A multi-label model (one decision per finding) has no such groups: :func:`write_gallery`
refuses it with a ConfigError that points to ``medtransfer explain --finding``.

Selection is a pure function (:func:`select_gallery`) of the prediction rows; images whose
files no longer exist are left out before selecting, so a group still fills up.

Example
-------
>>> from medtransfer.artifacts import load_model
>>> write_gallery(Path("runs/demo"), load_model("runs/demo"))  # doctest: +SKIP
PosixPath('runs/demo/gallery.json')
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.errors import ConfigError, DataError
from medtransfer.rundir import RunDir
from medtransfer.safeio import write_text_atomic

__all__ = ["GALLERY_DIR", "GALLERY_FILE", "GalleryGroup", "PredictionRow", "gallery_rows", "select_gallery", "write_gallery"]

GALLERY_FILE = "gallery.json"
GALLERY_DIR = Path("plots") / "gallery"
_MIN_PROBABILITY = 1e-12  # cross-entropy of a probability rounded to 0 stays finite


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one row, one rendering
class PredictionRow:
    """One line of a predictions CSV; ``probabilities`` maps every class to its probability."""

    path: Path
    label: str
    predicted: str
    probabilities: dict[str, float]

    @property
    def confidence(self) -> float:
        return self.probabilities[self.predicted]

    @property
    def loss(self) -> float:
        return -math.log(max(self.probabilities[self.label], _MIN_PROBABILITY))


@dataclass(frozen=True)
class GalleryGroup:
    key: str  # file-name prefix: "tp", "fp", "fn", "tn", "loss", "correct-<class>"
    title: str
    rows: tuple[PredictionRow, ...]


def gallery_rows(run_dir: Path, classes: Sequence[str], *, split: str = "test") -> list[PredictionRow] | None:
    """Rows of the run's ``predictions_<split>.csv`` (read by :class:`RunDir`) for a model with these ``classes``.

    A relative image path is taken as it stands when that file exists, else relative to the
    run directory. None when the run has no such file.

    Raises:
        DataError: a missing ``prob_<class>`` or ``pred`` column, or a class name the model does not have.
    """
    table = RunDir(run_dir).predictions(split)
    if table is None:
        return None
    missing = [c for c in [*(f"prob_{c}" for c in classes), "pred"] if c not in table.columns]
    if missing:
        raise DataError(
            f"{table.file}: missing column(s) {', '.join(missing)}; expected path,label,"
            f"{','.join(f'prob_{c}' for c in classes)},pred for the model's classes. Got: {','.join(table.columns)}"
        )
    assert table.predicted is not None  # its "pred" column was checked above
    rows = []
    for line, (path, label, predicted) in enumerate(zip(table.paths, table.labels, table.predicted), start=2):
        for key, value in (("label", label), ("pred", predicted)):
            if value not in classes:
                raise DataError(f"{table.file}, line {line}: {key} {value!r} is not one of the model's classes {list(classes)}")
        image = Path(path)
        if not image.is_absolute() and not image.exists():
            image = Path(run_dir) / image
        probabilities = {c: float(table.probability(c)[line - 2]) for c in classes}
        rows.append(PredictionRow(image, label, predicted, probabilities))
    return rows


def select_gallery(
    rows: Sequence[PredictionRow], classes: Sequence[str], *, positive_class: str | None = None, per_group: int = 4
) -> list[GalleryGroup]:
    """The groups of a gallery (see the module docstring); empty groups are left out.

    Ties are broken by path, so the choice is deterministic.
    """
    if per_group < 1:
        raise ConfigError(f"--per-group: got {per_group}; use 1 or more")
    classes = list(classes)

    def top(candidates: Sequence[PredictionRow], key) -> tuple[PredictionRow, ...]:
        ordered = sorted(candidates, key=lambda r: (-key(r), str(r.path)))
        return tuple(ordered[:per_group])

    groups: list[GalleryGroup] = []
    if len(classes) == 2:
        positive = positive_class if positive_class is not None else classes[1]
        if positive not in classes:
            raise ConfigError(f"positive class {positive!r} is not one of {classes}")
        negative = classes[1 - classes.index(positive)]
        cells = (
            ("tp", "True positives", positive, positive),
            ("fp", "False positives", negative, positive),
            ("fn", "False negatives", positive, negative),
            ("tn", "True negatives", negative, negative),
        )
        for key, name, label, predicted in cells:
            chosen = top([r for r in rows if r.label == label and r.predicted == predicted], lambda r: r.confidence)
            wrong = label != predicted
            title = f"{name}: {label} predicted {predicted}, most {'confidently wrong' if wrong else 'confident'}"
            groups.append(GalleryGroup(key, title, chosen))
    else:
        for name in classes:
            chosen = top([r for r in rows if r.label == name and r.predicted == name], lambda r: r.confidence)
            groups.append(GalleryGroup(f"correct-{name}", f"Correct {name}, most confident", chosen))
    groups.append(GalleryGroup("loss", "Top losses: highest cross-entropy -log p(true class)", top(rows, lambda r: r.loss)))
    return [g for g in groups if g.rows]


def caption(row: PredictionRow, classes: Sequence[str], *, positive_class: str, threshold: float, loss: bool = False) -> str:
    """``true PNEUMONIA, predicted NORMAL, p(PNEUMONIA)=0.12 (threshold 0.41)`` (binary);
    ``true a, predicted b, p(b)=0.70`` (more classes); ``, loss 2.12`` appended for top losses."""
    text = f"true {row.label}, predicted {row.predicted}, "
    if len(classes) == 2:
        text += f"p({positive_class})={row.probabilities[positive_class]:.2f} (threshold {threshold:.2f})"
    else:
        text += f"p({row.predicted})={row.confidence:.2f}"
        if loss and row.label != row.predicted:
            text += f", p({row.label})={row.probabilities[row.label]:.2f}"
    if loss:
        text += f", loss {row.loss:.2f}"
    return text


def write_gallery(
    run_dir: Path, saved_model: Any, *, per_group: int = 4, method: str = "gradcam", split: str = "test",
    data_root: str | Path | None = None, keep_names: bool = False,
) -> Path | None:
    """Write the CAM gallery of ``run_dir`` for one split; return the ``gallery.json`` path.

    Returns ``None`` (and writes nothing) when ``run_dir/predictions_<split>.csv`` is absent
    or none of its images exists any more. PNGs left in ``run_dir/plots/gallery`` by an
    earlier call are removed first, so the folder matches ``gallery.json``.

    Args:
        run_dir: the run (or evaluation) directory.
        saved_model: :class:`~medtransfer.artifacts.SavedModel` that wrote the predictions;
            its preprocessing, classes, positive class and threshold are used (single-label
            only: a multi-label model raises ConfigError).
        per_group: images per group.
        method: one of :data:`~medtransfer.explain.cam.METHODS` (training passes its ``cam_method``).
        split: which ``predictions_<split>.csv`` to read.
        data_root: the dataset folder; an image with a lesion mask at
            ``data_root/masks/<split>/<CLASS>/<stem>.png`` (as the synthetic data has) gets the
            mask's outline drawn in white, through the same crop as the image.
        keep_names: put each image's file stem into its PNG's name (default: group, rank and method only).
    """
    from medtransfer.explain.cam import METHODS
    from medtransfer.explain.files import is_multilabel
    from medtransfer.explain.render import save_overlay

    if method not in METHODS:
        raise ConfigError(f"--method: got {method!r}; choose one of {', '.join(METHODS)}")
    if is_multilabel(saved_model):
        raise ConfigError(
            f"the report gallery groups images by one predicted class; this model is multi-label (findings "
            f"{', '.join(saved_model.classes)}): draw heatmaps per finding with `medtransfer explain IMAGES --run "
            f"{run_dir} --finding NAME`"
        )
    run_dir = Path(run_dir)
    classes = list(saved_model.classes)
    positive = classes[saved_model.positive_index]
    threshold = saved_model.threshold
    all_rows = gallery_rows(run_dir, classes, split=split)
    if all_rows is None:
        return None
    rows = [r for r in all_rows if r.path.is_file()]
    groups = select_gallery(rows, classes, positive_class=positive, per_group=per_group)
    if not groups:
        return None

    out_dir = run_dir / GALLERY_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.png"):
        stale.unlink()
    unique = list(dict.fromkeys(r for g in groups for r in g.rows))
    rendered, layer, cells = _render(saved_model, unique, method=method)

    sections = []
    for group in groups:
        items = []
        for rank, row in enumerate(group.rows, start=1):
            text = caption(row, classes, positive_class=positive, threshold=threshold, loss=group.key == "loss")
            stem = f"_{_safe(row.path.stem)}" if keep_names else ""
            name = f"{_safe(group.key)}_{rank:02d}{stem}_{method}.png"
            shown, heat = rendered[row]
            outline = lesion_outline(saved_model, row.path, data_root) if data_root else None
            save_overlay(out_dir / name, shown, heat, text, outline=outline)
            items.append({"image": (GALLERY_DIR / name).as_posix(), "caption": text})
        sections.append({"title": f"{group.title} ({split} split)", "items": items})
    gallery = {
        "sections": sections,
        "method": method,
        "target_layer": layer,
        "map_cells": list(cells),
        "input_size": saved_model.info.image_size,
        "split": split,
        "explained_class": "predicted",
        "threshold": threshold,
        "positive_class": positive,
        "outlines": "lesion masks" if data_root else None,
    }
    path = run_dir / GALLERY_FILE
    return write_text_atomic(path, json.dumps(gallery, indent=2))


def _render(
    saved_model: Any, rows: Sequence[PredictionRow], *, method: str, batch_size: int = 8
) -> tuple[dict[PredictionRow, tuple[np.ndarray, np.ndarray]], str, tuple[int, int]]:
    """(image as the model saw it, map of the predicted class) per row, preprocessed as explain_files
    does; with the target layer and the map's cells (h, w)."""
    from medtransfer.explain.cam import ClassActivationMap
    from medtransfer.explain.files import prepare_images

    classes = list(saved_model.classes)
    out: dict[PredictionRow, tuple[np.ndarray, np.ndarray]] = {}
    cells = (0, 0)
    with ClassActivationMap(saved_model.model, method=method) as cam:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            shown, images = prepare_images(saved_model, [row.path for row in batch])
            result = cam(images, class_index=[classes.index(r.predicted) for r in batch])
            maps = result.maps.cpu().numpy().astype(np.float32)
            cells = result.map_cells
            for i, row in enumerate(batch):
                out[row] = (shown[i], maps[i])
    return out, cam.target_layer, cells


def lesion_outline(saved_model: Any, image: Path, data_root: str | Path) -> np.ndarray | None:
    """The image's lesion mask as the model sees it (decoded, cropped as the image), or None without one."""
    from medtransfer.data.synthetic import lesion_mask_path

    mask = lesion_mask_path(image, Path(data_root))
    if mask is None:
        return None
    return saved_model.crop(saved_model.decode(mask))[0].numpy() >= 128


def _safe(text: str) -> str:
    """A file-name fragment: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "image"
