"""Can the heatmaps be trusted? Pointing game and a model-randomisation sanity check.

Trains (or reuses) a fine-tuned model on the synthetic demo data, then on the demo TEST
split, for every PNEUMONIA image that has a lesion mask:

- **Pointing game** (Zhang J, Lin Z, Brandt J, Shen X, Sclaroff S. *Top-down Neural
  Attention by Excitation Backprop.* ECCV 2016): the map of the PNEUMONIA class, at the
  model's input resolution, scores a hit when its maximum (the middle of a flat maximum,
  see :func:`peak`) lies inside the lesion mask,
  dilated by ``--tolerance-px`` (Euclidean disc; default 2.5% of the input side, 8 px at
  320 px); ``pointing_game_ci`` is a 95% interval from resampling patients. The mask goes
  through the same geometry as the image: stretched to the decode size by
  :func:`medtransfer.data.decode.decode_image`, then the saved evaluation transform's own
  ``Resize`` + ``CenterCrop``, resampled as an image and thresholded at half (see
  :func:`align_mask`).
  ``pointing_chance`` is the hit rate of a uniformly random point (mean dilated-mask area
  fraction), for scale.
- **Model randomisation** (Adebayo J, Gilmer J, Muelly M, Goodfellow I, Hardt M, Kim B.
  *Sanity Checks for Saliency Maps.* NeurIPS 2018), full (not cascading) randomisation:
  every module with ``reset_parameters`` (convolutions, linear layers, batch norms with
  their running statistics) is re-initialised to its default; a parameter no such module
  owns is an error. The maps of the same images and class are compared with the trained
  model's by Spearman rank correlation on ``--map-size`` x ``--map-size`` average-pooled
  maps. A map that is constant (all zero after Grad-CAM's ReLU) has no ranking; its
  correlation is counted as 0 and the count is reported. ``randomization_spearman`` is
  the mean signed correlation; ``randomization_spearman_abs`` the mean of its absolute value.

The map is only as fine as the target layer (``map_grid`` in the JSON). The defaults train
at 320 px, where EfficientNet-Lite0's last layer is 10 x 10 (32 px cells); at 160 px it is
5 x 5, coarser than the lesions. ``--output-stride 16`` dilates the last stage instead of
striding it (20 x 20 at 320 px); ``--target-layer`` explains another layer; ``--method
layercam`` reads the last stride-16 stage by default (``blocks.4``: 10 x 10 at 160 px). The phantoms
are rendered at 1.1 x the input size (352 px for 320).

Pass: pointing_game >= 0.80, randomization_spearman < 0.5 and test AUC >= 0.95.

Usage::

    python benchmarks/cam_trust.py [--out DIR] [--epochs 6] [--image-size 320] [--output-stride 32]
                                   [--method gradcam] [--backbone efficientnet_lite0] [--train-seed 0]

Data go to DIR/data_<render size>px (generated unless its README.txt exists; delete the
folder to regenerate), the run to DIR/run_<backbone>_<size>px_os<stride>_<epochs>ep[_seed<N>]
(reused when finished, resumed when interrupted). ``--run RUN --data DIR`` measures a finished
run instead, e.g. the demo's: ``--run demo-run/finetune --data demo-run/data --method layercam`` (what its
gallery draws). One JSON line on stdout; everything else on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from medtransfer.explain.cam import METHODS

CRITERIA = {"pointing_game_min": 0.80, "randomization_spearman_max": 0.5, "test_auc_min": 0.95}
_GEOMETRIC = (v2.Resize, v2.CenterCrop)


# ---------------------------------------------------------------------- pure helpers


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of the flattened values; ties get the mean of the ranks they span."""
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]
    ends = np.r_[starts[1:], n]
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # mean of ranks start+1 .. end
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of tie-averaged ranks) of two arrays.

    Raises:
        ValueError: different sizes, fewer than 2 values, or a constant array (no ranking).
    """
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.size != b.size or a.size < 2:
        raise ValueError(f"spearman: expected two arrays of the same size >= 2; got {a.size} and {b.size}")
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    if denominator == 0:
        raise ValueError("spearman: a constant array has no ranking; the correlation is undefined")
    return float((ra * rb).sum() / denominator)


def downsample(heat: np.ndarray, size: int) -> np.ndarray:
    """H x W map -> size x size by adaptive average pooling."""
    tensor = torch.as_tensor(np.asarray(heat, dtype=np.float32))[None, None]
    return torch.nn.functional.adaptive_avg_pool2d(tensor, size)[0, 0].numpy()


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Boolean mask grown by a Euclidean disc of ``radius`` pixels (0: unchanged)."""
    mask = np.asarray(mask, dtype=bool)
    if radius < 0:
        raise ValueError(f"dilate: radius must be >= 0; got {radius}")
    if radius == 0:
        return mask.copy()
    h, w = mask.shape
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                out |= padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w]
    return out


