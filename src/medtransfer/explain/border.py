"""Shortcut check: how much of the heatmap evidence lies in the image border.

A classifier that reads a hospital's marker, burnt-in text or a collimator edge instead of
the lungs puts its evidence at the edge of the image. For each image, the map of the
predicted class (the run's cam_method, Grad-CAM by default, as the gallery draws it, on the image as the model saw
it) is split into the outer band (``band`` = 10% of the side on each edge: 36% of the area)
and its four corner squares (4% of the area). The share of the map's positive mass in the
band is compared with the band's share of the area: an image whose band share is more than
``level`` (2) times the area share (0.72 of the mass in 36% of the area) is flagged.

A multi-label model (one sigmoid and threshold per finding) has no single predicted class: each
image is measured on the map of its top finding, the one whose calibrated probability lies
furthest above its threshold (or, when none reaches it, closest below it).

Bounded: at most ``limit`` images (default 200, spread evenly over the sorted split) are
explained, one forward and backward pass each.

>>> import numpy as np
>>> heat = np.zeros((10, 10)); heat[0, 0] = 1.0  # all evidence in the top-left corner
>>> border_shares(heat[None], band=0.1)
(array([1.]), array([1.]))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from medtransfer.errors import ConfigError

__all__ = ["BAND", "LEVEL", "LIMIT", "band_masks", "border_shares", "measure_border_evidence", "write_border_evidence"]

BAND = 0.10  # outer band: this fraction of the side on each edge
LEVEL = 2.0  # flagged: band evidence share above LEVEL x the band's area share
LIMIT = 200  # images explained at most (training's last step stays bounded)
WORST = 8  # images in the gallery of the worst cases
BORDER_DIR = Path("plots") / "border"


def band_masks(height: int, width: int, band: float = BAND) -> tuple[np.ndarray, np.ndarray]:
    """Boolean H x W masks of the outer band (``band`` of each side) and of its four corner squares."""
    if not 0.0 < band < 0.5:
        raise ConfigError(f"--band: got {band}; expected a fraction in (0, 0.5), e.g. 0.1")
    rows = np.arange(height)
    cols = np.arange(width)
    edge_rows = (rows < round(height * band)) | (rows >= height - round(height * band))
    edge_cols = (cols < round(width * band)) | (cols >= width - round(width * band))
    return edge_rows[:, None] | edge_cols[None, :], edge_rows[:, None] & edge_cols[None, :]


def border_shares(maps: np.ndarray, band: float = BAND) -> tuple[np.ndarray, np.ndarray]:
    """(band share, corner share) of each N x H x W map's positive mass; 0 for a map with none."""
    maps = np.clip(np.asarray(maps, dtype=np.float64), 0.0, None)
    edge, corners = band_masks(maps.shape[-2], maps.shape[-1], band)
    total = maps.sum(axis=(-2, -1))
    safe = np.where(total > 0, total, 1.0)
    return (maps * edge).sum(axis=(-2, -1)) / safe, (maps * corners).sum(axis=(-2, -1)) / safe


