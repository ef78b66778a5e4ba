"""The pixel limit (medtransfer.data.limits): where it comes from and what its refusal says."""

from __future__ import annotations

import pytest

from medtransfer.data.limits import (
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_ENV,
    ImageTooLargeError,
    check_pixels,
    max_pixels_limit,
)
from medtransfer.errors import ConfigError, DataError


@pytest.mark.parametrize(
    ("argument", "environment", "expected"),
    [(None, None, DEFAULT_MAX_PIXELS), (None, "", DEFAULT_MAX_PIXELS), (None, "80000000", 80_000_000),
     (None, " 80_000_000 ", 80_000_000), (None, "8e7", 80_000_000), (1234, "80000000", 1234), (1234, None, 1234)],
)
def test_limit_precedence_argument_then_environment_then_default(monkeypatch, argument, environment, expected):
    if environment is None:
        monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    else:
        monkeypatch.setenv(MAX_PIXELS_ENV, environment)
    assert max_pixels_limit(argument) == expected


def test_default_fits_real_radiographs_and_mammograms():
    assert DEFAULT_MAX_PIXELS >= 5000 * 5000 and DEFAULT_MAX_PIXELS >= 4728 * 5928


@pytest.mark.parametrize("environment", ["many", "-5", "0", "1.5.2"])
def test_a_bad_environment_value_is_a_config_error_naming_it(monkeypatch, environment):
    monkeypatch.setenv(MAX_PIXELS_ENV, environment)
    with pytest.raises(ConfigError, match=MAX_PIXELS_ENV):
        max_pixels_limit()


@pytest.mark.parametrize("argument", [0, -1, True, 2.5, "100"])
def test_a_bad_argument_is_a_config_error_showing_it(argument):
    with pytest.raises(ConfigError, match=f"max_pixels must be a positive number of pixels, got {argument!r}"):
        max_pixels_limit(argument)


def test_check_pixels_allows_up_to_the_limit_inclusive():
    check_pixels(100, 50, limit=5000)
    check_pixels(50, 50, limit=5000, frames=2)
    with pytest.raises(ImageTooLargeError):
        check_pixels(50, 50, limit=5000, frames=3)


def test_refusal_names_dimensions_limit_and_how_to_raise_it():
    with pytest.raises(DataError) as info:  # a DataError: every caller's handling still applies
        check_pixels(13000, 13000, limit=50_000_000)
    assert isinstance(info.value, ImageTooLargeError)
    assert str(info.value) == (
        "image too large (13000 x 13000 = 169.0 megapixels, over the limit of 50 megapixels, checked before "
        f"decoding; if the file is genuine, raise the limit with {MAX_PIXELS_ENV}=169000000)"
    )
    with pytest.raises(ImageTooLargeError, match=r"\(4000 x 4000 x 4 frames = 64\.0 megapixels"):
        check_pixels(4000, 4000, limit=50_000_000, frames=4)
