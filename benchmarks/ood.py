"""Does the OOD guard tell foreign images from the run's own kind? AUROC and FPR at 95% TPR.

In-distribution: up to ``--limit`` test images from ``--data`` (e.g. kermany-224-test-dev).
Out-of-distribution sets, written to a temporary folder as PNG files and read back through
``SavedModel.preprocess`` exactly like ``medtransfer predict``:

- non-radiographs: ``photos`` (random crops of scikit-learn's two sample photographs),
  ``textures`` (smooth random colour fields), ``noise`` (uniform noise), ``gradients``
  (random linear ramps);
- transformed radiographs (of the in-distribution images): ``inverted``, ``rotated90``,
  ``rotated180``, ``cropped`` (a random window of 20-30% of the side, enlarged);
- synthetic films: ``phantoms`` (the demo's rendered radiographs) and ``phantoms_inverted``
  (reported, no target: the phantoms imitate radiographs).

For every method of :mod:`medtransfer.ood` (all are saved with each model) it reports, per set,
AUROC of the score (OOD positive), FPR95 (share of the OOD set accepted by the threshold that
accepts 95% of the in-distribution test images) and ``flagged`` (share above the saved
threshold, chosen on validation). Targets: AUROC >= 0.99 for non-radiographs, >= 0.9 for
inverted or rotated radiographs. Prints one JSON line.

``--refit`` first fits the detector again with the current code on the run's own train and
validation images (split.csv; as ``medtransfer train`` does at its end) and saves it into the
run's model folder: a run trained before a detector change is measured without training again.

Usage::

    python benchmarks/ood.py --run RUN --data DATA/kermany-224-test-dev [--limit 300] [--per-set 100] [--refit]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import csv
import time

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, Dataset

from medtransfer.artifacts import find_model_dir, load_model
from medtransfer.data.phantom import random_anatomy, render_phantom
from medtransfer.models.strategies import backbone_children
from medtransfer.ood import collect_features, fit_detector, pick_layers, save_detector
from medtransfer.predict import expand_inputs

NON_RADIOGRAPHS = ("photos", "textures", "noise", "gradients")
RADIOGRAPH_SHIFTS = ("inverted", "rotated90", "rotated180", "cropped")


def _smooth_colour(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.uniform(0, 255, size=(rng.integers(3, 9), rng.integers(3, 9), 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size] / size
    ramp = np.cos(angle) * x + np.sin(angle) * y
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) or 1.0)
    colour = rng.uniform(0.3, 1.0, size=3)
    return (ramp[..., None] * colour * 255).astype(np.uint8)


def _photo_crop(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    side = int(rng.integers(120, min(photo.shape[:2])))
    top, left = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
    return np.asarray(Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size)))


def _radiograph(path: Path, kind: str, rng: np.random.Generator) -> np.ndarray:
    image = np.asarray(Image.open(path).convert("L"))
    if kind == "inverted":
        return 255 - image
    if kind == "rotated90":
        return np.rot90(image).copy()
    if kind == "rotated180":
        return np.rot90(image, 2).copy()
    side = int(min(image.shape) * rng.uniform(0.2, 0.3))
    top, left = rng.integers(0, image.shape[0] - side), rng.integers(0, image.shape[1] - side)
    return np.asarray(Image.fromarray(image[top : top + side, left : left + side]).resize(image.shape[::-1]))


def build_sets(folder: Path, radiographs: list[Path], per_set: int, seed: int, size: int = 224) -> dict[str, list[Path]]:
    """Write every OOD set as PNG files under `folder`; return the file lists by set name."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = list(load_sample_images().images)
    makers = {
        "photos": lambda i: _photo_crop(rng, photos, size),
        "textures": lambda i: _smooth_colour(rng, size),
        "noise": lambda i: rng.integers(0, 256, size=(size, size), dtype=np.uint8),
        "gradients": lambda i: _gradient(rng, size),
        **{kind: (lambda i, k=kind: _radiograph(radiographs[i % len(radiographs)], k, rng)) for kind in RADIOGRAPH_SHIFTS},
        "phantoms": lambda i: render_phantom(rng, random_anatomy(rng, pneumonia=bool(i % 2), virus=False), size).pixels,
    }
    sets: dict[str, list[Path]] = {}
    for name, make in makers.items():
        (folder / name).mkdir(parents=True)
        sets[name] = []
        for i in range(per_set):
            path = folder / name / f"{i:04d}.png"
            Image.fromarray(make(i)).save(path)
            sets[name].append(path)
    (folder / "phantoms_inverted").mkdir()
    sets["phantoms_inverted"] = []
    for path in sets["phantoms"]:
        inverted = folder / "phantoms_inverted" / path.name
        Image.fromarray(255 - np.asarray(Image.open(path))).save(inverted)
        sets["phantoms_inverted"].append(inverted)
    return sets


