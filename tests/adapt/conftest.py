"""Runs and new "sites" of unlabelled images for the adapt tests, built in seconds without training.

`random_run(folder)` saves an untrained ResNet-18 (32 px) with a split.csv of validation images;
`brightness_run(folder)` the same network with its classifier set to call bright images PNEUMONIA:
informative, calibrated posteriors without training, so that prior estimates and BatchNorm
re-estimation can be checked against a known truth. `brightness_image` writes one such image, with
an optional change of appearance (another scanner); `unlabelled_folder` noise images under
misleading class-folder names.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from medtransfer.ood import save_detector
from tests.conftest import write_image


def invoke(args: list) -> int:
    """The console script's entry point, in-process; its exit code."""
    from medtransfer.cli import main

    saved_argv = sys.argv
    sys.argv = ["medtransfer", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as exit_:
        return exit_.code or 0
    finally:
        sys.argv = saved_argv


def random_run(folder: Path, *, val_images: int = 12, detector: bool = False) -> Path:
    """An untrained ResNet-18 run folder (32 px) whose split.csv lists `val_images` validation images of both classes."""
    import torch

    from medtransfer.artifacts import model_info, save_model
    from medtransfer.models.backbones import create_backbone
    from medtransfer.models.strategies import Strategy, build_transfer_model

    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    model = build_transfer_model(net, spec, Strategy("finetune", 0))
    info = model_info(model, classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", threshold=0.5, temperature=1.0,
                      image_size=32, decode_size=40, threshold_policy="youden",
                      training_config={"calibrate": "temperature", "threshold": "youden", "labels": "folder"})
    save_model(model, info, folder)
    rows = []
    for i in range(val_images):
        label = ("NORMAL", "PNEUMONIA")[i % 2]
        path = write_image(folder / "val-images" / f"v{i:03d}.png", "L", size=(40, 40))
        rows.append({"path": str(path), "label": label, "patient_id": f"v{i}", "split": "val"})
    with (folder / "split.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "patient_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    if detector:
        save_detector(random_detector(threshold=-1.0), folder / "model")  # every image flagged
    return folder


def brightness_image(path: Path, bright: bool, seed: int, *, contrast: float = 1.0, offset: float = 0.0) -> Path:
    """A 40 px noise image, bright (PNEUMONIA in the brightness runs) or dark (NORMAL); `contrast` and `offset`
    change its appearance (another scanner) as pixel * contrast + offset."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = 150 if bright else 0
    pixels = rng.integers(low, low + 106, size=(40, 40)).astype(np.float64) * contrast + offset
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def brightness_run(folder: Path, *, val_images: int = 60, detector: bool = False) -> Path:
    """An untrained ResNet-18 whose classifier is set to call bright images PNEUMONIA: calibrated, informative
    posteriors without training. Validation images: half bright (PNEUMONIA), half dark (NORMAL), prior 0.5."""
    import torch

    from medtransfer.artifacts import load_model, save_model
    from medtransfer.ood import PENULTIMATE, capture

    random_run(folder, val_images=0)
    rows = []
    for i in range(val_images):
        bright = i % 2 == 1
        path = brightness_image(folder / "val-images" / f"b{i:03d}.png", bright, seed=i)
        rows.append({"path": str(path), "label": "PNEUMONIA" if bright else "NORMAL", "patient_id": f"b{i}", "split": "val"})
    with (folder / "split.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "patient_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    saved = load_model(folder)
    images = torch.stack([saved.preprocess(str(folder / "val-images" / f"b{i:03d}.png")) for i in range(2)])
    with torch.no_grad(), capture(saved.model, []) as captured:
        saved.model(images)
    dark, bright = captured[PENULTIMATE]
    direction = (bright - dark) / (bright - dark).norm() ** 2 * 8.0  # logit difference +-4 at the two images
    fc = saved.model.head
    with torch.no_grad():
        fc.weight.zero_()
        fc.weight[1] = direction
        fc.bias.zero_()
        fc.bias[1] = -float(direction @ (bright + dark) / 2)
    save_model(saved.model, saved.info, folder)
    if detector:
        save_detector(random_detector(threshold=1e9), folder / "model")  # an OOD guard that flags nothing
    return folder


def random_detector(*, threshold: float):
    """A kNN OOD guard on random 512-wide features (ResNet-18's penultimate width) with the given threshold."""
    import torch

    from medtransfer.ood import fit_detector

    fitted = fit_detector(torch.randn(40, 512), torch.zeros(40).long().numpy(), torch.randn(20, 512), method="knn")
    fitted.thresholds = {name: threshold for name in fitted.thresholds}
    return fitted


def unlabelled_folder(folder: Path, count: int) -> Path:
    """`count` noise images under misleading class-folder names."""
    for i in range(count):
        write_image(folder / ("PNEUMONIA" if i % 3 else "NORMAL") / f"img{i:03d}.png", "L", size=(40, 40))
    return folder


def tiny_two_class_model():
    """A seeded resnet18 with a two-class head in eval mode (random weights): for checks of folded biases."""
    import torch

    from medtransfer.models.backbones import create_backbone
    from medtransfer.models.strategies import Strategy, build_transfer_model

    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    return build_transfer_model(net, spec, Strategy("finetune", 0)).eval()
