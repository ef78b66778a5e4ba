"""benchmarks/cam_trust.py: Spearman, mask alignment, pointing game, randomisation, and a smoke run."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from benchmarks import cam_trust
from medtransfer.data.decode import decode_image
from medtransfer.data.datamodule import image_tensor
from medtransfer.data.transforms import eval_transform, train_transform
from medtransfer.models.backbones import IMAGENET


def _brute_force_spearman(a, b) -> float:
    """Rank of x_i = #(x_j < x_i) + (#(x_j == x_i) + 1) / 2; then the Pearson formula term by term."""
    a, b = np.ravel(a).tolist(), np.ravel(b).tolist()

    def ranks(x):
        return [sum(v < xi for v in x) + (sum(v == xi for v in x) + 1) / 2 for xi in x]

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((p - ma) * (q - mb) for p, q in zip(ra, rb))
    va = sum((p - ma) ** 2 for p in ra)
    vb = sum((q - mb) ** 2 for q in rb)
    return cov / (va * vb) ** 0.5


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
        ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
        ([1, 2, 3, 4], [1, 4, 9, 16], 1.0),  # monotone, not linear
        ([0, 0, 1, 2], [0, 0, 1, 2], 1.0),  # ties
    ],
)
def test_spearman_known_values(a, b, expected):
    assert cam_trust.spearman(np.array(a), np.array(b)) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(8))
def test_spearman_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 4, size=(3, 5))  # few distinct values: many ties
    b = rng.integers(0, 6, size=(3, 5)).astype(float) + (a if seed % 2 else 0)
    a.flat[:2], b.flat[:2] = (0, 3), (0, 5)  # never constant
    assert cam_trust.spearman(a, b) == pytest.approx(_brute_force_spearman(a, b), abs=1e-12)


