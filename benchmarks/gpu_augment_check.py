"""GPU check of the batched augmentation: the CPU and the GPU give the same images, and its cost.

    python benchmarks/gpu_augment_check.py --batch-size 256

Prints ONE JSON line: per policy, the largest difference between the CPU and the CUDA result
for the same uint8 batch and parameter rows, and the milliseconds per batch on the GPU
(uint8 256 px -> float 224 px in [0, 1], synchronised), for a batch of per-image parameters.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from medtransfer.data.augment import Policy, augment_batch, draw_params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--source-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, args.source_size, args.source_size), dtype=torch.uint8,
                           generator=generator)
    result = {"benchmark": "gpu_augment_check", "gpu": torch.cuda.get_device_name(0), "batch_size": args.batch_size}
    for name in ("light", "radiograph", "trivial"):
        rows, extras = draw_params(Policy(name), args.batch_size, generator), name != "light"
        on_cpu = augment_batch(images, rows, size=args.image_size, extras=extras)
        gpu_images, gpu_rows = images.pin_memory().cuda(non_blocking=True), rows.cuda()
        on_gpu = augment_batch(gpu_images, gpu_rows, size=args.image_size, extras=extras)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            augment_batch(gpu_images, gpu_rows, size=args.image_size, extras=extras)
        torch.cuda.synchronize()
        result[name] = {
            "max_abs_diff_cpu_vs_gpu": float((on_gpu.cpu() - on_cpu).abs().max()),
            "ms_per_batch": round(1000 * (time.perf_counter() - start) / args.repeats, 3),
        }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
