"""Prediction speed on full-resolution images: medtransfer.predict.predict_files vs the naive loop.

    python benchmarks/predict_speed.py --data DATA/kermany-fullres-sample [--run RUN]
    python benchmarks/predict_speed.py --streaming [--stream-sizes 2000,20000]

Prints ONE JSON line on stdout (logs go to stderr):

- predict_img_s: predict_files on up to ``--images`` (100) images (JPEG draft decode to the
  saved decode size, batched inference, channels_last, bf16 autocast where the CPU has it);
- baseline_img_s: the naive way, one image at a time: PIL full decode + convert("RGB"),
  Resize(256), CenterCrop(224), ToTensor, Normalize, fp32 NCHW forward of a batch of one;
- ratio = predict_img_s / baseline_img_s (target >= 2);
- single_image_latency_ms: median over ``--latency-calls`` calls of predict_files on one
  image, model already loaded (target < 150 ms);
- torch_fp32_img_s vs onnxruntime_img_s (stream_predictions, CPU), their single-image
  latencies (one file through a Classifier loaded once, as `serve` answers a request),
  onnx_max_prob_difference (onnx_outputs_equal: < 1e-4) and onnx_same_predicted_class.

Without ``--run`` a small model (resnet18, random weights, 224 px, decode size 256) is
saved with artifacts.save_model into a temporary folder and loaded back with load_model.
Both measurements start after one untimed warm-up call, with the files in the page cache.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T

from medtransfer.artifacts import load_model, model_info, save_model
from medtransfer.data.discover import IMAGE_SUFFIXES
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import TransferModel
from medtransfer.predict import Classifier, predict_files, stream_predictions
from medtransfer.runtime import available_cores, device_for, place_model, resolve_accelerator, resolve_precision

TARGETS = {"ratio": 2.0, "single_image_latency_ms": 150.0}


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def build_demo_model(folder: Path) -> Path:
    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    model = TransferModel(net, spec)
    info = model_info(model, classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", threshold=0.5,
                      image_size=224, decode_size=256)
    save_model(model, info, folder)
    return folder


def naive_transform(saved) -> T.Compose:
    size = saved.info.image_size
    return T.Compose(
        [
            T.Resize(int(round(size / saved.info.eval_crop_fraction))),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(saved.info.mean, saved.info.std),
        ]
    )


@torch.inference_mode()
def naive_predict(model, transform, path: Path, device: torch.device) -> torch.Tensor:
    with Image.open(path) as image:
        x = transform(image.convert("RGB"))[None].to(device)
    return torch.softmax(model(x), dim=1).cpu()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="folder of full-resolution images (searched recursively)")
    parser.add_argument("--run", type=Path, default=None, help="a run or model folder (default: a small demo model)")
    parser.add_argument("--images", type=int, default=100, help="at most this many images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--latency-calls", type=int, default=20)
    parser.add_argument("--accelerator", default="cpu", help="cpu (default), gpu or auto; both sides use it")
    parser.add_argument("--streaming", action="store_true",
                        help="instead: peak memory of streaming predict over --stream-sizes generated tiny images")
    parser.add_argument("--stream-sizes", default="2000,20000", help="image counts for --streaming")
    args = parser.parse_args(argv)
    if args.data is None and not args.streaming:
        parser.error("--data is required (or pass --streaming)")
    return args


STREAM_CHILD = """
import resource, sys, time
from pathlib import Path
from medtransfer.artifacts import load_model
from medtransfer.predict import expand_inputs, stream_predictions, write_rows
saved, paths = load_model(Path(sys.argv[1])), expand_inputs([Path(sys.argv[2])])
started = time.perf_counter()
rows = write_rows(stream_predictions(saved, paths, batch_size=64, accelerator="cpu", precision="32-true",
                                     num_workers=1), Path(sys.argv[3]))
