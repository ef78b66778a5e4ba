"""Integrity of the image cache (medtransfer.data.cache, cache_index, cache_loader): a corrupt
index.sqlite, a checksum per entry (bad entries decoded again, or refused in one line), and
decode workers that die (one-line DataError, no hang). Images are a few tiny PNGs."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from medtransfer.data import cache_loader
from medtransfer.data.cache import CacheSettings, ImageCache
from medtransfer.data.cache_index import pixel_checksum
from medtransfer.data.decode import decode_image
from medtransfer.errors import DataError

SIZE = 16
SETTINGS = CacheSettings(size=SIZE)


@pytest.fixture
def images(tmp_path: Path, make_image) -> list[Path]:
    names = [("a.png", "L"), ("b.png", "RGB"), ("c.png", "L"), ("d.png", "L")]
    return [make_image(tmp_path / "images" / name, mode, size=(24, 20)) for name, mode in names]


def assert_pixels_equal_sources(cached, paths: list[Path]) -> None:
    for i, path in enumerate(paths):
        np.testing.assert_array_equal(cached[i], decode_image(path, size=SIZE))


def flip_byte(cached, i: int) -> None:
    """Corrupt one pixel byte of image ``i`` in the data file (as a bad disk sector would)."""
    at = int(cached.offsets[i]) + 5
    with open(cached.data_file, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0xFF]))


# ----------------------------------------------------------------- a corrupt index


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_index_is_started_afresh_with_a_warning(tmp_path, images, caplog, damage):
    cache = ImageCache(tmp_path / "cache", SETTINGS)
    cache.build(images)
    index = cache.location / "index.sqlite"
    data = index.read_bytes()
    index.write_bytes(b"not a database, just bytes\n" * 300 if damage == "garbage" else data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="medtransfer.data.cache"):
        cached = ImageCache(tmp_path / "cache", SETTINGS).build(images)
    [record] = [r for r in caplog.records if "is corrupt" in r.getMessage()]
    assert record.getMessage().startswith(f"image cache index {index} is corrupt (")
    assert "started afresh" in record.getMessage() and "\n" not in record.getMessage()
    assert cached.built == len(images)
    assert_pixels_equal_sources(cached, images)
    assert cache.stats()["entries"] == len(images) and cache.stats()["bytes"] == sum(a.nbytes for a in cached)


def test_stats_on_a_corrupt_index_is_one_line_with_the_fix(tmp_path, images):
    cache = ImageCache(tmp_path / "cache", SETTINGS)
    cache.build(images[:1])
    (cache.location / "index.sqlite").write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(DataError) as info:
        cache.stats()
    message = str(info.value)
    assert message.startswith(f"image cache index {cache.location / 'index.sqlite'} is corrupt (")
    assert message.endswith(f"delete the cache folder {cache.location} (it is rebuilt from the images)")
    assert "\n" not in message


# ----------------------------------------------------------------- checksums


def test_entries_carry_the_checksum_of_their_pixels(tmp_path, images):
    cached = ImageCache(tmp_path / "cache", SETTINGS).build(images)
    assert cached.checksums == [pixel_checksum(a) for a in cached]
    part = cached.subset([2, 0])
    assert part.checksums == [cached.checksums[2], cached.checksums[0]] and part.hashes == [cached.hashes[2], cached.hashes[0]]


def test_a_flipped_byte_is_found_by_the_next_build_and_decoded_again(tmp_path, images, caplog):
    cache = ImageCache(tmp_path / "cache", SETTINGS)
    flip_byte(cache.build(images), 1)
    with caplog.at_level(logging.WARNING, logger="medtransfer.data.cache"):
        cached = cache.build(images)
    assert cached.built == 1
    assert any("1 cached image(s)" in r.getMessage() and "failed their checksum" in r.getMessage() for r in caplog.records)
    assert_pixels_equal_sources(cached, images)
    assert cache.build(images).built == 0  # repaired for good


def test_a_flipped_byte_behind_a_moved_file_is_decoded_again(tmp_path, images):
    cache = ImageCache(tmp_path / "cache", SETTINGS)
    flip_byte(cache.build(images), 0)
    moved = tmp_path / "elsewhere" / "a.png"
    moved.parent.mkdir()
    images[0].rename(moved)  # not in the memo: found by content, whose entry is bad
    cached = cache.build([moved])
    assert cached.built == 1
    np.testing.assert_array_equal(cached[0], decode_image(moved, size=SIZE))


def test_a_view_reading_a_bad_entry_decodes_its_source_again_and_warns_once(tmp_path, images, caplog):
    cached = ImageCache(tmp_path / "cache", SETTINGS).build(images)
    expected = cached[2]
    flip_byte(cached, 2)
    cached._mm = None  # a fresh map (DataLoader workers open their own)
    with caplog.at_level(logging.WARNING, logger="medtransfer.data.cache"):
        np.testing.assert_array_equal(cached[2], expected)
        np.testing.assert_array_equal(cached[2], expected)
    [record] = caplog.records
    assert record.getMessage().startswith(f"{images[2]}: its cached pixels in {cached.data_file} fail their checksum")
    cached.verify = False
    assert not np.array_equal(cached[2], expected)  # the corruption is real (the next build repairs it)


@pytest.mark.parametrize("source", ["gone", "changed"])
def test_a_bad_entry_whose_source_is_gone_or_changed_is_refused_in_one_line(tmp_path, images, make_image, source):
    cached = ImageCache(tmp_path / "cache", SETTINGS).build(images)
    flip_byte(cached, 3)
    cached._mm = None
    if source == "gone":
        images[3].unlink()
    else:
        make_image(images[3], "L", size=(24, 20), seed=99)
    with pytest.raises(DataError) as info:
        cached[3]
    message = str(info.value)
    assert message.startswith(f"{images[3]}: its cached pixels in {cached.data_file} fail their checksum and the source ")
    assert ("is gone (cannot read file" if source == "gone" else "has changed since the cache was built") in message
    assert "\n" not in message
    np.testing.assert_array_equal(cached[0], decode_image(images[0], size=SIZE))  # the others still read


def test_an_index_from_before_checksums_gains_them(tmp_path, images):
    cache = ImageCache(tmp_path / "cache", SETTINGS)
    cache.build(images)
    with sqlite3.connect(cache.location / "index.sqlite") as conn:
        conn.execute("ALTER TABLE entries DROP COLUMN checksum")
    cached = cache.build(images)
    assert cached.built == 0 and cached.checksums == [pixel_checksum(a) for a in cached]
    flip_byte(cached, 0)
    assert cache.build(images).built == 1


# ----------------------------------------------------------------- decode workers that die


needs_fork = pytest.mark.skipif(
    multiprocessing.get_start_method() != "fork", reason="the injected failure reaches workers through fork"
)


@needs_fork
@pytest.mark.parametrize("death", ["sigkill", "exit"])
def test_a_worker_killed_while_decoding_is_one_line_naming_the_image_not_a_hang(tmp_path, images, make_image,
                                                                              monkeypatch, death):
    boom = make_image(tmp_path / "images" / "boom.png", "L", size=(24, 20))
    paths = [*images[:2], boom, *images[2:]]
    real = cache_loader.load_file

    def dies_on_boom(path: str, options, known):  # runs in the forked worker
        if path.endswith("boom.png"):
            if death == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer does
            os._exit(1)
        time.sleep(0.02)
        return real(path, options, known)

    monkeypatch.setattr(cache_loader, "load_file", dies_on_boom)
    cache = ImageCache(tmp_path / "cache", SETTINGS)
    started = time.perf_counter()
    with pytest.raises(DataError) as info:
        cache.build(paths, workers=2)
    assert time.perf_counter() - started < 10
    message = str(info.value)
    assert message.startswith(f"{boom}: the worker process decoding this image died (killed by the system")
    assert "MEDTRANSFER_MAX_PIXELS" in message and "\n" not in message
    monkeypatch.setattr(cache_loader, "load_file", real)
    cached = cache.build(paths, workers=2)  # the cache is usable afterwards
    assert_pixels_equal_sources(cached, paths)


def test_when_the_dead_workers_image_is_unknown_the_images_in_flight_are_named():
    message = cache_loader._died_message([], [f"/x/{i}.png" for i in range(7)])
    assert message.startswith("a worker process died (killed by the system, most likely out of memory) while decoding "
                              "one of these images: /x/0.png, /x/1.png, /x/2.png, /x/3.png, /x/4.png and 2 more;")
