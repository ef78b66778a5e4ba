"""K-fold cross-validation on a 3-class folder, as DarkCovidNet reports it (Ozturk et al. 2020: 5-fold, 3-class
accuracy 87.02%): per-fold figures, their mean and standard deviation, and the pooled out-of-fold figures.

    python benchmarks/cross_validation.py DATA_FOLDER [--folds 5] [--epochs 10] [--image-size 224] [--out DIR] [--jobs 1]

DATA_FOLDER is a plain class folder, DATA_FOLDER/{CLASS}/*.png (three classes, or any number), or a Kaggle
layout. It runs `medtransfer train --folds K` (train/cross_validation.py) from one command: a test split is
drawn by patient when the folder has none (20%), outside the folds. Prints ONE JSON line on stdout (logs on
stderr): per fold its own validation AUC (positive vs rest), argmax accuracy and macro AUC, best epoch; the
mean and sd over folds; the pooled out-of-fold argmax accuracy and macro AUC (patient-bootstrap 95% CIs),
AUC / sensitivity / specificity of the positive class at the out-of-fold threshold; the fold ensemble on
test; the wall clock.

A 3-class plain folder from the demo generator (medtransfer.data.synthetic), NORMAL / BACTERIA / VIRUS by
the Kermany file names of its phantoms (person<N>_bacteria_<k>.png, person<N>_virus_<k>.png):

    python benchmarks/cross_validation.py /tmp/three --make-demo --patients 40 --folds 5 --epochs 3 \\
        --image-size 64 --weights none

(``--make-demo`` writes the folder first: generate_demo_dataset into a temporary Kaggle tree, then every
image of every split copied to DATA_FOLDER/{NORMAL,BACTERIA,VIRUS}; see :func:`make_three_class_folder`.)

On the real data, the Kaggle chest X-ray folder read as three classes (NORMAL / BACTERIA / VIRUS):

    python benchmarks/cross_validation.py DATA/kermany-224 --labels kermany-3class --folds 5 \\
        --backbone efficientnet_lite0 --weights imagenet --epochs 10 --image-size 224
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from medtransfer.config import resolve_train_config
from medtransfer.data.synthetic import generate_demo_dataset
from medtransfer.rundir import RunDir
from medtransfer.train.seed_ensemble import train_run

CONSOLE = Console(stderr=True)
PUBLISHED = {"DarkCovidNet (Ozturk et al. 2020), 5-fold, 3-class accuracy": 0.8702}


def make_three_class_folder(out: Path, *, patients: int = 40, image_size: int = 64, seed: int = 0) -> Path:
    """DATA_FOLDER/{NORMAL,BACTERIA,VIRUS}/*.png from the demo phantoms (every split pooled, names kept so the
    patient IDs stay: IM-<n>, person<n>_bacteria, person<n>_virus)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate_demo_dataset(Path(tmp) / "demo", patients_per_class=patients, images_per_patient=(1, 2),
                              val_patients_per_class=max(2, patients // 10), test_patients_per_class=max(2, patients // 4),
                              image_size=image_size, seed=seed)
        for image in sorted((Path(tmp) / "demo").glob("*/*/*.png")):
            split, label = image.parts[-3], image.parts[-2]
            if split == "masks":
                continue
            name = "NORMAL" if label == "NORMAL" else ("VIRUS" if "_virus_" in image.name else "BACTERIA")
            (out / name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(image, out / name / image.name)
    return out


def _figures(block: dict) -> dict:
    multi = block.get("multiclass") or {}
    out = {key: block.get(key) for key in ("n", "auc", "auc_ci", "sensitivity", "sensitivity_ci", "specificity",
                                           "specificity_ci")}
    out.update({"accuracy_argmax": multi.get("accuracy"), "accuracy_argmax_ci": multi.get("accuracy_ci"),
                "macro_auc": multi.get("macro_auc"), "macro_auc_ci": multi.get("macro_auc_ci")})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--labels", default=None, help="kermany-3class for a Kaggle folder read as three classes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--make-demo", action="store_true", help="write the 3-class demo folder into DATA first")
    parser.add_argument("--patients", type=int, default=40, help="with --make-demo: patients per demo class")
    args = parser.parse_args(argv)
    if args.make_demo and not (args.data.exists() and any(args.data.iterdir())):
        make_three_class_folder(args.data, patients=args.patients, image_size=max(args.image_size, 64), seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "cv"
        overrides = {"data": str(args.data), "folds": args.folds, "epochs": args.epochs, "patience": args.patience,
                     "image_size": args.image_size, "cache_size": max(args.image_size, int(args.image_size * 8 / 7)),
                     "backbone": args.backbone, "weights": args.weights, "labels": args.labels,
                     "batch_size": args.batch_size, "bootstrap": args.bootstrap, "jobs": args.jobs, "seed": args.seed,
                     "cache_dir": str(args.cache_dir) if args.cache_dir else None, "progress": False}
        settings, run_dir = resolve_train_config(out=out, resume=None, config_file=None, overrides=overrides)
        started = time.perf_counter()
        train_run(settings, run_dir, resume=False, console=CONSOLE)
        wall = time.perf_counter() - started
        metrics = RunDir(run_dir).metrics()
        cv = metrics.extra["cross_validation"]
        result = {
            "data": str(args.data), "folds": args.folds, "classes": metrics.classes,
            "positive_class": metrics.positive_class, "backbone": args.backbone, "weights": args.weights,
            "epochs": args.epochs, "image_size": args.image_size,
            "per_fold": [{k: row.get(k) for k in ("fold", "images", "best_epoch", "auc", "accuracy_argmax", "macro_auc",
                                                   "sensitivity", "specificity")} for row in cv["fold_table"]],
            "per_fold_mean_sd": {k: cv["per_fold"].get(k) for k in ("auc", "accuracy_argmax", "macro_auc", "sensitivity",
                                                                    "specificity", "best_epoch")},
            "pooled_out_of_fold": {**_figures(metrics.val.to_dict()), "patients": cv["pooled_patients"],
                                   "threshold": metrics.threshold},
            "test_fold_ensemble": _figures(metrics.test.to_dict()) if metrics.test else None,
            "wall_seconds": round(wall, 1), "train_seconds": metrics.train_seconds, "published": PUBLISHED,
            "run": str(run_dir) if args.out else None,
        }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