def measure_border_evidence(
    saved_model: Any, paths: Sequence[str | Path], *, method: str = "gradcam", band: float = BAND, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Band and corner shares of the predicted class's map for each image (multi-label: the top finding's,
    see the module docstring); with the images as shown and the maps."""
    return _measure(saved_model, paths, method=method, band=band, batch_size=batch_size)[:4]


def _measure(
    saved_model: Any, paths: Sequence[str | Path], *, method: str, band: float, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray], list[str]]:
    """:func:`measure_border_evidence`, and the class (or finding) explained for each image."""
    import torch

    from medtransfer.explain.cam import ClassActivationMap
    from medtransfer.explain.files import is_multilabel, prepare_images

    multilabel = is_multilabel(saved_model)
    classes = list(saved_model.classes)
    explained: list[str] = []

    def decide(logits):
        decision = saved_model.decide(logits)
        if multilabel:  # the top finding: furthest above (or closest below) its threshold
            margin = decision.probabilities - np.asarray(saved_model.info.thresholds, dtype=np.float64)[None, :]
            choice = margin.argmax(axis=1)
        else:
            choice = np.asarray(decision.predicted)
        explained.extend(classes[int(k)] for k in choice)
        return torch.as_tensor(choice, device=logits.device)

    shown_all: list[np.ndarray] = []
    maps_all: list[np.ndarray] = []
    with ClassActivationMap(saved_model.model, method=method, multilabel=multilabel) as cam:
        for start in range(0, len(paths), batch_size):
            shown, images = prepare_images(saved_model, paths[start : start + batch_size])
            maps_all.extend(cam(images, class_index=decide).maps.cpu().numpy().astype(np.float32))
            shown_all.extend(shown)
    if not maps_all:
        return np.zeros(0), np.zeros(0), [], [], []
    edge, corner = border_shares(np.stack(maps_all), band)
    return edge, corner, shown_all, maps_all, explained


def summarise(edge: np.ndarray, corner: np.ndarray, *, band: float = BAND, level: float = LEVEL) -> dict[str, Any]:
    """metrics.json "border_evidence" figures: means, the flag level and the share of images above it."""
    h = w = 1000  # area shares of the masks, independent of the map size
    edge_mask, corner_mask = band_masks(h, w, band)
    band_area, corner_area = float(edge_mask.mean()), float(corner_mask.mean())
    flagged = edge > level * band_area
    return {
        "band": band,
        "band_area_share": round(band_area, 4),
        "corner_area_share": round(corner_area, 4),
        "level": level,
        "flag_above": round(level * band_area, 4),
        "n_images": int(edge.size),
        "mean_band_share": round(float(edge.mean()), 4) if edge.size else None,
        "mean_corner_share": round(float(corner.mean()), 4) if corner.size else None,
        "n_flagged": int(flagged.sum()),
        "flagged_fraction": round(float(flagged.mean()), 4) if edge.size else None,
    }


def write_border_evidence(
    run_dir: Path, saved_model: Any, *, split: str = "test", method: str = "gradcam", limit: int = LIMIT,
    band: float = BAND, level: float = LEVEL, worst: int = WORST, keep_names: bool | None = None,
) -> dict[str, Any] | None:
    """Measure the split's border evidence, draw the worst cases to ``plots/border/``; return metrics.json's block.

    None when the run has no ``predictions_<split>.csv`` or none of its images exists any more.
    A multi-label run is measured on each image's top finding (the block's ``explained`` says so).
    Captions (drawn into the PNGs and in the block) name each image by its shareable file name, its patient ID
    salted-hashed (privacy.py), unless `keep_names` (None: the run's ``keep_identifiers`` setting).
    """
    from medtransfer.explain.files import is_multilabel
    from medtransfer.explain.render import save_overlay

    if limit < 1:
        raise ConfigError(f"--limit: got {limit}; use 1 or more images")
    run_dir = Path(run_dir)
    multilabel = is_multilabel(saved_model)
    rows = sorted((p for p in _split_images(run_dir, saved_model, split, multilabel) if p.is_file()), key=str)
    if not rows:
        return None
    chosen = [rows[i] for i in np.unique(np.linspace(0, len(rows) - 1, min(limit, len(rows))).round().astype(int))]
    edge, corner, shown, maps, explained = _measure(saved_model, chosen, method=method, band=band)
    out_dir = run_dir / BORDER_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.png"):
        stale.unlink()
    height, width = maps[0].shape
    outline, _ = band_masks(height, width, band)
    named = _names(run_dir, keep_names)
    gallery = []
    for rank, i in enumerate(np.argsort(-edge, kind="stable")[:worst], start=1):
        image = f"{named(chosen[i])} ({explained[i]})" if multilabel else named(chosen[i])
        caption = f"{image}: {100 * edge[i]:.0f}% in the band, {100 * corner[i]:.0f}% in the corners"
        name = f"border_{rank:02d}.png"
        save_overlay(out_dir / name, shown[i], maps[i], caption, outline=outline)
        gallery.append({"image": (BORDER_DIR / name).as_posix(), "caption": caption, "band_share": round(float(edge[i]), 4)})
    return {
        **summarise(edge, corner, band=band, level=level), "split": split, "method": method, "limit": limit,
        "n_available": len(rows), "gallery": gallery,
        **({"explained": "top finding (furthest above, or closest below, its threshold)"} if multilabel else {}),
    }


def _names(run_dir: Path, keep: bool | None) -> Callable[[Path], str]:
    """How a caption names an image: its file name, with keep_identifiers; else the file name of its shareable form
    (privacy.Identities.image: the patient ID replaced by its salted hash)."""
    from medtransfer.privacy import run_identities
    from medtransfer.rundir import RunDir

    if keep is None:
        keep = bool((RunDir(run_dir).config() or {}).get("keep_identifiers"))
    if keep:
        return lambda path: path.name
    ids = run_identities(run_dir)
    return lambda path: PurePath(ids.image(str(path))).name


def _split_images(run_dir: Path, saved_model: Any, split: str, multilabel: bool) -> list[Path]:
    """The image paths of ``predictions_<split>.csv`` (relative ones as gallery_rows resolves them); [] without it.
    Single-label rows are checked against the model's classes by gallery_rows."""
    from medtransfer.explain.gallery import gallery_rows
    from medtransfer.rundir import RunDir

    if not multilabel:
        return [r.path for r in gallery_rows(run_dir, list(saved_model.classes), split=split) or []]
    table = RunDir(run_dir).predictions(split)
    paths = [Path(p) for p in (table.paths if table is not None else [])]
    return [p if p.is_absolute() or p.exists() else run_dir / p for p in paths]


def record_border_evidence(run_dir: Path, saved_model: Any, metrics: dict[str, Any], **settings: Any) -> dict[str, Any] | None:
    """:func:`write_border_evidence`, stored as metrics.json's "border_evidence" (``metrics``: the file's content)."""
    from medtransfer.rundir import write_metrics

    block = write_border_evidence(run_dir, saved_model, **settings)
    if block is not None:
        metrics["border_evidence"] = block
        write_metrics(Path(run_dir), metrics)
    return block
