"""Linear probe with and without a feature cache (medtransfer.train.feature_probe).

    python benchmarks/linear_probe.py --data DATA/kermany-224 [--epochs 20] [--limit N]

Prints ONE JSON line on stdout (logs go to stderr). Both runs use the same images, the
same frozen backbone (default efficientnet_lite0 with its offline ImageNet weights), the
same eval transform (no augmentation), the same head initialisation, mini-batch order,
optimizer and precision:

(a) cached: one feature pass over train + val images (timed: feature_pass_seconds), then
    ``--epochs`` epochs of head training on the n x d feature matrix;
(b) uncached: every epoch runs the frozen backbone forward over all train images, feeds
    each batch to the head step, then forwards the val images for the val loss. Only
    ``--uncached-epochs`` epochs are run and the total is extrapolated to ``--epochs``
    (reported as uncached_epochs_measured).

Images come from a warm ImageCache (built before timing, not counted in either run).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from medtransfer.data.cache import CacheSettings, ImageCache
from medtransfer.data.datamodule import CachedImageDataset
from medtransfer.data.discover import IMAGE_SUFFIXES, SPLIT_NAMES, discover
from medtransfer.data.transforms import eval_transform
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import Strategy, TransferModel, build_transfer_model
from medtransfer.runtime import autocast, available_cores, default_num_workers, place_batch, place_model, resolve_precision
from medtransfer.train.feature_probe import epoch_batches, extract_features, train_head_on_features

IMAGE_SIZE = 224
DECODE_SIZE = 256
TARGETS = {"speedup": 10.0, "seconds_per_epoch_cached": 1.0}


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def load_records(root: Path, limit: int | None, val_fraction: float, seed: int):
    """(train pairs, val pairs, classes). Kaggle layout: official train/val (test ignored);
    DIR/CLASS/* : a seeded random val_fraction. ``limit`` keeps a seeded subset of each split."""
    rng = random.Random(seed)
    if any((root / s).is_dir() for s in SPLIT_NAMES):
        records = discover(root)
        train = [(r.path, r.label) for r in records if r.split == "train"]
        val = [(r.path, r.label) for r in records if r.split == "val"]
        if not val:
            rng.shuffle(train)
            cut = max(1, int(len(train) * val_fraction))
            val, train = train[:cut], train[cut:]
    else:
        pairs = [
            (p, p.parent.name)
            for p in sorted(root.rglob("*"))
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
        ]
        rng.shuffle(pairs)
        cut = max(1, int(len(pairs) * val_fraction))
        val, train = pairs[:cut], pairs[cut:]
    if limit:
        total = len(train) + len(val)
        n_val = max(2, round(limit * len(val) / total))
        rng.shuffle(train)
        rng.shuffle(val)
        train, val = train[: max(2, limit - n_val)], val[:n_val]
    classes = sorted({label for _, label in train + val})
    if len(classes) < 2:
        raise SystemExit(f"--data {root}: need at least 2 classes, found {classes}")
    return train, val, classes


class EpochBatchSampler:
    """Batches of the current epoch; set before each epoch (works with persistent workers)."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def frozen_model(args, classes) -> TransferModel:
    torch.manual_seed(args.seed)
    net, spec = create_backbone(args.backbone, num_classes=len(classes), weights=args.weights)
    model = build_transfer_model(net, spec, Strategy("linear-probe"))
    return place_model(model.eval(), torch.device("cpu"))


def uncached_run(model, head, train_set, val_set, *, epochs, batch_size, lr, weight_decay, seed, precision, workers):
    """The same probe without the feature cache: a backbone forward over every image each epoch."""
    device = torch.device("cpu")
    backbone = model.net
    parent_path, _, attr = model.spec.head.rpartition(".")
    parent = backbone.get_submodule(parent_path) if parent_path else backbone
    original = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    sampler = EpochBatchSampler()
    train_loader = DataLoader(train_set, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0)
    val_loader = DataLoader(val_set, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0)
    train_y = torch.as_tensor(train_set.labels)

    def features(images):
        with torch.inference_mode(), autocast(device, precision):
            out = backbone(place_batch(images, device)).float().flatten(1)
        return out.clone()  # leave inference mode for autograd through the head

    rows = []
    try:
        for epoch in range(1, epochs + 1):
            started = time.perf_counter()
            sampler.batches = [b.tolist() for b in epoch_batches(len(train_y), batch_size, generator)]
            loss_sum, seen = 0.0, 0
            for images, labels in train_loader:
                loss = nn.functional.cross_entropy(head(features(images)), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * len(labels)
                seen += len(labels)
            val_loss_sum, correct, n_val = 0.0, 0, 0
            with torch.no_grad():
                for images, labels in val_loader:
                    logits = head(features(images))
                    val_loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
                    correct += int((logits.argmax(1) == labels).sum())
                    n_val += len(labels)
            rows.append(
                {
                    "epoch": epoch,
                    "train_loss": loss_sum / seen,
                    "val_loss": val_loss_sum / n_val,
                    "val_acc": correct / n_val,
                    "seconds": time.perf_counter() - started,
                }
            )
            log(f"  uncached epoch {epoch}: {rows[-1]['seconds']:.2f} s, val_loss {rows[-1]['val_loss']:.4f}")
    finally:
        setattr(parent, attr, original)
        del train_loader, val_loader
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="Kaggle-layout folder (train/val) or DIR/CLASS/*")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--limit", type=int, default=None, help="use about N images in all (seeded subset)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", help="imagenet (offline for efficientnet_lite0), none or a file")
    parser.add_argument("--batch-size", type=int, default=64, help="for the feature pass and the head steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--uncached-epochs", type=int, default=2, help="uncached epochs run (then extrapolated)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="when the data has no val split")
    parser.add_argument("--cache-dir", type=Path, default=None, help="image cache (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    cores = available_cores()
    device = torch.device("cpu")
    precision = resolve_precision("auto", "cpu")
    workers = default_num_workers("cpu")
    train, val, classes = load_records(args.data, args.limit, args.val_fraction, args.seed)
    log(f"{len(train)} train + {len(val)} val images, classes {classes}, {cores} cores, precision {precision}")

    with contextlib.ExitStack() as stack:
        cache_dir = args.cache_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mt-probe-cache-")))
        started = time.perf_counter()
        images = ImageCache(cache_dir, CacheSettings(size=DECODE_SIZE)).build(
            [p for p, _ in train + val], workers=min(2, cores)
        )
        cache_seconds = time.perf_counter() - started
        log(f"image cache ready in {cache_seconds:.1f} s (not counted)")

        model = frozen_model(args, classes)
        norm = model.spec.normalization
        transform = eval_transform(image_size=IMAGE_SIZE, mean=norm.mean, std=norm.std)
        index = {c: i for i, c in enumerate(classes)}
        n_train = len(train)
        train_set = CachedImageDataset(images.subset(range(n_train)), [index[label] for _, label in train], transform)
        val_set = CachedImageDataset(
            images.subset(range(n_train, n_train + len(val))), [index[label] for _, label in val], transform
        )
        train_y, val_y = torch.as_tensor(train_set.labels), torch.as_tensor(val_set.labels)
        head_init = copy.deepcopy(model.head)
        common = dict(lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size, seed=args.seed)

        # (a) feature cache
        log("cached: feature pass")
        started = time.perf_counter()
        extract = dict(batch_size=args.batch_size, device=device, precision=precision, num_workers=workers)
        train_x = extract_features(model, train_set, **extract)
        val_x = extract_features(model, val_set, **extract)
        feature_pass = time.perf_counter() - started
        log(f"  {feature_pass:.2f} s for {len(train_x) + len(val_x)} images, {train_x.shape[1]} features")
        head = copy.deepcopy(head_init)
        started = time.perf_counter()
        history, _ = train_head_on_features(head, train_x, train_y, val_x, val_y, epochs=args.epochs, **common)
        head_seconds = time.perf_counter() - started
        per_epoch = head_seconds / len(history)
        log(f"  {len(history)} head epochs in {head_seconds:.3f} s; last val_loss {history[-1]['val_loss']:.4f}")

        # (b) no feature cache
        measured = min(args.uncached_epochs, args.epochs)
        log(f"uncached: {measured} epoch(s) of backbone forward + head step")
        started = time.perf_counter()
        rows = uncached_run(
            model, copy.deepcopy(head_init), train_set, val_set, epochs=measured, precision=precision, workers=workers, **common
        )
        uncached_measured_seconds = time.perf_counter() - started

    uncached_per_epoch = uncached_measured_seconds / measured
    total_cached = feature_pass + head_seconds
    total_uncached = uncached_per_epoch * args.epochs
    speedup = total_uncached / total_cached
    last = measured - 1
    return {
        "benchmark": "linear_probe",
        "backbone": args.backbone,
        "weights": args.weights,
        "feature_dim": int(train_x.shape[1]),
        "train_images": len(train),
        "val_images": len(val),
        "epochs": args.epochs,
        "epochs_run_cached": len(history),
        "feature_pass_seconds": round(feature_pass, 3),
        "seconds_per_epoch_cached": round(per_epoch, 4),
        "total_cached_seconds": round(total_cached, 3),
        "seconds_per_epoch_uncached": round(uncached_per_epoch, 3),
        "total_uncached_seconds": round(total_uncached, 3),
        "uncached_epochs_measured": measured,
        "uncached_extrapolated": measured < args.epochs,
        "speedup": round(speedup, 2),
        "targets": TARGETS,
        "targets_met": {
            "speedup": speedup >= TARGETS["speedup"],
            "seconds_per_epoch_cached": per_epoch < TARGETS["seconds_per_epoch_cached"],
        },
        # same head, same batches: the two runs should agree up to bf16 / kernel rounding
        "agreement": {
            "epoch": measured,
            "cached_val_loss": round(history[last]["val_loss"], 5) if last < len(history) else None,
            "uncached_val_loss": round(rows[-1]["val_loss"], 5),
        },
        "final_val_acc_cached": round(history[-1]["val_acc"], 4),
        "image_cache_seconds_not_counted": round(cache_seconds, 2),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "precision": precision,
        "num_workers": workers,
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "data": str(args.data),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):
        result = run(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
