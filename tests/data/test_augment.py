"""Per-image augmentation parameters and their batched application (medtransfer.data.augment)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from medtransfer.data.augment import (
    COLUMNS,
    NOISE_STD,
    POLICIES,
    TRIVIAL_OPS,
    Policy,
    augment_batch,
    draw_params,
    identity_params,
)
from medtransfer.data.cache import CachedImages
from medtransfer.data.datamodule import CachedImageDataset, TransferDataModule
from medtransfer.data.transforms import train_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
AUGMENTING = [p for p in POLICIES if p != "none"]


def _images(n: int = 6, channels: int = 1, size: int = 40, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(n, channels, size, size), dtype=np.uint8))


def _rows(n: int = 1, **values: float) -> torch.Tensor:
    rows = identity_params(n)
    for name, value in values.items():
        rows[:, COLUMNS.index(name)] = value
    return rows


@pytest.mark.parametrize("policy", AUGMENTING)
def test_each_image_of_a_batch_gets_its_own_parameters_and_result(policy):
    rows = draw_params(Policy(policy), 16, torch.Generator().manual_seed(0))
    assert len({tuple(r.tolist()) for r in rows}) == 16
    same = _images(1).expand(16, -1, -1, -1)  # one image sixteen times
    out = augment_batch(same, rows, size=32)
    assert len({out[i].numpy().tobytes() for i in range(16)}) > 12  # trivial may draw identity a few times


@pytest.mark.parametrize("policy", AUGMENTING)
@pytest.mark.parametrize("channels", [1, 3])
def test_output_is_float32_of_the_asked_size_in_the_unit_range(policy, channels):
    rows = draw_params(Policy(policy, horizontal_flip=True), 5, torch.Generator().manual_seed(1))
    out = augment_batch(_images(5, channels, size=60), rows, size=24)
    assert out.dtype == torch.float32 and out.shape == (5, channels, 24, 24)
    assert out.min() >= 0 and out.max() <= 1 and not out.isnan().any()


@pytest.mark.parametrize("policy", AUGMENTING)
def test_a_fixed_seed_reproduces_the_parameters_and_the_image(policy):
    transform = train_transform(image_size=32, mean=MEAN, std=STD, policy=policy)
    image = _images(1)[0]
    torch.manual_seed(7)
    first = transform(image)
    torch.manual_seed(7)
    assert torch.equal(transform(image), first)
    assert not torch.equal(transform(image), first)
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32


def test_none_draws_the_identity_and_identity_rows_leave_the_image_as_it_is():
    assert torch.equal(draw_params(Policy("none"), 3), identity_params(3))
    images = _images(3)
    np.testing.assert_allclose(augment_batch(images, identity_params(3), size=40).numpy(), images.numpy() / 255, atol=1e-5)


def test_flip_mirrors_exactly_and_integer_shifts_move_pixels():
    images = _images(2, size=20)
    flipped = augment_batch(images, _rows(2, flip=1.0), size=20)
    np.testing.assert_allclose(flipped.numpy(), torch.flip(images, dims=[-1]).numpy() / 255, atol=1e-5)
    shifted = augment_batch(images, _rows(2, tx=3 / 20), size=20)  # sample 3 px to the right
    expected = torch.zeros_like(images, dtype=torch.float32)
    expected[..., :-3] = images[..., 3:] / 255
    np.testing.assert_allclose(shifted.numpy(), expected.numpy(), atol=1e-5)


def test_crop_of_a_quarter_area_at_a_corner_is_that_quadrant_upsampled():
    images = _images(1, size=32)
    out = augment_batch(images, _rows(1, scale=0.25, cx=-1.0, cy=-1.0), size=16)  # top-left 16 x 16, no resize
    np.testing.assert_allclose(out.numpy(), images[..., :16, :16].numpy() / 255, atol=1e-5)


def test_intensity_operations_match_their_formulas():
    images = _images(1, size=16)
    x = images.float() / 255
    bright = augment_batch(images, _rows(brightness=1.3), size=16)
    np.testing.assert_allclose(bright.numpy(), (x * 1.3).clamp(0, 1).numpy(), atol=1e-5)
    contrast = augment_batch(images, _rows(contrast=0.5), size=16)
    np.testing.assert_allclose(contrast.numpy(), (0.5 * x + 0.5 * x.mean()).numpy(), atol=1e-5)
    gamma = augment_batch(images, _rows(gamma=1.2), size=16)
    np.testing.assert_allclose(gamma.numpy(), (x**1.2).numpy(), atol=1e-5)


def test_blur_is_torchvisions_gaussian_blur_and_sharpening_is_an_unsharp_mask():
    images = _images(2, channels=3, size=24)
    x = images.float() / 255
    blurred = augment_batch(images, _rows(2, sigma=0.8, detail=-1.0), size=24)
    reference = TF.gaussian_blur(x, kernel_size=[9, 9], sigma=[0.8, 0.8])  # radius 4 = ceil(3 * 1.2), reflect padding
    np.testing.assert_allclose(blurred.numpy(), reference.numpy(), atol=1e-5)
    sharp = augment_batch(images, _rows(2, sigma=1.0, detail=0.5), size=24)
    unsharp = x + 0.5 * (x - TF.gaussian_blur(x, kernel_size=[9, 9], sigma=[1.0, 1.0]))
    np.testing.assert_allclose(sharp.numpy(), unsharp.clamp(0, 1).numpy(), atol=1e-5)


def test_noise_has_the_drawn_strength_differs_per_seed_and_is_the_same_in_every_channel():
    gray = torch.full((2, 3, 64, 64), 128, dtype=torch.uint8)
    rows = _rows(2, noise=0.02)
    rows[:, COLUMNS.index("noise_seed")] = torch.tensor([5.0, 6.0])
    out = augment_batch(gray, rows, size=64) - 128 / 255
    assert out[0].std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(out[0, 0], out[0, 2]) and not torch.allclose(out[0], out[1])
    assert torch.equal(augment_batch(gray, rows, size=64), augment_batch(gray, rows, size=64))


def test_radiograph_never_flips_unless_asked_and_keeps_its_ranges():
    rows = draw_params(Policy("radiograph"), 4000, torch.Generator().manual_seed(0))
    column = lambda name: rows[:, COLUMNS.index(name)]  # noqa: E731
    assert column("flip").sum() == 0
    assert column("angle").abs().max() <= 10 and column("scale").min() >= 0.6
    noisy = column("noise") > 0
    assert 0.25 < noisy.float().mean() < 0.35 and column("noise")[noisy].min() >= NOISE_STD[0]
    assert 0.15 < (column("detail") == -1).float().mean() < 0.25  # blurred
    assert 0.15 < (column("detail") > 0).float().mean() < 0.25  # sharpened
    flips = draw_params(Policy("radiograph", horizontal_flip=True), 4000, torch.Generator().manual_seed(0))
    assert 0.45 < flips[:, COLUMNS.index("flip")].mean() < 0.55


def test_trivial_applies_one_uniformly_drawn_operation_per_image():
    n = len(TRIVIAL_OPS) * 500
    rows = draw_params(Policy("trivial"), n, torch.Generator().manual_seed(0))
    changed = (rows - identity_params(n)).ne(0)
    changed[:, COLUMNS.index("noise_seed")] = False
    changed[:, [COLUMNS.index("cx"), COLUMNS.index("cy")]] = False  # a crop's position goes with its scale
    changed[:, COLUMNS.index("sigma")] &= rows[:, COLUMNS.index("detail")] == -1  # a sharpen's base blur
    changed[:, COLUMNS.index("detail")] &= rows[:, COLUMNS.index("detail")] != -1  # a blur's amount
    assert changed.sum(dim=1).max() == 1
    ops = Counter(tuple(row.nonzero().flatten().tolist()) for row in changed)
    assert len(ops) == len(TRIVIAL_OPS)  # identity () and each operation
    assert all(350 < count < 650 for count in ops.values())


def test_bad_policy_names_are_refused():
    with pytest.raises(ValueError, match="choose one of none, light, radiograph, trivial"):
        Policy("flips")
    with pytest.raises(ValueError, match="eval_transform"):
        train_transform(image_size=32, mean=MEAN, std=STD, policy="none")


class _Images(CachedImages):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i, 0].numpy()


@pytest.mark.parametrize("policy", AUGMENTING)
def test_device_path_finishes_the_batch_after_transfer_exactly_as_workers_do_per_image(policy):
    images = _Images(_images(6, size=40))
    kwargs = dict(image_size=32, mean=MEAN, std=STD, policy=policy)
    workers = CachedImageDataset(images, [0, 1] * 3, train_transform(**kwargs))
    device = CachedImageDataset(images, [0, 1] * 3, train_transform(**kwargs, on_device=True))
    module = TransferDataModule(train=device, val=workers, batch_size=3, num_workers=0, seed=4)
    per_image = [workers_batch for workers_batch in TransferDataModule(
        train=workers, val=workers, batch_size=3, num_workers=0, seed=4).train_dataloader()]
    for (expected, labels), raw in zip(per_image, module.train_dataloader()):
        assert raw[0][0].dtype == torch.uint8 and raw[0][1].shape == (3, len(COLUMNS))
        images_out, labels_out = module.on_after_batch_transfer(raw, 0)
        assert torch.equal(labels_out, labels)
        np.testing.assert_allclose(images_out.numpy(), expected.numpy(), atol=1e-4)
    val = next(iter(module.val_dataloader()))
    assert module.on_after_batch_transfer(val, 0)[0] is val[0]  # evaluation batches pass through
