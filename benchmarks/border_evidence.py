"""Shortcut check on real data: border evidence and validation AUC without and with --border-crop.

    python benchmarks/border_evidence.py --data DATA/kermany-224 [--crops 0,0.1] [--out DIR]

Trains the reference recipe's cheap path once per border crop: efficientnet_lite0 (offline
ImageNet weights), ``--strategy linear-probe`` without augmentation (the head trains on
features computed once), everything else at its default. Each run measures, at its end, the
share of Grad-CAM evidence in the outer 10% of each side on at most 200 test images
(``medtransfer.explain.border``). Prints ONE JSON line on stdout (logs go to stderr):
per crop the validation and test AUC, the mean band and corner shares and the share of
images flagged (band share above 2 x the band's 36% of the area).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def measure(data: str, crop: float, out: Path, cache_dir: Path, *, epochs: int, bootstrap: int) -> dict[str, Any]:
    from rich.console import Console

    from medtransfer.config import TrainConfig
    from medtransfer.train.pipeline import run_training

    config = TrainConfig.from_dict({
        "data": data, "backbone": "efficientnet_lite0", "strategy": "linear-probe", "augment": False,
        "border_crop": crop, "epochs": epochs, "bootstrap": bootstrap, "cache_dir": str(cache_dir), "progress": False,
    }, source="benchmark")
    run = out / f"crop_{crop:g}"
    started = time.perf_counter()
    run_training(config, run, resume=(run / "config.yaml").is_file(), console=Console(stderr=True))
    metrics = json.loads((run / "metrics.json").read_text())
    border = metrics.get("border_evidence") or {}
    return {
        "border_crop": crop,
        "val_auc": metrics["val"]["auc"],
        "test_auc": (metrics.get("test") or {}).get("auc"),
        "mean_band_share": border.get("mean_band_share"),
        "mean_corner_share": border.get("mean_corner_share"),
        "flagged_fraction": border.get("flagged_fraction"),
        "n_border_images": border.get("n_images"),
        "n_val": metrics["val"].get("n"),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dataset folder, e.g. DATA/kermany-224")
    parser.add_argument("--crops", default="0,0.1", help="border crops to compare, comma-separated")
    parser.add_argument("--epochs", type=int, default=30, help="linear-probe epochs (on cached features: cheap)")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of the intervals")
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    crops = [float(c) for c in args.crops.split(",")]
    with tempfile.TemporaryDirectory() as temporary:
        out = Path(args.out or temporary)
        stdout = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):  # library prints must not break the one JSON line
            rows = [measure(args.data, c, out, out / "cache", epochs=args.epochs, bootstrap=args.bootstrap) for c in crops]
    result = {
        "benchmark": "border_evidence", "data": args.data, "backbone": "efficientnet_lite0", "strategy": "linear-probe",
        "augment": False, "band": 0.1, "flag_above": 0.72, "runs": rows,
    }
    print(json.dumps(result), file=stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
