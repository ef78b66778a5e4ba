"""Train and evaluation presets (medtransfer.data.transforms) on uint8 CxHxW tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtransfer.data.transforms import MatchChannels, eval_transform, train_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(channels: int = 1, size: int = 64, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(channels, size, size), dtype=np.uint8))


def test_eval_transform_is_deterministic():
    transform = eval_transform(image_size=32, mean=MEAN, std=STD)
    image = _image()
    first = transform(image)
    assert torch.equal(first, transform(image)) and torch.equal(first, transform(image.clone()))


def test_eval_transform_center_crops_and_normalises_with_the_given_mean_and_std():
    """crop_fraction 0.5 on a 64 px image: no resize, the central 32 px, (x / 255 - mean) / std per channel."""
    image = _image(channels=3)
    out = eval_transform(image_size=32, mean=MEAN, std=STD, crop_fraction=0.5)(image)
    crop = image[:, 16:48, 16:48].numpy() / 255.0
    expected = (crop - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_gray_image_is_repeated_to_three_channels_each_with_its_own_statistics():
    value = 128
    image = torch.full((1, 40, 40), value, dtype=torch.uint8)
    out = eval_transform(image_size=32, mean=MEAN, std=STD)(image)
    assert out.shape == (3, 32, 32)
    expected = [(value / 255 - m) / s for m, s in zip(MEAN, STD)]
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, rtol=1e-5)


def test_one_channel_model_gets_the_average_rgb_statistics():
    image = torch.full((3, 40, 40), 200, dtype=torch.uint8)
    out = eval_transform(image_size=32, mean=MEAN, std=STD, channels=1)(image)
    assert out.shape == (1, 32, 32)
    expected = (200 / 255 - sum(MEAN) / 3) / (sum(STD) / 3)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5)


def test_train_transform_is_random_but_seeded():
    transform = train_transform(image_size=32, mean=MEAN, std=STD)
    image = _image(size=48)
    torch.manual_seed(0)
    a = transform(image)
    torch.manual_seed(0)
    b = transform(image)
    c = transform(image)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_train_transform_without_augmentation_strength_is_a_normalised_resized_crop():
    """No jitter, no rotation, a full-scale crop of a flat image: every pixel is (x / 255 - mean) / std."""
    image = torch.full((1, 48, 48), 51, dtype=torch.uint8)
    transform = train_transform(
        image_size=32, mean=(0.1,), std=(0.5,), channels=1, crop_scale=(1.0, 1.0), rotation_degrees=0.0,
        brightness=0.0, contrast=0.0,
    )
    np.testing.assert_allclose(transform(image).numpy(), (51 / 255 - 0.1) / 0.5, rtol=1e-5)


def test_mean_and_std_are_keyword_only_and_required():
    with pytest.raises(TypeError):
        eval_transform(image_size=32)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        train_transform(32, MEAN, STD)  # type: ignore[misc]


def test_mean_and_std_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="got 3 and 1 values"):
        eval_transform(image_size=32, mean=MEAN, std=(0.2,))


@pytest.mark.parametrize(("have", "want"), [(1, 3), (3, 3), (3, 1), (1, 1)])
def test_match_channels(have, want):
    image = _image(channels=have, size=8)
    out = MatchChannels(want)(image)
    assert out.shape == (want, 8, 8) and out.dtype == torch.uint8
    if have == 1:
        assert all(torch.equal(out[c], image[0]) for c in range(want))
    elif want == 1:
        assert torch.equal(out[0], image.float().mean(0).round().to(torch.uint8))


def test_match_channels_refuses_what_it_cannot_map():
    with pytest.raises(ValueError, match="cannot map a 2-channel image to 3 channels"):
        MatchChannels(3)(_image(channels=2, size=8))


def test_border_crop_cuts_the_same_fraction_off_every_side_before_resizing():
    from medtransfer.data.transforms import BorderCrop, with_border_crop

    image = torch.arange(20 * 10, dtype=torch.uint8).reshape(1, 20, 10)
    cropped = BorderCrop(0.1)(image)
    assert torch.equal(cropped, image[:, 2:18, 1:9])
    plain = eval_transform(image_size=8, mean=[0.5], std=[0.5], channels=1, crop_fraction=1.0)
    assert with_border_crop(plain, 0.0) is plain
    composed = with_border_crop(plain, 0.1)
    assert isinstance(composed.transforms[0], BorderCrop)
    assert torch.equal(composed(image), plain(image[:, 2:18, 1:9]))
    with pytest.raises(ValueError, match="border crop: got 0.5"):
        BorderCrop(0.5)