class Files(Dataset):
    """Image files preprocessed exactly as `medtransfer predict` does."""

    def __init__(self, saved, paths: list[Path]):
        self.saved, self.paths = saved, paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.saved.preprocess(self.paths[index])


def features_of(saved, paths: list[Path], layers, device: torch.device) -> dict[str, torch.Tensor]:
    """What the detector reads of these files (the penultimate features and the layers' channel statistics)."""
    return collect_features(saved.model, DataLoader(Files(saved, paths), batch_size=64), layers, device=device,
                            precision="32-true")


def refit(saved, run: Path, device: torch.device, seed: int, limit: int | None = None) -> dict:
    """Fit the detector again on the run's train/val images (split.csv), as `medtransfer train` does; save it.
    `limit`: a seeded sample of that many training images (a quicker measurement on a CPU)."""
    with (run / "split.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    model = saved.model
    layers = pick_layers(model.to(device), backbone_children(model.net, model.spec), saved.info.image_size,
                         saved.info.in_channels)
    split = {name: [r for r in rows if r["split"] == name] for name in ("train", "val")}
    if limit is not None and limit < len(split["train"]):
        chosen = np.random.default_rng(seed).choice(len(split["train"]), limit, replace=False)
        split["train"] = [split["train"][i] for i in sorted(chosen)]
    features = {name: features_of(saved, [Path(r["path"]) for r in chosen], layers, device) for name, chosen in split.items()}
    labels = np.asarray([saved.classes.index(r["label"]) for r in split["train"]])
    saved.ood = fit_detector(features["train"], labels, features["val"], layers=layers, seed=seed)
    save_detector(saved.ood, find_model_dir(run))
    return {"layers": layers, "train": len(split["train"]), "val": len(split["val"]), "thresholds": saved.ood.thresholds}


def fpr_at_95_tpr(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Share of OOD images accepted when the threshold accepts 95% of the in-distribution ones."""
    return float((out_scores <= np.quantile(in_scores, 0.95)).mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="In-distribution test images (folder)")
    parser.add_argument("--limit", type=int, default=300, help="In-distribution images used (a seeded sample)")
    parser.add_argument("--per-set", type=int, default=100, help="Images per OOD set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refit", action="store_true", help="Fit the detector again on the run's train/val first")
    parser.add_argument("--refit-limit", type=int, default=None, help="With --refit: training images used (seeded)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    saved = load_model(args.run)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    refitted = refit(saved, args.run, device, args.seed, args.refit_limit) if args.refit else None
    if saved.ood is None:
        sys.exit(f"--run {args.run}: the model has no OOD detector (saved before the guard); train it again or --refit")
    paths = expand_inputs([args.data])
    rng = np.random.default_rng(args.seed)
    paths = [paths[i] for i in sorted(rng.choice(len(paths), min(args.limit, len(paths)), replace=False))]
    in_features = features_of(saved, paths, saved.ood.layers, device)
    result: dict = {"run": str(args.run), "data": str(args.data), "in_distribution": len(paths),
                    "default_method": saved.ood.method, "layers": list(saved.ood.layers), "refit": refitted,
                    "device": device.type, "methods": {}}
    with tempfile.TemporaryDirectory(prefix="medtransfer-ood-") as folder:
        sets = build_sets(Path(folder), paths, args.per_set, args.seed)
        out_features = {name: features_of(saved, files, saved.ood.layers, device) for name, files in sets.items()}
    for method in saved.ood.methods:
        detector = saved.ood.using(method)
        in_scores = detector.score(in_features).numpy()
        rows = {"in_flagged": round(float(detector.flags(in_scores).mean()), 4)}
        for name, feats in out_features.items():
            out_scores = detector.score(feats).numpy()
            labels = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
            rows[name] = {
                "auroc": round(float(roc_auc_score(labels, np.r_[in_scores, out_scores])), 4),
                "fpr95": round(fpr_at_95_tpr(in_scores, out_scores), 4),
                "flagged": round(float(detector.flags(out_scores).mean()), 4),
            }
        rows["min_auroc_non_radiographs"] = min(rows[n]["auroc"] for n in NON_RADIOGRAPHS)
        rows["min_auroc_inverted_rotated"] = min(rows[n]["auroc"] for n in ("inverted", "rotated90", "rotated180"))
        rows["pass"] = rows["min_auroc_non_radiographs"] >= 0.99 and rows["min_auroc_inverted_rotated"] >= 0.9
        result["methods"][method] = rows
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