def peak(heat: np.ndarray) -> tuple[int, int] | None:
    """(row, col) of a map's maximum; ``None`` for a constant map.

    Upsampled maps have plateaus at their maximum (bilinear upsampling of a 5 x 5 map holds
    a border cell's value over a whole block). Of the pixels within ``1e-6`` of the maximum,
    the one nearest their centroid is taken (first in row-major order among equals), so a
    plateau points at its middle, not at its top-left corner.
    """
    heat = np.asarray(heat, dtype=np.float64)
    top = heat.max()
    if top == heat.min():
        return None
    rows, cols = np.nonzero(heat >= top - 1e-6)
    distance = (rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2
    best = int(np.argmin(distance))
    return int(rows[best]), int(cols[best])


def pointing_hit(heat: np.ndarray, mask: np.ndarray, tolerance_px: int) -> bool:
    """True when the map's :func:`peak` lies within ``tolerance_px`` (Euclidean) of the mask.

    A constant map has no maximum to point with and is a miss.
    """
    heat, mask = np.asarray(heat), np.asarray(mask, dtype=bool)
    if heat.shape != mask.shape:
        raise ValueError(f"pointing_hit: map {heat.shape} and mask {mask.shape} differ in shape")
    location = peak(heat)
    return location is not None and bool(dilate(mask, tolerance_px)[location])


def eval_geometry(transform: Any) -> v2.Compose:
    """The geometric steps (Resize, CenterCrop) of a saved evaluation transform, in order.

    They are what the image goes through before becoming a float tensor.

    Raises:
        ValueError: a step before ``ToDtype`` that is neither Resize nor CenterCrop (a random
            or unknown geometric step could not be replayed on the mask).
    """
    steps = []
    for step in getattr(transform, "transforms", []):
        if isinstance(step, v2.ToDtype):
            break
        if isinstance(step, _GEOMETRIC):
            steps.append(step)
        elif isinstance(step, v2.Transform):
            raise ValueError(f"eval_geometry: cannot replay {type(step).__name__} on a mask; expected only Resize and CenterCrop")
    return v2.Compose(steps)


def align_mask(mask: str | Path | np.ndarray, *, decode_size: int, transform: Any) -> np.ndarray:
    """A mask of the original image (a file, or an H x W array, > 0 inside) -> boolean mask over the model input.

    The mask takes the image's own path: :func:`~medtransfer.data.decode.decode_image` (the
    same Lanczos stretch to ``decode_size``), then the evaluation transform's own Resize
    (bilinear, antialiased) + CenterCrop, and a pixel is inside when it is at least half
    covered (>= 128 of 255). Resampling the mask as an image, rather than nearest-neighbour
    as ``tv_tensors.Mask`` would be, avoids nearest's half-pixel shift against the image.
    """
    import io

    from PIL import Image

    from medtransfer.data.decode import decode_image
    from medtransfer.data.datamodule import image_tensor

    if isinstance(mask, (str, Path)):
        source: Any = Path(mask)
        with Image.open(source) as opened:
            binary = np.asarray(opened.convert("L")) > 0
    else:
        binary = np.asarray(mask) > 0
        if binary.ndim != 2:
            raise ValueError(f"align_mask: expected an H x W mask; got shape {binary.shape}")
    buffer = io.BytesIO()
    Image.fromarray(binary.astype(np.uint8) * 255).save(buffer, format="PNG")
    stretched = decode_image(buffer.getvalue(), size=decode_size, keep_color=False)
    return eval_geometry(transform)(image_tensor(stretched))[0].numpy() >= 128


def randomize_weights(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """Full randomisation in place: ``reset_parameters()`` on every module that has it.

    Resets convolution/linear weights to their default init and batch norms to weight 1,
    bias 0 and fresh running statistics.

    Raises:
        ValueError: parameters or buffers that no resettable module owns (they would keep
            their trained values).
    """
    owned: set[int] = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
                owned.update(id(t) for t in module.parameters(recurse=False))
                owned.update(id(t) for t in module.buffers(recurse=False))
    kept = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if id(t) not in owned]
    if kept:
        raise ValueError(f"randomize_weights: no reset_parameters() for {', '.join(kept[:5])}{' ...' if len(kept) > 5 else ''}")
    return model


def map_similarity(trained: list[np.ndarray], randomized: list[np.ndarray], *, size: int) -> dict[str, float]:
    """Mean signed and absolute Spearman correlation of paired maps (constant maps count as 0)."""
    rhos, constant = [], 0
    for a, b in zip(trained, randomized, strict=True):
        small_a, small_b = downsample(a, size), downsample(b, size)
        if np.ptp(small_a) == 0 or np.ptp(small_b) == 0:
            constant += 1
            rhos.append(0.0)
        else:
            rhos.append(spearman(small_a, small_b))
    if not rhos:
        raise ValueError("map_similarity: no maps to compare")
    return {
        "spearman": float(np.mean(rhos)),
        "spearman_abs": float(np.mean(np.abs(rhos))),
        "constant_maps": constant,
    }


# ---------------------------------------------------------------------- the benchmark


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cluster_bootstrap_ci(hits: list[bool], groups: list[str], *, resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile interval of the hit rate, resampling patients (their images together)."""
    if len(hits) != len(groups) or not hits:
        raise ValueError(f"cluster_bootstrap_ci: expected as many groups as hits (> 0); got {len(groups)} and {len(hits)}")
    names, index = np.unique(np.asarray(groups), return_inverse=True)
    hit_sum = np.bincount(index, weights=np.asarray(hits, dtype=np.float64), minlength=len(names))
    count = np.bincount(index, minlength=len(names)).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(names), size=(resamples, len(names)))
    rates = hit_sum[draws].sum(axis=1) / count[draws].sum(axis=1)
    return [float(np.quantile(rates, 0.025)), float(np.quantile(rates, 0.975))]


def _cases(run_dir: Path, data_root: Path, saved: Any) -> tuple[list[torch.Tensor], list[np.ndarray], list[str], int]:
    """Model inputs, aligned masks and patient ids of the positive-class test images that have a mask."""
    from medtransfer.data.synthetic import lesion_mask_path

    positive = saved.info.positive_class
    decode_size = saved.info.decode_size
    transform = saved.transform()
    inputs, masks, patients, skipped = [], [], [], 0
    with (run_dir / "split.csv").open(newline="") as handle:
        records = [r for r in csv.DictReader(handle) if r["split"] == "test" and r["label"] == positive]
    for record in records:
        image_path = Path(record["path"])
        mask_path = lesion_mask_path(image_path, data_root)
        if mask_path is None:
            skipped += 1
            continue
        mask = align_mask(mask_path, decode_size=decode_size, transform=transform)
        if not mask.any():  # the lesion lies outside the centre crop
            skipped += 1
            continue
        inputs.append(saved.preprocess(image_path))
        masks.append(mask)
        patients.append(record["patient_id"])
    return inputs, masks, patients, skipped


def _maps(
    model: nn.Module, inputs: list[torch.Tensor], class_index: int, method: str, target_layer: str | None, batch_size: int = 16
) -> tuple[list[np.ndarray], str, list[int]]:
    """Maps of the class for every input, the layer explained and the map's true resolution (cells)."""
    from medtransfer.explain.cam import ClassActivationMap

    out: list[np.ndarray] = []
    cells: list[int] = []
    with ClassActivationMap(model, method=method, target_layer=target_layer) as cam:
        for start in range(0, len(inputs), batch_size):
            result = cam(torch.stack(inputs[start : start + batch_size]), class_index=class_index)
            out.extend(result.maps.numpy())
            cells = list(result.map_cells)
    return out, cam.target_layer, cells


def render_size_for(image_size: int) -> int:
    """Phantoms are rendered a little above the input size, as the cache stores them."""
    return max(image_size, round(image_size * 1.1))


def data_dir(out: Path, image_size: int) -> Path:
    return out / f"data_{render_size_for(image_size)}px"


def train_or_reuse(args: argparse.Namespace, out: Path) -> Path:
    from rich.console import Console

    from medtransfer.data.synthetic import generate_demo_dataset
    from medtransfer.demo import demo_config
    from medtransfer.train.pipeline import run_training

    render_size = render_size_for(args.image_size)
    data = data_dir(out, args.image_size)
    if not (data / "README.txt").is_file():
        sizes = {k: v for k, v in (("patients_per_class", args.patients_per_class), ("test_patients_per_class", args.test_patients_per_class)) if v is not None}
        summary = generate_demo_dataset(data, seed=0, image_size=render_size, **sizes)
        _log(f"Generated {summary.total_images} synthetic radiographs ({render_size} px) in {data}")
    seed_part = f"_seed{args.train_seed}" if args.train_seed else ""
    run_dir = out / f"run_{args.backbone}_{args.image_size}px_os{args.output_stride}_{args.epochs}ep{seed_part}"
    if (run_dir / "metrics.json").is_file():
        _log(f"Reusing the finished run {run_dir}")
        return run_dir
    config = demo_config(
        data,
        out / "cache",
        epochs=args.epochs,
        strategy="finetune",
        backbone=args.backbone,
        weights=args.weights,
        image_size=args.image_size,
        cache_size=render_size,
        output_stride=args.output_stride,
        seed=args.train_seed,
    )
    run_training(config, run_dir, resume=(run_dir / "config.yaml").is_file(), console=Console(stderr=True))
    return run_dir


def run(args: argparse.Namespace) -> dict[str, Any]:
    from medtransfer.artifacts import load_model

    started = time.perf_counter()
    out = Path(args.out).resolve()
    run_dir = Path(args.run).resolve() if args.run else train_or_reuse(args, out)
    metrics = json.loads((run_dir / "metrics.json").read_text())

    cam_started = time.perf_counter()
    saved = load_model(run_dir)
    tolerance = args.tolerance_px if args.tolerance_px is not None else round(0.025 * saved.info.image_size)
    data = Path(args.data).resolve() if args.data else data_dir(out, args.image_size)
    inputs, masks, patients, skipped = _cases(run_dir, data, saved)
    if not inputs:
        raise SystemExit(f"cam_trust: no {saved.info.positive_class} test image with a lesion mask in {data}")
    positive = saved.positive_index
    trained, layer, feature_size = _maps(saved.model, inputs, positive, args.method, args.target_layer)
    randomized_model = randomize_weights(load_model(run_dir).model, seed=args.seed)
    randomized, _, _ = _maps(randomized_model, inputs, positive, args.method, args.target_layer)

    hits = [pointing_hit(h, m, tolerance) for h, m in zip(trained, masks)]
    random_hits = [pointing_hit(h, m, tolerance) for h, m in zip(randomized, masks)]
    chance = float(np.mean([dilate(m, tolerance).mean() for m in masks]))
    similarity = map_similarity(trained, randomized, size=args.map_size)
    auc = (metrics.get("test") or {}).get("auc")
    pointing = float(np.mean(hits))
    passed = (
        pointing >= CRITERIA["pointing_game_min"]
        and similarity["spearman"] < CRITERIA["randomization_spearman_max"]
        and auc is not None
        and auc >= CRITERIA["test_auc_min"]
    )
    return {
        "benchmark": "cam_trust",
        "pointing_game": round(pointing, 4),
        "pointing_game_ci": [round(v, 4) for v in cluster_bootstrap_ci(hits, patients)],
        "pointing_game_randomized": round(float(np.mean(random_hits)), 4),
        "pointing_chance": round(chance, 4),
        "randomization_spearman": round(similarity["spearman"], 4),
        "randomization_spearman_abs": round(similarity["spearman_abs"], 4),
        "randomization": "full (reset_parameters on every module, BatchNorm statistics reset)",
        "constant_maps": {"trained": sum(int(np.ptp(h) == 0) for h in trained), "randomized": sum(int(np.ptp(h) == 0) for h in randomized)},
        "spearman_map_size": args.map_size,
        "test_auc": auc,
        "n_images": len(inputs),
        "n_patients": len(set(patients)),
        "n_skipped": skipped,
        "tolerance_px": tolerance,
        "method": args.method,
        "target_layer": layer,
        "map_grid": feature_size,
        "backbone": args.backbone,
        "weights": args.weights,
        "image_size": saved.info.image_size,
        "output_stride": saved.info.output_stride,
        "epochs": None if args.run else args.epochs,
        "run": str(run_dir),
        "train_seed": args.train_seed,
        "epochs_run": metrics.get("epochs_run"),
        "train_seconds": metrics.get("train_seconds"),
        "cam_seconds": round(time.perf_counter() - cam_started, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "criteria": CRITERIA,
        "pass": bool(passed),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="cam_trust_out", help="working folder (data, cache, run)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--output-stride", type=int, default=32, choices=(32, 16, 8), help="backbone output stride (16: last stage dilated)")
    parser.add_argument("--method", default="gradcam", choices=METHODS)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--target-layer", default=None, help="layer to explain (default: the backbone's CAM layer)")
    parser.add_argument("--weights", default="imagenet", help="imagenet (offline for efficientnet_lite0), none, or a file")
    parser.add_argument("--tolerance-px", type=int, default=None, help="mask dilation for a hit (default 2.5%% of the input side)")
    parser.add_argument("--map-size", type=int, default=32, help="side of the pooled maps compared by Spearman")
    parser.add_argument("--seed", type=int, default=0, help="seed of the randomised weights")
    parser.add_argument("--train-seed", type=int, default=0, help="seed of training (split, head init, augmentation, order)")
    parser.add_argument("--patients-per-class", type=int, default=None, help="training patients per class (smaller: faster smoke test)")
    parser.add_argument("--test-patients-per-class", type=int, default=40, help="more test patients: a steadier pointing-game estimate")
    parser.add_argument("--run", default=None, help="measure this finished run (e.g. a demo's finetune/) instead of training one")
    parser.add_argument("--data", default=None, help="with --run: the synthetic data folder it was trained on (its masks/)")
    args = parser.parse_args(argv)
    if bool(args.run) != bool(args.data):
        parser.error("--run and --data go together: the run, and the synthetic data folder (with masks/) it was trained on")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # libraries' prints must not break the one JSON line
        result = run(args)
    print(json.dumps(result), file=stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
