"""config: a YAML alias bomb or a recursive alias is refused in milliseconds with a short message, every value
shown in an error is cut to a sane length, and sizes and name lists are bounded as in a saved model.json."""

from __future__ import annotations

import time

import pytest

from medtransfer.config import MAX_IMAGE_SIZE, TrainConfig, shown
from medtransfer.errors import ConfigError


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The classic "billion laughs": 9 levels of 9 aliases each, 9**9 strings from about 350 bytes."""
    lines = ["a: &a [" + ",".join(['"lol"'] * width) + "]"]
    names = "abcdefghijklmnop"
    for previous, name in zip(names, names[1:levels]):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * width) + "]")
    lines.append(f"epochs: *{names[levels - 1]}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text,expected", [
    (alias_bomb(), "its aliases expand to more than 100,000 values"),
    ("a: &a [*a]\nepochs: *a\n", "an alias refers to the value that contains it"),
    ("epochs: " + "[" * 1500 + "]" * 1500 + "\n", "not valid YAML"),  # nested past Python's recursion limit
])
def test_alias_bombs_and_recursion_are_refused_quickly_in_one_short_line(tmp_path, text, expected):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    assert len(text) < 12_000
    started = time.process_time()  # this process's CPU time: other jobs on the machine do not count
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_sources(path)
    message = str(caught.value)
    assert expected in message and str(path) in message and len(message) < 400 and "\n" not in message
    assert time.process_time() - started < 5.0


def test_a_few_aliases_still_work(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("image_size: &size 64\ncache_size: *size\n")
    config = TrainConfig.from_sources(path)
    assert config.image_size == config.cache_size == 64


def test_a_huge_or_deep_value_is_shown_cut_short(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("epochs: [1, [2, [3, [4, [5, [6]]]]], '" + "x" * 100_000 + "']\n")
    with pytest.raises(ConfigError, match=r"setting 'epochs' got \[1, \[2, \[.*\.\.\..*; expected a whole number") as caught:
        TrainConfig.from_sources(path)
    assert len(str(caught.value)) < 400
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_sources(None, {"k" * 100_000: 1})
    assert len(str(caught.value)) < 2_000  # the key cut short; the list of known settings follows
    assert len(shown(list(range(10**6)))) <= 200 and shown("abc") == "'abc'"


@pytest.mark.parametrize("overrides,expected", [
    ({"image_size": 200_000}, f"--image-size: got 200000; expected 16 to {MAX_IMAGE_SIZE} pixels"),
    ({"image_size": 224, "cache_size": 10**6}, f"at most {MAX_IMAGE_SIZE} pixels"),
    ({"image_size": 4096, "cache_size": 4096, "eval_crop_fraction": 0.25}, "with image_size / it at most 8192"),
    ({"class_names": ",".join(f"c{i}" for i in range(1001))}, "at most 1000, of at most 200 characters each"),
])
def test_sizes_and_name_lists_are_bounded(overrides, expected):
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_sources(None, overrides)
    assert expected in str(caught.value) and len(str(caught.value)) < 400


def test_keep_identifiers_is_off_by_default_and_a_flag_or_setting_turns_it_on(tmp_path):
    assert TrainConfig().keep_identifiers is False
    assert TrainConfig.from_sources(None, {"keep_identifiers": "true"}).keep_identifiers is True