def test_rankdata_averages_ties():
    assert cam_trust.rankdata(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_spearman_refuses_constant_and_mismatched_input():
    with pytest.raises(ValueError, match="constant"):
        cam_trust.spearman(np.zeros(4), np.arange(4))
    with pytest.raises(ValueError, match="same size"):
        cam_trust.spearman(np.arange(3), np.arange(4))


def test_map_similarity_counts_constant_maps_as_zero():
    x = np.arange(64, dtype=float).reshape(8, 8)
    result = cam_trust.map_similarity([x, x, x], [x, -x, np.zeros_like(x)], size=4)
    assert result == {"spearman": pytest.approx(0.0), "spearman_abs": pytest.approx(2 / 3), "constant_maps": 1}


@pytest.mark.parametrize("radius", [0, 1, 2, 4])
def test_dilate_is_a_euclidean_disc(radius):
    mask = np.zeros((11, 11), bool)
    mask[5, 5] = True
    grown = cam_trust.dilate(mask, radius)
    rows, cols = np.indices(mask.shape)
    assert np.array_equal(grown, (rows - 5) ** 2 + (cols - 5) ** 2 <= radius * radius)


@pytest.mark.parametrize(
    "peak, tolerance, hit",
    [
        ((5, 5), 0, True),  # inside the mask
        ((5, 8), 0, False),  # 1 px right of the mask
        ((5, 8), 1, True),
        ((8, 8), 1, False),  # diagonal: sqrt(2) > 1
        ((8, 8), 2, False),  # nearest mask pixel (6, 7): sqrt(5) > 2
        ((8, 8), 3, True),
        ((0, 0), 4, False),
    ],
)
def test_pointing_hit(peak, tolerance, hit):
    mask = np.zeros((12, 12), bool)
    mask[4:7, 4:8] = True  # rows 4-6, cols 4-7
    heat = np.zeros((12, 12))
    heat[peak] = 1.0
    heat[11, 11] = 0.5  # a lower second mode elsewhere does not count
    assert cam_trust.pointing_hit(heat, mask, tolerance) is hit


def test_peak_of_a_plateau_is_its_middle_not_its_corner():
    heat = np.zeros((10, 10))
    heat[6:, 6:] = 1.0  # a 4 x 4 flat maximum in the bottom-right corner
    heat[0, 0] = 0.99
    assert cam_trust.peak(heat) in {(7, 7), (7, 8), (8, 7), (8, 8)}
    single = np.zeros((5, 5))
    single[1, 3] = 2.0
    assert cam_trust.peak(single) == (1, 3)
    assert cam_trust.peak(np.full((3, 3), 0.5)) is None


def test_a_plateau_overlapping_the_mask_is_a_hit():
    heat = np.zeros((10, 10))
    heat[4:10, 0:6] = 1.0  # middle near (6.5, 2.5); its top-left corner (4, 0) lies outside the mask
    mask = np.zeros((10, 10), bool)
    mask[6:8, 2:4] = True
    assert cam_trust.pointing_hit(heat, mask, 0) is True


def test_constant_map_is_a_miss():
    mask = np.ones((4, 4), bool)
    assert cam_trust.pointing_hit(np.zeros((4, 4)), mask, 0) is False


@pytest.mark.parametrize(
    "source_shape, decode_size, image_size, crop_fraction",
    [((224, 224), 176, 160, 0.875), ((120, 90), 72, 64, 0.875), ((200, 260), 110, 96, 0.8)],
)
def test_mask_aligned_like_the_image_covers_the_same_pixels(tmp_path, source_shape, decode_size, image_size, crop_fraction):
    """A bright rectangle and its mask, sent through the image and mask paths, still coincide."""
    h, w = source_shape
    mask = np.zeros(source_shape, np.uint8)
    mask[h // 3 : h // 3 + h // 4, w // 2 : w // 2 + w // 5] = 255
    picture = np.where(mask > 0, 230, 20).astype(np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(picture).save(path)
    transform = eval_transform(image_size=image_size, mean=IMAGENET.mean, std=IMAGENET.std, crop_fraction=crop_fraction)

    pixels = cam_trust.eval_geometry(transform)(image_tensor(decode_image(path, size=decode_size)))
    aligned = cam_trust.align_mask(mask, decode_size=decode_size, transform=transform)

    assert aligned.shape == (image_size, image_size) == tuple(pixels.shape[-2:])
    bright = pixels[0].numpy() > 125
    iou = (bright & aligned).sum() / (bright | aligned).sum()
    assert iou > 0.93, iou
    mask_file = tmp_path / "mask.png"
    Image.fromarray(mask).save(mask_file)
    assert np.array_equal(cam_trust.align_mask(mask_file, decode_size=decode_size, transform=transform), aligned)
    # and the model input the benchmark feeds has the same size
    assert tuple(transform(image_tensor(decode_image(path, size=decode_size))).shape[-2:]) == (image_size, image_size)


def test_eval_geometry_refuses_random_steps():
    with pytest.raises(ValueError, match="TrainTransform"):
        cam_trust.eval_geometry(v2.Compose([train_transform(image_size=32, mean=IMAGENET.mean, std=IMAGENET.std)]))


def test_randomize_weights_redraws_everything_and_resets_batch_norm():
    from medtransfer.models.backbones import create_backbone

    torch.manual_seed(0)
    net, _ = create_backbone("resnet18", num_classes=2, weights="none")
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.fill_(3.0)
                module.weight.fill_(2.0)
    before = {n: t.clone() for n, t in net.state_dict().items()}
    cam_trust.randomize_weights(net, seed=1)
    after = net.state_dict()
    weights = [n for n in before if n.endswith("weight") and "bn" not in n and "downsample.1" not in n]
    assert all(not torch.equal(before[n], after[n]) for n in weights)
    assert torch.equal(net.bn1.running_mean, torch.zeros(64)) and torch.equal(net.bn1.weight, torch.ones(64))
    again, _ = create_backbone("resnet18", num_classes=2, weights="none")
    cam_trust.randomize_weights(again, seed=1)
    assert all(torch.equal(after[n], t) for n, t in again.state_dict().items())  # seeded


def test_randomize_weights_refuses_parameters_it_cannot_reset():
    class Raw(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(3))
            self.conv = torch.nn.Conv2d(3, 3, 1)

    with pytest.raises(ValueError, match="scale"):
        cam_trust.randomize_weights(Raw())


def test_spearman_is_the_squared_rank_difference_formula_on_every_permutation():
    """Every permutation of 5 distinct values: spearman = 1 - 6 sum d^2 / (n (n^2 - 1))."""
    base = np.arange(5)
    for perm in itertools.permutations(base):
        d = base - np.array(perm)
        expected = 1 - 6 * (d * d).sum() / (5 * 24)
        assert cam_trust.spearman(base, np.array(perm)) == pytest.approx(expected)


def test_benchmark_runs_end_to_end_and_prints_one_json_line(tmp_path, capsys):
    # A smoke run (tiny data, one epoch): the figures are meaningless, the plumbing is not.
    code = cam_trust.main(
        ["--out", str(tmp_path), "--epochs", "1", "--image-size", "64", "--output-stride", "16", "--weights", "none",
         "--patients-per-class", "4", "--test-patients-per-class", "3"]
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert code == 0 and len(lines) == 1
    result = json.loads(lines[0])
    assert result["map_grid"] == [4, 4]  # 64 px / output stride 16
    assert result["output_stride"] == 16 and result["image_size"] == 64
    assert result["n_images"] >= 3 and 0 <= result["pointing_game"] <= 1 and 0 <= result["pointing_chance"] <= 1
    assert (tmp_path / "data_70px" / "README.txt").is_file()
    assert (tmp_path / "run_efficientnet_lite0_64px_os16_1ep" / "model" / "model.json").is_file()


def test_cluster_bootstrap_ci_resamples_patients_not_images():
    # Patient "a" has 9 hits, the other nine patients one miss each: the rate over images is
    # 0.5, but drawing patients makes it swing with whether "a" is drawn, so the interval is wide.
    hits = [True] * 9 + [False] * 9
    groups = ["a"] * 9 + [f"p{i}" for i in range(9)]
    low, high = cam_trust.cluster_bootstrap_ci(hits, groups, resamples=4000)
    assert low < 0.2 and high > 0.6
    assert cam_trust.cluster_bootstrap_ci([True, True], ["x", "y"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="as many groups as hits"):
        cam_trust.cluster_bootstrap_ci([True], ["x", "y"])
