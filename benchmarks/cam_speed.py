"""Heatmap latency: Grad-CAM (and CAM, Grad-CAM++, occlusion) for one image, model loaded, on CPU.

    python benchmarks/cam_speed.py [--backbones resnet18,efficientnet_lite0] [--image-size 224] [--calls 20]

Prints ONE JSON line on stdout. For each backbone (random weights, 2 classes, a saved and
reloaded model as `explain` uses it) and method: the median and minimum seconds of one call
of :class:`medtransfer.explain.cam.ClassActivationMap` on one image after three warm-up
calls (occlusion: 3 calls after 1), the first call on the freshly loaded model (it includes
the one-off receptive-field measurement that places the map cells, see
:func:`medtransfer.explain.grid.feature_grid`), and the median of a plain no-grad forward
pass of the same image for scale. Target: Grad-CAM under 0.3 s per 224 px image.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from medtransfer.artifacts import load_model, model_info, save_model
from medtransfer.explain.cam import METHODS, ClassActivationMap
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import TransferModel

TARGET_SECONDS = 0.3


def saved_and_loaded(backbone: str, image_size: int, folder: Path) -> TransferModel:
    torch.manual_seed(0)
    net, spec = create_backbone(backbone, num_classes=2, weights="none")
    model = TransferModel(net, spec)
    info = model_info(model, classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", threshold=0.5,
                      image_size=image_size, decode_size=round(image_size * 1.14))
    save_model(model, info, folder)
    return load_model(folder).model


def median_seconds(call, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times), min(times)


def measure(backbone: str, image_size: int, calls: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="mt-cam-speed-") as folder:
        model = saved_and_loaded(backbone, image_size, Path(folder))
    image = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()  # a freshly loaded model: this call pays the one-off placement of its map cells
    with ClassActivationMap(model, method="gradcam") as cam:
        cam(image)
    first = time.perf_counter() - started
    out: dict = {"first_call_s": round(first, 4)}
    for method in METHODS:
        warmup, repeats = (1, 3) if method == "occlusion" else (3, calls)  # occlusion: ~200 forward passes a call
        with ClassActivationMap(model, method=method) as cam:
            for _ in range(warmup):
                cam(image)
            median, best = median_seconds(lambda: cam(image), repeats)
        out[method] = {"median_s": round(median, 4), "min_s": round(best, 4)}
    with torch.no_grad():
        model(image)
        out["forward_median_s"] = round(median_seconds(lambda: model(image), calls)[0], 4)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", default="resnet18,efficientnet_lite0,resnet50,densenet121")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    results = {name: measure(name, args.image_size, args.calls) for name in args.backbones.split(",")}
    slowest = max(r["gradcam"]["median_s"] for r in results.values())
    print(json.dumps({
        "benchmark": "cam_speed",
        "image_size": args.image_size,
        "backbones": results,
        "slowest_gradcam_median_s": slowest,
        "target_s": TARGET_SECONDS,
        "targets_met": slowest < TARGET_SECONDS,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
