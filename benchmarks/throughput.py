"""Training throughput: the seed script's pipeline vs medtransfer's cached, bf16, channels_last loop.

    python benchmarks/throughput.py --data DATA/kermany-fullres-sample
    python benchmarks/throughput.py --data DIR --device cuda --backbone resnet50 --batch-size 128
    python benchmarks/throughput.py --device cuda --backbone resnet50 --batch-size 256 --steps 40 \
        --precision bf16-mixed --augment radiograph --compile     # no --data: synthetic images

With ``--device cuda`` only two phases run, on the GPU: project_img_s and model_only_img_s
(bf16/fp16 autocast, channels_last unless --no-channels-last, pinned batches, weights none)
and their efficiency. The project phase is the real training path: uint8 batches leave the
cache pinned and are moved non_blocking; augmentation (``--augment``, per-image parameters)
and normalisation run on the GPU in TransferDataModule.on_after_batch_transfer
(``--augment-on device``, the default there; ``workers`` augments in the loader processes).
Without ``--data`` a synthetic chest X-ray set is generated into a temporary folder, so
nothing is downloaded.

Prints ONE JSON line on stdout (logs go to stderr). Every figure comes from this one run,
on this machine, with the same model (torchvision resnet18, random init, 2 classes,
224 px) and the same images:

- seed_style_img_s: PIL full decode + Resize(256) + RandomCrop(224) + ToTensor + Normalize,
  fp32, NCHW, DataLoader(num_workers=min(4, cores)), plain AdamW step;
- project_img_s: warm ImageCache (built beforehand, not timed) -> CachedImageDataset with
  medtransfer's train_transform -> TransferDataModule(num_workers=default_num_workers("cpu"))
  -> ClassifierModule in a real L.Trainer, channels_last, resolve_precision("auto", "cpu");
- model_only_img_s: the same model, step, precision and memory format on in-memory random
  tensors (the ceiling: no data loading at all); speedup_ceiling = model_only / seed style,
  the most any loader could give;
- model_only_fp32_nchw_img_s: the seed style's step (fp32, NCHW) on in-memory tensors, and
  seed_style_loader_share = the fraction of the seed style's time its loading costs;
- cache_build_img_s (and _workers2): ImageCache.build into a fresh temporary cache dir,
  vs full_decode_img_s: PIL full-resolution decode + Resize(256), one process.

Training phases exclude the first ``--warmup-batches`` batches (worker start-up, lazy
initialisation) and time from the end of the last warm-up step to the end of the last
step, with time.perf_counter. Files are read once before any timed phase so every
phase sees the same (warm) page cache.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from medtransfer.data.cache import CacheSettings, ImageCache
from medtransfer.data.datamodule import CachedImageDataset, TransferDataModule
from medtransfer.data.discover import IMAGE_SUFFIXES, SPLIT_NAMES, discover
from medtransfer.data.transforms import train_transform
from medtransfer.models.backbones import create_backbone
from medtransfer.models.module import ClassifierModule
from medtransfer.models.strategies import Strategy, TransferModel, build_transfer_model
from medtransfer.runtime import (
    autocast,
    available_cores,
    default_num_workers,
    place_batch,
    place_model,
    resolve_precision,
)

BACKBONE = "resnet18"
IMAGE_SIZE = 224
DECODE_SIZE = 256
LR = 1e-3
WEIGHT_DECAY = 1e-4
TARGETS = {"speedup": 3.0, "efficiency": 0.9, "cache_speedup": 3.0}


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data


def list_images(root: Path, limit: int | None, seed: int = 0) -> tuple[list[Path], list[int], list[str]]:
    """(paths, labels, classes): Kaggle layout via discover(), else DIR/CLASS/*.ext (label = parent folder).

    A seeded shuffle picks ``limit`` images so that a small limit still mixes the classes.
    """
    if any((root / split).is_dir() for split in SPLIT_NAMES):
        pairs = [(r.path, r.label) for r in discover(root)]
    else:
        pairs = [
            (p, p.parent.name)
            for p in sorted(root.rglob("*"))
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
        ]
    if not pairs:
        raise SystemExit(f"--data {root}: no images found")
    random.Random(seed).shuffle(pairs)
    pairs = pairs[:limit] if limit else pairs
    classes = sorted({label for _, label in pairs})
    return [p for p, _ in pairs], [classes.index(label) for _, label in pairs], classes


class SeedStyleDataset(Dataset):
    """What torchvision.datasets.ImageFolder does: PIL open + convert("RGB") + transform."""

    def __init__(self, paths: list[Path], labels: list[int], transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.labels[index]


def seed_transform(normalization) -> T.Compose:
    return T.Compose(
        [
            T.Resize(DECODE_SIZE),
            T.RandomCrop(IMAGE_SIZE),
            T.ToTensor(),
            T.Normalize(list(normalization.mean), list(normalization.std)),
        ]
    )


# --------------------------------------------------------------------------- timing


class Meter:
    """Counts images after the warm-up steps and the time they took; optional time cap."""

    def __init__(self, warmup: int, cap_seconds: float | None, steps: int | None = None):
        self.warmup, self.cap, self.max_steps = warmup, cap_seconds, steps
        self.steps = 0
        self.images = 0
        self.start: float | None = None
        self.end: float | None = None

    def step_done(self, batch_size: int) -> bool:
        """Call after each optimizer step; returns True when the time cap or the timed steps are reached."""
        now = time.perf_counter()
        self.steps += 1
        if self.steps == self.warmup:
            self.start = now
        elif self.steps > self.warmup:
            self.images += batch_size
            self.end = now
        if self.max_steps is not None and self.steps >= self.warmup + self.max_steps:
            return True
        return self.cap is not None and self.start is not None and now - self.start >= self.cap

    def rate(self) -> float | None:
        if not self.images or self.start is None or self.end is None:
            return None
        return self.images / (self.end - self.start)


class MeterCallback(L.Callback):
    def __init__(self, meter: Meter):
        self.meter = meter

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()  # time finished steps, as model_only does
        if self.meter.step_done(len(batch[1])):
            trainer.should_stop = True


def new_model(classes: int, seed: int = 0, backbone: str = BACKBONE) -> TransferModel:
    torch.manual_seed(seed)
    net, spec = create_backbone(backbone, num_classes=classes, weights="none")
    return build_transfer_model(net, spec, Strategy("finetune"))


def train_step(model, optimizer, images, labels, *, channels_last: bool, device, precision: str) -> None:
    with autocast(device, precision):
        logits = model(place_batch(images, device, channels_last=channels_last))
    loss = nn.functional.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def seed_style(paths, labels, classes, *, batch_size, warmup, cap, cores) -> dict:
    model = new_model(len(classes))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    workers = min(4, cores)
    dataset = SeedStyleDataset(paths, labels, seed_transform(model.spec.normalization))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=len(paths) > batch_size)
    meter = Meter(warmup, cap)
    device = torch.device("cpu")
    iterator = iter(loader)
    for images, targets in iterator:
        train_step(model, optimizer, images, targets, channels_last=False, device=device, precision="32-true")
        if meter.step_done(len(targets)):
            break
    del iterator, loader
    return {"img_s": meter.rate(), "images_timed": meter.images, "num_workers": workers}


def project(
    cache_images, labels, classes, *, batch_size, warmup, cap, precision, accelerator="cpu", backbone=BACKBONE,
    image_size=IMAGE_SIZE, augment="light", on_device=False, channels_last=True, compile=False, steps=None, workers=None,
) -> dict:
    model = new_model(len(classes), backbone=backbone)
    norm = model.spec.normalization
    transform = train_transform(image_size=image_size, mean=norm.mean, std=norm.std, policy=augment, on_device=on_device)
    train_set = CachedImageDataset(cache_images, labels, transform)
    workers = default_num_workers(accelerator) if workers is None else workers
    datamodule = TransferDataModule(
        train=train_set, val=train_set, batch_size=batch_size, num_workers=workers, pin_memory=accelerator == "gpu"
    )
    module = ClassifierModule(model, lr=LR, weight_decay=WEIGHT_DECAY, warmup_epochs=0, channels_last=channels_last)
    if compile:
        module.model.net.compile()
    meter = Meter(warmup, cap, steps)
    batches = len(labels) // batch_size if len(labels) > batch_size else 1
    epochs = 1 if steps is None else -(-(warmup + steps) // batches)  # enough epochs for the steps asked
    trainer = L.Trainer(
        default_root_dir=tempfile.mkdtemp(prefix="mt-bench-lightning-"),  # nothing is written there
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_epochs=epochs,
        limit_train_batches=batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        callbacks=[MeterCallback(meter)],
    )
    trainer.fit(module, datamodule=datamodule)
    del trainer, datamodule, module
    gc.collect()
    return {"img_s": meter.rate(), "images_timed": meter.images, "num_workers": workers, "steps_timed": meter.steps - warmup}


def model_only(
    classes, *, batch_size, batches, warmup, cap, precision, channels_last: bool = True,
    device: torch.device = torch.device("cpu"), backbone: str = BACKBONE, image_size: int = IMAGE_SIZE,
    compile: bool = False, steps: int | None = None,
) -> dict:
    model = place_model(new_model(len(classes), backbone=backbone), device, channels_last=channels_last)
    model.train()
    if compile:
        model.net.compile()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)
    labels = torch.randint(0, len(classes), (batch_size,), generator=generator).to(device)
    batches = batches if steps is None else warmup + steps
    meter = Meter(warmup, cap, steps)
    for _ in range(batches):
        train_step(model, optimizer, images, labels, channels_last=channels_last, device=device, precision=precision)
        if device.type == "cuda":
            torch.cuda.synchronize()  # the meter times finished steps, not queued kernels
        if meter.step_done(batch_size):
            break
    return {"img_s": meter.rate(), "images_timed": meter.images, "steps_timed": meter.steps - warmup}


def full_decode(paths, cap) -> tuple[float, int]:
    """PIL full-resolution decode + Resize(256), one process; returns (img/s, images done)."""
    resize = T.Resize(DECODE_SIZE)
    start = time.perf_counter()
    done = 0
    for path in paths:
        with Image.open(path) as image:
            resize(image.convert("RGB"))
        done += 1
        if cap is not None and time.perf_counter() - start >= cap:
            break
    return done / (time.perf_counter() - start), done


def cache_build(paths, workers: int) -> float:
    with tempfile.TemporaryDirectory(prefix="mt-bench-cache-") as root:
        cache = ImageCache(root, CacheSettings(size=DECODE_SIZE))
        start = time.perf_counter()
        images = cache.build(paths, workers=workers)
        seconds = time.perf_counter() - start
    if images.built != len(set(map(os.path.abspath, paths))):
        log(f"note: cache decoded {images.built} of {len(paths)} images (duplicate contents are decoded once)")
    return len(paths) / seconds


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="DIR/CLASS/*.jpeg or a Kaggle-layout folder (default with --device cuda: synthetic images)")
    parser.add_argument("--images", type=int, default=None, help="number of images (default: all; synthetic: enough for the timed steps in one epoch, at least 512)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache for the project phase (default: a temp dir)")
    parser.add_argument("--seconds-per-phase", type=float, default=None, help="cap on each timed phase")
    parser.add_argument("--warmup-batches", type=int, default=1, help="batches excluded from each training phase")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: only project vs model-only on the GPU (the CPU-only phases are skipped)")
    gpu = parser.add_argument_group("--device cuda")
    gpu.add_argument("--backbone", default=BACKBONE, help="e.g. resnet50, the GPU target (weights none: no download)")
    gpu.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    gpu.add_argument("--steps", type=int, default=None, help="timed steps per phase after the warm-up (default: one epoch)")
    gpu.add_argument("--precision", default="auto", help="auto (bf16-mixed where supported), bf16-mixed, 16-mixed, 32-true")
    gpu.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    gpu.add_argument("--compile", action="store_true", help="torch.compile the network in both phases")
    gpu.add_argument("--augment", default="light", choices=("light", "radiograph", "trivial"))
    gpu.add_argument("--augment-on", default="device", choices=("device", "workers"),
                     help="device: augmentation and normalisation on the GPU after the transfer (default)")
    gpu.add_argument("--num-workers", type=int, default=None, help="loader workers (default: default_num_workers)")
    return parser.parse_args(argv)


def synthetic_data(root: Path, images: int, distinct: int = 256) -> Path:
    """A generated chest X-ray set (Kaggle layout, 288 px) of ``images`` files: no download.

    At most ``distinct`` images are drawn (generating is slow); the rest are copies under new
    names, which the cache decodes once and the loader reads as any other image.
    """
    from medtransfer.data.synthetic import generate_demo_dataset

    per_class = max(2, min(images, distinct) // 2)
    generate_demo_dataset(root, patients_per_class=per_class, images_per_patient=(1, 1), val_patients_per_class=1,
                          test_patients_per_class=1, image_size=288, seed=0)
    drawn = sorted(p for p in (root / "train").rglob("*") if p.is_file())
    for i in range(max(0, images - len(drawn))):
        source = drawn[i % len(drawn)]
        (source.parent / f"copy{i}-{source.name}").write_bytes(source.read_bytes())
    return root


def run_cuda(args: argparse.Namespace) -> dict:
    """Project (warm cache, Lightning on the GPU, augmentation on the GPU) vs model-only (random tensors on the GPU)."""
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    with contextlib.ExitStack() as stack:
        if args.data is None:
            # One epoch must hold every timed step: with a few batches per epoch, each epoch's start
            # (workers refilling, Lightning's epoch hooks) is timed too (an H200 run of 516 images,
            # 2 batches of 256 per epoch, measured efficiency 0.21 that way).
            wanted = (args.warmup_batches + (args.steps or 30) + 1) * args.batch_size
            args.data = synthetic_data(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mt-bench-data-"))) / "xray",
                                       args.images or max(512, wanted))
        return _run_cuda(args, stack)


def _run_cuda(args: argparse.Namespace, stack: contextlib.ExitStack) -> dict:
    paths, labels, classes = list_images(args.data, args.images)
    batches = len(paths) // args.batch_size
    if args.steps is None and batches <= args.warmup_batches:
        raise SystemExit(f"{len(paths)} images give {batches} batch(es) of {args.batch_size}; use more --images or --steps")
    if batches < 1:
        raise SystemExit(f"{len(paths)} images give no batch of {args.batch_size}; use more --images")
    precision = resolve_precision(args.precision, "gpu")
    common = dict(batch_size=args.batch_size, warmup=args.warmup_batches, cap=args.seconds_per_phase, steps=args.steps,
                  precision=precision, backbone=args.backbone, image_size=args.image_size, compile=args.compile,
                  channels_last=args.channels_last)
    cache_size = max(DECODE_SIZE, args.image_size + args.image_size // 7)
    cache_dir = args.cache_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mt-bench-warm-")))
    cached = ImageCache(cache_dir, CacheSettings(size=cache_size)).build(paths, workers=available_cores())
    log("phase: model only on the GPU (random tensors)")
    ceiling = model_only(classes, batches=batches, device=torch.device("cuda"), **common)
    log(f"  {ceiling}")
    log(f"phase: project on the GPU (warm cache, Lightning, augment {args.augment} on {args.augment_on})")
    proj = project(cached, labels, classes, accelerator="gpu", augment=args.augment,
                   on_device=args.augment_on == "device", workers=args.num_workers, **common)
    log(f"  {proj}")
    efficiency = round(proj["img_s"] / ceiling["img_s"], 3) if proj["img_s"] and ceiling["img_s"] else None
    return {
        "benchmark": "throughput_cuda", "project_img_s": proj["img_s"], "model_only_img_s": ceiling["img_s"],
        "efficiency": efficiency, "target": "efficiency >= 0.9", "target_met": bool(efficiency and efficiency >= 0.9),
        "gpu": torch.cuda.get_device_name(0), "backbone": args.backbone, "weights": "none", "image_size": args.image_size,
        "batch_size": args.batch_size, "precision": precision, "channels_last": args.channels_last,
        "compile": args.compile, "augment": args.augment, "augment_on": args.augment_on,
        "num_workers": proj["num_workers"], "steps_timed": {"project": proj["steps_timed"], "model_only": ceiling["steps_timed"]},
        "images": len(paths), "cache_size": cache_size, "cores": available_cores(), "torch": torch.__version__,
        "data": str(args.data) if args.cache_dir or "mt-bench-data-" not in str(args.data) else "synthetic",
    }


def run(args: argparse.Namespace) -> dict:
    if args.device == "cuda":
        return run_cuda(args)
    if args.data is None:
        raise SystemExit("--data: required with --device cpu (the seed style's phase reads image files)")
    cores = available_cores()
    paths, labels, classes = list_images(args.data, args.images)
    n = len(paths)
    batches = n // args.batch_size if n > args.batch_size else 1  # drop_last, as the DataModule does
    if args.warmup_batches < 1:
        raise SystemExit("--warmup-batches: at least 1 (the first batch carries worker start-up)")
    if batches <= args.warmup_batches:
        raise SystemExit(
            f"{n} images at batch size {args.batch_size} give {batches} batch(es), none left after "
            f"{args.warmup_batches} warm-up batch(es); use more --images or a smaller --batch-size"
        )
    precision = resolve_precision("auto", "cpu")
    log(f"{n} images, {len(classes)} classes {classes}, {cores} cores, torch {torch.__version__}, precision {precision}")
    for path in paths:  # same warm page cache for every phase
        path.read_bytes()

    log("phase: full decode (PIL, full resolution, Resize(256))")
    full_decode_img_s, decoded = full_decode(paths, args.seconds_per_phase)
    same = paths[:decoded]
    log(f"  {full_decode_img_s:.1f} img/s over {decoded} images")
    log("phase: cache build, fresh cache, workers=1 and workers=2")
    build_img_s = cache_build(same, workers=1)
    build2_img_s = cache_build(same, workers=2)
    log(f"  {build_img_s:.1f} img/s (1 process), {build2_img_s:.1f} img/s (2 workers)")

    with contextlib.ExitStack() as stack:
        cache_dir = args.cache_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mt-bench-warm-")))
        cached = ImageCache(cache_dir, CacheSettings(size=DECODE_SIZE)).build(paths, workers=min(2, cores))
        common = dict(batch_size=args.batch_size, warmup=args.warmup_batches, cap=args.seconds_per_phase)
        log("phase: model only (random tensors)")
        ceiling = model_only(classes, batches=batches, precision=precision, **common)
        log(f"  {ceiling}")
        log("phase: model only, fp32 NCHW (the seed style's step without its loader)")
        seed_step = model_only(classes, batches=batches, precision="32-true", channels_last=False, **common)
        log(f"  {seed_step}")
        log("phase: project (warm cache, Lightning)")
        proj = project(cached, labels, classes, precision=precision, **common)
        log(f"  {proj}")
    log("phase: seed style (PIL full decode in DataLoader workers, fp32, NCHW)")
    seed = seed_style(paths, labels, classes, cores=cores, **common)
    log(f"  {seed}")

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    speedup = ratio(proj["img_s"], seed["img_s"])
    efficiency = ratio(proj["img_s"], ceiling["img_s"])
    cache_speedup = ratio(build_img_s, full_decode_img_s)
    values = {"speedup": speedup, "efficiency": efficiency, "cache_speedup": cache_speedup}
    rnd = lambda v: round(v, 2) if v is not None else None  # noqa: E731
    return {
        "benchmark": "throughput",
        "seed_style_img_s": rnd(seed["img_s"]),
        "project_img_s": rnd(proj["img_s"]),
        "model_only_img_s": rnd(ceiling["img_s"]),
        "speedup": speedup,
        "efficiency": efficiency,
        # No loader can lift the speedup above this: the project's step on in-memory tensors over the seed style.
        "speedup_ceiling": ratio(ceiling["img_s"], seed["img_s"]),
        "model_only_fp32_nchw_img_s": rnd(seed_step["img_s"]),
        "seed_style_loader_share": ratio(seed_step["img_s"] - seed["img_s"], seed_step["img_s"]) if seed["img_s"] and seed_step["img_s"] else None,
        "cache_build_img_s": rnd(build_img_s),
        "cache_build_img_s_workers2": rnd(build2_img_s),
        "full_decode_img_s": rnd(full_decode_img_s),
        "cache_speedup": cache_speedup,
        "targets": TARGETS,
        "targets_met": {k: v is not None and v >= TARGETS[k] for k, v in values.items()},
        "project_loop": "lightning",
        "images": n,
        "images_timed": {
            "seed_style": seed["images_timed"],
            "project": proj["images_timed"],
            "model_only": ceiling["images_timed"],
            "model_only_fp32_nchw": seed_step["images_timed"],
            "decode_and_cache_build": decoded,
        },
        "batch_size": args.batch_size,
        "warmup_batches_excluded": args.warmup_batches,
        "seconds_per_phase": args.seconds_per_phase,
        "num_workers": {"seed_style": seed["num_workers"], "project": proj["num_workers"]},
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": L.__version__,
        "precision": precision,
        "channels_last": True,
        "model": f"{BACKBONE} (weights none), {len(classes)} classes, {IMAGE_SIZE} px, AdamW",
        "data": str(args.data),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # one JSON line on stdout, nothing else
        result = run(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