print(rows, time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def run_streaming(args: argparse.Namespace) -> dict:
    """Peak RSS of the predicting process (its own, decoding in one worker) for each image count: flat = streaming."""
    import os
    import subprocess

    import numpy as np

    sizes = sorted(int(n) for n in args.stream_sizes.split(","))
    result: dict = {"benchmark": "predict_speed_streaming", "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        saved_dir = folder / "model"
        torch.manual_seed(0)
        net, spec = create_backbone("resnet18", num_classes=2, weights="none")
        model = TransferModel(net, spec)
        save_model(model, model_info(model, classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA",
                                     threshold=0.5, image_size=32, decode_size=32), saved_dir)
        rng = np.random.default_rng(0)
        for n in sizes:
            images = folder / f"images_{n}"
            images.mkdir()
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(images / f"{i:06d}.png")
            out = subprocess.run([sys.executable, "-c", STREAM_CHILD, str(saved_dir), str(images), str(folder / f"{n}.csv")],
                                 capture_output=True, text=True, check=True, env=os.environ)
            rows, seconds, peak_kib = out.stdout.split()
            log(f"{n} images: {rows} rows in {float(seconds):.1f} s, peak RSS {int(peak_kib) / 1024:.0f} MiB")
            result["cases"].append({"images": n, "rows": int(rows), "img_s": round(n / float(seconds), 1),
                                    "peak_rss_mib": round(int(peak_kib) / 1024, 1)})
    first, last = result["cases"][0]["peak_rss_mib"], result["cases"][-1]["peak_rss_mib"]
    result.update({"rss_growth": round(last / first - 1, 4), "target": "rss_growth <= 0.10",
                   "target_met": last / first - 1 <= 0.10, "model": "resnet18 (weights none), 32 px, 1 decode worker",
                   "cores": available_cores(), "torch": torch.__version__})
    return result


def onnx_comparison(args: argparse.Namespace, saved, paths: list[Path]) -> dict:
    """torch fp32 vs onnxruntime (the model `medtransfer export` writes) on the same files, in one run, on the CPU.

    images/s: stream_predictions over every file (onnxruntime's session is created and checked
    once per call); latency: one file (decode, crop, normalise, forward, decision) on a
    Classifier loaded once, as `serve` answers a request."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {"onnxruntime": "not installed"}
    from medtransfer.export import export_onnx

    with tempfile.TemporaryDirectory(prefix="mt-onnx-") as tmp:
        model_dir = args.run or build_demo_model(Path(tmp) / "model")  # seeded: the same weights as `saved`
        onnx_path = export_onnx(model_dir, Path(tmp) / "model.onnx")
        options = dict(batch_size=args.batch_size, accelerator="cpu", precision="32-true")
        figures = {}
        for name, extra in (("torch_fp32", {}), ("onnxruntime", {"onnx_path": onnx_path})):
            list(stream_predictions(saved, paths[:1], **options, **extra))  # warm-up
            started = time.perf_counter()
            rows = list(stream_predictions(saved, paths, **options, **extra))
            seconds = time.perf_counter() - started
            classify = Classifier.on(saved, accelerator="cpu", precision="32-true", **extra)
            latencies = []
            for i in range(args.latency_calls + 1):  # the first call is a warm-up
                started = time.perf_counter()
                classify(saved.preprocess(paths[i % len(paths)])[None])
                latencies.append((time.perf_counter() - started) * 1000)
            figures[name] = (len(paths) / seconds, statistics.median(latencies[1:]), rows)
            log(f"{name}: {figures[name][0]:.1f} img/s, single image {figures[name][1]:.1f} ms")
    columns = [k for k in figures["torch_fp32"][2][0] if k.startswith("prob_")]
    difference = max(abs(a[c] - b[c]) for a, b in zip(figures["torch_fp32"][2], figures["onnxruntime"][2]) for c in columns)
    return {
        "torch_fp32_img_s": round(figures["torch_fp32"][0], 2), "onnxruntime_img_s": round(figures["onnxruntime"][0], 2),
        "torch_fp32_latency_ms": round(figures["torch_fp32"][1], 1),
        "onnxruntime_latency_ms": round(figures["onnxruntime"][1], 1),
        "onnx_max_prob_difference": float(difference), "onnx_outputs_equal": difference < 1e-4,
        "onnx_same_predicted_class": all(a["pred"] == b["pred"] for a, b in zip(*(f[2] for f in figures.values()))),
    }


def run(args: argparse.Namespace) -> dict:
    paths = sorted(
        p for p in args.data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    random.Random(0).shuffle(paths)  # a seeded sample across the class folders
    paths = paths[: args.images]
    if not paths:
        raise SystemExit(f"--data {args.data}: no images found")
    for path in paths:  # warm page cache for both sides
        path.read_bytes()
    accelerator = resolve_accelerator(args.accelerator)
    device = device_for(args.accelerator)
    precision = resolve_precision("auto", accelerator)

    with contextlib.ExitStack() as stack:
        run_dir = args.run or build_demo_model(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mt-predict-"))))
        saved = load_model(run_dir)
    log(f"{len(paths)} images, model {saved.info.backbone} ({'given' if args.run else 'demo, random weights'}), "
        f"{accelerator}, precision {precision}")

    # Baseline first, on its own fp32 NCHW copy (predict_files converts saved.model to channels_last).
    naive_model = place_model(copy.deepcopy(saved.model).eval(), device, channels_last=False)
    transform = naive_transform(saved)
    naive_predict(naive_model, transform, paths[0], device)  # warm-up
    started = time.perf_counter()
    for path in paths:
        naive_predict(naive_model, transform, path, device)
    baseline_seconds = time.perf_counter() - started
    log(f"baseline: {len(paths) / baseline_seconds:.1f} img/s")

    options = dict(batch_size=args.batch_size, accelerator=args.accelerator, precision="auto")
    predict_files(saved, paths[:1], **options)  # warm-up
    started = time.perf_counter()
    rows = predict_files(saved, paths, **options)
    predict_seconds = time.perf_counter() - started
    if len(rows) != len(paths):
        raise SystemExit(f"predict_files returned {len(rows)} rows for {len(paths)} images")
    log(f"predict_files: {len(paths) / predict_seconds:.1f} img/s")

    latencies = []
    for _ in range(args.latency_calls):
        started = time.perf_counter()
        predict_files(saved, paths[:1], **options)
        latencies.append((time.perf_counter() - started) * 1000)
    latency = statistics.median(latencies)
    log(f"single image latency: median {latency:.1f} ms over {len(latencies)} calls")

    onnx = onnx_comparison(args, saved, paths)
    predict_img_s = len(paths) / predict_seconds
    baseline_img_s = len(paths) / baseline_seconds
    ratio = predict_img_s / baseline_img_s
    with Image.open(paths[0]) as first:
        example_size = first.size
    return {
        "benchmark": "predict_speed",
        "predict_img_s": round(predict_img_s, 2),
        "baseline_img_s": round(baseline_img_s, 2),
        "ratio": round(ratio, 3),
        "single_image_latency_ms": round(latency, 1),
        **onnx,
        "latency_ms_min_max": [round(min(latencies), 1), round(max(latencies), 1)],
        "latency_calls": len(latencies),
        "targets": TARGETS,
        "targets_met": {
            "ratio": ratio >= TARGETS["ratio"],
            "single_image_latency_ms": latency < TARGETS["single_image_latency_ms"],
        },
        "images": len(paths),
        "example_image_size": list(example_size),
        "batch_size": args.batch_size,
        "model": saved.info.backbone + ("" if args.run else " (demo, weights none)"),
        "image_size": saved.info.image_size,
        "decode_size": saved.info.decode_size,
        "accelerator": accelerator,
        "precision": precision,
        "baseline": "PIL full decode, Resize, CenterCrop, fp32 NCHW, batch of 1",
        "cores": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "data": str(args.data),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):
        result = run_streaming(args) if args.streaming else run(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
