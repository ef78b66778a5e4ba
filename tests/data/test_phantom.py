"""Tests for one rendered phantom radiograph (medtransfer.data.phantom)."""

from __future__ import annotations

import numpy as np
import pytest

from medtransfer.data.phantom import LUNG_DEPTH, Phantom, random_anatomy, render_phantom

SIZE = 96


def _film(seed: int, *, pneumonia: bool, virus: bool = False, size: int = SIZE) -> Phantom:
    rng = np.random.default_rng(seed)
    return render_phantom(rng, random_anatomy(rng, pneumonia=pneumonia, virus=virus), size)


@pytest.mark.parametrize("pneumonia", [False, True])
def test_shape_and_dtype(pneumonia: bool) -> None:
    film = _film(0, pneumonia=pneumonia, size=80)
    assert film.pixels.shape == (80, 80) and film.pixels.dtype == np.uint8
    assert film.lung_mask.shape == (80, 80) and film.lung_mask.dtype == bool
    assert int(film.pixels.max()) - int(film.pixels.min()) > 100  # dark background, bright body: not a flat image
    if pneumonia:
        assert film.lesion_mask is not None
        assert film.lesion_mask.shape == (80, 80) and film.lesion_mask.dtype == bool
        assert film.lesion_mask.any()
    else:
        assert film.lesion_mask is None


def test_deterministic_for_a_seed() -> None:
    a, b, c = _film(5, pneumonia=True), _film(5, pneumonia=True), _film(6, pneumonia=True)
    assert np.array_equal(a.pixels, b.pixels)
    assert np.array_equal(a.lesion_mask, b.lesion_mask)
    assert np.array_equal(a.lung_mask, b.lung_mask)
    assert not np.array_equal(a.pixels, c.pixels)
    assert random_anatomy(np.random.default_rng(9), pneumonia=True, virus=True) == random_anatomy(
        np.random.default_rng(9), pneumonia=True, virus=True
    )


@pytest.mark.parametrize("virus", [False, True])
def test_lesion_mask_lies_inside_the_visible_lung_fields(virus: bool) -> None:
    for seed in range(12):
        film = _film(seed, pneumonia=True, virus=virus)
        assert film.lesion_mask.any()
        outside = film.lesion_mask & ~film.lung_mask
        assert not outside.any(), f"seed {seed}: {int(outside.sum())} lesion pixels outside the lungs"


def test_lung_mask_is_two_dark_lungs_either_side_of_the_mediastinum() -> None:
    for seed in range(6):
        film = _film(seed, pneumonia=False)
        lungs, pixels = film.lung_mask, film.pixels.astype(np.float64)
        c = SIZE // 2
        assert not lungs[:, c - 2 : c + 2].any()  # the mediastinum separates the lungs
        left, right = lungs[:, :c].sum(), lungs[:, c:].sum()
        assert left > 0.05 * SIZE * SIZE and right > 0.05 * SIZE * SIZE
        # Aerated lung is darker than the soft tissue of the mediastinum and the chest wall.
        mediastinum = pixels[SIZE // 4 : 3 * SIZE // 4, c - 3 : c + 3].mean()
        assert pixels[lungs].mean() < mediastinum - 20


def test_films_of_one_patient_differ_but_share_the_anatomy() -> None:
    rng = np.random.default_rng(2)
    anatomy = random_anatomy(rng, pneumonia=True, virus=False)
    first, second = render_phantom(rng, anatomy, SIZE), render_phantom(rng, anatomy, SIZE)
    assert not np.array_equal(first.pixels, second.pixels)  # positioning, breathing, exposure, noise
    overlap = (first.lesion_mask & second.lesion_mask).sum() / (first.lesion_mask | second.lesion_mask).sum()
    assert overlap > 0.6  # the same lesion, slightly shifted


def test_anatomy_draws_lesions_only_for_pneumonia_and_viral_ones_are_larger_and_fainter() -> None:
    rng = np.random.default_rng(0)
    normal = [random_anatomy(rng, pneumonia=False, virus=False) for _ in range(20)]
    assert all(a.lesions == () and LUNG_DEPTH[0] <= a.lung_depth <= LUNG_DEPTH[1] for a in normal)
    viral = [les for _ in range(40) for les in random_anatomy(rng, pneumonia=True, virus=True).lesions]
    bacterial = [les for _ in range(40) for les in random_anatomy(rng, pneumonia=True, virus=False).lesions]
    assert 40 <= len(viral) <= 80 and 40 <= len(bacterial) <= 80  # 1 or 2 per patient
    assert np.mean([les.sx * les.sy for les in viral]) > np.mean([les.sx * les.sy for les in bacterial])
    assert np.mean([les.amp for les in viral]) < np.mean([les.amp for les in bacterial])
