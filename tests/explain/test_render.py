"""Rendering: the map over the image, the caption strip, the caption text, the grayscale image shown."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from PIL import Image

from medtransfer.explain import render as render_module
from medtransfer.explain.render import gray_from_pixels, overlay, prediction_caption, save_overlay

BINARY = ["NORMAL", "PNEUMONIA"]


def test_overlay_and_save_overlay(tmp_path):
    gray = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))
    heat = np.zeros((32, 32))
    heat[:16] = 1.0
    rgb = overlay(gray, heat, alpha=0.5)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    assert rgb[:16, :, 0].mean() > rgb[16:, :, 0].mean()  # hot is red, cold is blue
    path = save_overlay(tmp_path / "o.png", gray, heat, "PNEUMONIA p=0.93 (threshold 0.41)")
    picture = np.asarray(Image.open(path))
    assert picture.shape[0] > 32 and picture.shape[1] >= 32
    left = (picture.shape[1] - 32) // 2
    assert np.array_equal(picture[:32, left : left + 32], overlay(gray, heat))
    with pytest.raises(ValueError, match="same shape"):
        overlay(gray, heat[:10])


def test_overlay_blends_with_matplotlib_jet():
    from matplotlib import colormaps

    gray = np.array([[0, 255]], dtype=np.uint8)
    heat = np.array([[1.0, 0.0]])
    expected = np.round((0.6 * np.array([[0.0], [1.0]]) + 0.4 * colormaps["jet"](heat[0])[:, :3]) * 255)
    assert np.array_equal(overlay(gray, heat, alpha=0.4)[0], expected.astype(np.uint8))
    with pytest.raises(ValueError, match="alpha must lie in"):
        overlay(gray, heat, alpha=1.5)


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (np.array([[0.0, 0.5]]), [0, 128]),  # floats in [0, 1] are taken as they are
        (np.array([[-2.0, 2.0]]), [0, 255]),  # other floats are min-max stretched
        (np.array([[3.0, 3.0]]), [0, 0]),  # a constant float image outside [0, 1] becomes black
    ],
)
def test_overlay_reads_float_images(image, expected):
    assert overlay(image, np.zeros_like(image), alpha=0.0)[0, :, 0].tolist() == expected


@pytest.mark.parametrize(
    ("classes", "probabilities", "predicted", "expected"),
    [
        (BINARY, [0.07, 0.93], 1, "PNEUMONIA p=0.93 (threshold 0.41)"),
        (BINARY, [0.88, 0.12], 0, "NORMAL p=0.88 (PNEUMONIA p=0.12 < threshold 0.41)"),
        (["a", "b", "c"], [0.2, 0.7, 0.1], 1, "b p=0.70"),
    ],
)
def test_prediction_caption(classes, probabilities, predicted, expected):
    assert prediction_caption(classes, probabilities, predicted, positive_index=1, threshold=0.41) == expected


def test_prediction_caption_names_the_positive_class_wherever_it_is():
    caption = prediction_caption(["PNEUMONIA", "NORMAL"], torch.tensor([0.3, 0.7]), 1, positive_index=0, threshold=0.5)
    assert caption == "NORMAL p=0.70 (PNEUMONIA p=0.30 < threshold 0.50)"


def test_gray_conversions_average_the_channels():
    pixels = torch.tensor([[[0, 255]], [[1, 255]], [[1, 0]]], dtype=torch.uint8)  # 3 x 1 x 2
    gray = gray_from_pixels(pixels)
    assert gray.dtype == np.uint8 and gray.tolist() == [[1, 170]]


def test_docstring_examples_run():
    failures, tried = doctest.testmod(render_module)
    assert tried > 0 and failures == 0


def test_outline_draws_the_edge_of_a_region_in_white_and_nothing_else():
    from medtransfer.explain.render import mask_edge, overlay, overlay_picture

    gray, heat = np.full((64, 64), 100, np.uint8), np.zeros((64, 64))
    region = np.zeros((64, 64), bool)
    region[20:25, 30:35] = True
    edge = mask_edge(region)
    assert edge.sum() == 2 * 5 + 2 * 3 and not edge[22, 32] and edge[20, 30]
    picture = np.asarray(overlay_picture(gray, heat, "x", outline=region))[:64, :64]
    plain = overlay(gray, heat)
    assert (picture[edge] == 255).all() and (picture[~edge] == plain[~edge]).all()
    assert not mask_edge(np.ones((5, 5), bool)).any()  # the image's own edge is not drawn
