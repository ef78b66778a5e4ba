"""Tests for the decode-once image cache (medtransfer.data.cache)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtransfer.data import cache as cache_module
from medtransfer.data.cache import CacheSettings, CachedImages, ImageCache
from medtransfer.data.decode import decode_image
from medtransfer.errors import ConfigError, DataError

SIZE = 32
SETTINGS = CacheSettings(size=SIZE)


@pytest.fixture
def images(tmp_path: Path, make_image) -> list[Path]:
    """Gray and colour, JPEG and PNG: 2-D and 3-D entries in one data file."""
    src = tmp_path / "images"
    names = [("gray.jpg", "L"), ("gray.png", "L"), ("color.png", "RGB"), ("color.jpg", "RGB")]
    return [make_image(src / name, mode, size=(120, 90)) for name, mode in names]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"size": 0}, "positive integer"), ({"resample": "nearest"}, "lanczos, bicubic")],
)
def test_settings_validation_names_the_fix(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CacheSettings(**kwargs)


# ----------------------------------------------------------------- ImageCache


def test_round_trip_equals_decode_image(tmp_path: Path, images: list[Path]) -> None:
    cached = ImageCache(tmp_path / "cache", SETTINGS).build(images)
    assert cached.paths == images and cached.positions == list(range(len(images)))
    assert cached.built == len(images) and cached.skipped == []
    for i, path in enumerate(images):
        expected = decode_image(path, size=SIZE)
        assert cached[i].dtype == np.uint8
        np.testing.assert_array_equal(cached[i], expected)
    assert [a.ndim for a in cached] == [2, 2, 3, 3]


def test_default_settings_store_256px(tmp_path: Path, images: list[Path]) -> None:
    path = images[0]
    cache = ImageCache(tmp_path / "cache")
    assert cache.build([path])[0].shape == (256, 256)
    stats = cache.stats()
    assert stats["entries"] == 1 and stats["bytes"] == 256 * 256
    assert Path(stats["location"]).parent == tmp_path / "cache"


def test_second_build_decodes_nothing(tmp_path: Path, images: list[Path]) -> None:
    ImageCache(tmp_path / "cache", SETTINGS).build(images)
    again = ImageCache(tmp_path / "cache", SETTINGS).build(images[::-1])
    assert again.built == 0
    np.testing.assert_array_equal(again[0], decode_image(images[-1], size=SIZE))


def test_changed_file_rebuilds_only_that_one(tmp_path: Path, images: list[Path], make_image) -> None:
    cache = ImageCache(tmp_path / "cache", SETTINGS)
    cache.build(images)
    changed = images[0]
    before = os.stat(changed).st_mtime_ns
    make_image(changed, "L", size=(120, 90), seed=3)
    os.utime(changed, ns=(before + 10**9, before + 10**9))
    rebuilt = cache.build(images)
    assert rebuilt.built == 1
    np.testing.assert_array_equal(rebuilt[0], decode_image(changed, size=SIZE))
    np.testing.assert_array_equal(rebuilt[1], decode_image(images[1], size=SIZE))


def test_moved_or_duplicate_file_reuses_entry(tmp_path: Path, images: list[Path]) -> None:
    cache = ImageCache(tmp_path / "cache", SETTINGS)
    cache.build(images[:1])
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(images[0].read_bytes())
    cached = cache.build([copy, images[0], copy])
    assert cached.built == 0 and len(cached) == 3
    np.testing.assert_array_equal(cached[0], cached[1])


def test_changed_setting_uses_separate_bucket(tmp_path: Path, images: list[Path]) -> None:
    small = ImageCache(tmp_path / "cache", SETTINGS)
    small.build(images)
    larger = ImageCache(tmp_path / "cache", CacheSettings(size=SIZE + 8))
    assert larger.location != small.location
    cached = larger.build(images)
    assert cached.built == len(images) and cached[0].shape == (SIZE + 8, SIZE + 8)
    assert small.build(images).built == 0


def test_workers_give_same_result(tmp_path: Path, images: list[Path]) -> None:
    cached = ImageCache(tmp_path / "cache", SETTINGS).build(images, workers=2)
    assert cached.built == len(images)
    for i, path in enumerate(images):
        np.testing.assert_array_equal(cached[i], decode_image(path, size=SIZE))


def test_progress_bar_runs(tmp_path: Path, images: list[Path]) -> None:
    assert len(ImageCache(tmp_path / "cache", SETTINGS).build(images, progress=True)) == len(images)


# ----------------------------------------------------------------- crash safety


def test_crash_before_index_commit_leaves_no_visible_entry(
    tmp_path: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def killed(fd: int) -> None:
        raise KeyboardInterrupt("simulated kill after data write, before index commit")

    with monkeypatch.context() as m:
        m.setattr(cache_module.os, "fsync", killed)
        with pytest.raises(KeyboardInterrupt):
            ImageCache(tmp_path / "cache", SETTINGS).build(images)

    fresh = ImageCache(tmp_path / "cache", SETTINGS)
    data_file = fresh.location / "data.bin"
    assert data_file.stat().st_size > 0  # orphaned bytes were written ...
    assert fresh.stats()["entries"] == 0  # ... but nothing points at them
    cached = fresh.build(images)
    assert cached.built == len(images)
    for i, path in enumerate(images):
        np.testing.assert_array_equal(cached[i], decode_image(path, size=SIZE))
    assert data_file.stat().st_size == sum(a.nbytes for a in cached)  # orphans truncated


def test_index_row_past_end_of_data_is_ignored_and_rebuilt(
    tmp_path: Path, images: list[Path]
) -> None:
    cache = ImageCache(tmp_path / "cache", SETTINGS)
    cache.build(images)
    data_file = cache.location / "data.bin"
    size = data_file.stat().st_size
    os.truncate(data_file, size - 100)  # last entry cut short (e.g. lost on power failure)
    assert cache.stats()["entries"] == len(images) - 1

    fresh = ImageCache(tmp_path / "cache", SETTINGS)
    cached = fresh.build(images)
    assert cached.built == 1
    for i, path in enumerate(images):
        np.testing.assert_array_equal(cached[i], decode_image(path, size=SIZE))


def test_garbage_trailing_bytes_are_harmless(tmp_path: Path, images: list[Path]) -> None:
    cache = ImageCache(tmp_path / "cache", SETTINGS)
    cache.build(images[:2])
    data_file = cache.location / "data.bin"
    with open(data_file, "ab") as fh:
        fh.write(b"\xff" * 777)  # a partial append from a killed build
    cached = ImageCache(tmp_path / "cache", SETTINGS).build(images)
    assert cached.built == len(images) - 2
    for i, path in enumerate(images):
        np.testing.assert_array_equal(cached[i], decode_image(path, size=SIZE))


# ----------------------------------------------------------------- bad files


@pytest.fixture
def with_bad(tmp_path: Path, images: list[Path]) -> list[Path]:
    truncated = tmp_path / "truncated.jpeg"
    data = images[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "readme.jpg"
    text.write_text("this is not a JPEG\n")
    return [images[0], truncated, images[1], text, tmp_path / "missing.png"]


def test_bad_files_are_all_listed(tmp_path: Path, with_bad: list[Path]) -> None:
    cache = ImageCache(tmp_path / "cache", SETTINGS)
    with pytest.raises(DataError) as info:
        cache.build(with_bad)
    message = str(info.value)
    assert message.startswith("3 image(s) cannot be read")
    for bad in with_bad[1::2] + with_bad[4:]:
        assert str(bad) in message
    assert "--skip-bad-images" in message
    assert cache.build([with_bad[0], with_bad[2]]).built == 0  # good ones were kept


def test_skip_bad_leaves_them_out(tmp_path: Path, with_bad: list[Path]) -> None:
    cached = ImageCache(tmp_path / "cache", SETTINGS).build(with_bad, skip_bad=True)
    assert cached.paths == [with_bad[0], with_bad[2]] and cached.positions == [0, 2]
    assert [p for p, _ in cached.skipped] == [with_bad[1], with_bad[3], with_bad[4]]
    reasons = [reason.split(" (")[0] for _, reason in cached.skipped]
    assert reasons == ["not a readable image", "not a readable image", "cannot read file"]
    np.testing.assert_array_equal(cached[1], decode_image(with_bad[2], size=SIZE))


def test_long_bad_list_is_shortened(tmp_path: Path) -> None:
    bad = []
    for i in range(13):
        (tmp_path / f"bad{i}.jpg").write_text("x")
        bad.append(tmp_path / f"bad{i}.jpg")
    with pytest.raises(DataError, match=r"13 image\(s\)[\s\S]*and 3 more"):
        ImageCache(tmp_path / "cache", SETTINGS).build(bad)


# ----------------------------------------------------------------- picklability


def test_pickled_view_reads_identical_arrays(tmp_path: Path, images: list[Path]) -> None:
    cached = ImageCache(tmp_path / "cache", SETTINGS).build(images)
    first = [cached[i] for i in range(len(cached))]  # opens the memory map here
    clone = pickle.loads(pickle.dumps(cached))
    assert isinstance(clone, CachedImages) and clone._mm is None
    for i in range(len(cached)):
        np.testing.assert_array_equal(clone[i], first[i])
    with pytest.raises(IndexError):
        clone[len(cached)]


def test_subset_views_share_the_data_file_and_return_the_same_pixels(tmp_path):
    paths = []
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((20, 30), 40 * i, dtype=np.uint8)).save(path)
        paths.append(path)
    images = ImageCache(tmp_path / "cache", CacheSettings(size=16)).build(paths)
    part = images.subset([3, 1])
    assert part.paths == [paths[3], paths[1]] and part.data_file == images.data_file
    assert np.array_equal(part[0], images[3]) and np.array_equal(part[1], images[1])


# ----------------------------------------------------------- edge cases of real folders


def test_a_file_name_that_is_not_utf8_is_cached(tmp_path: Path, images: list[Path]) -> None:
    odd = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/r\xe9sum\xe9.png"))  # Latin-1 bytes, a surrogate in str
    odd.write_bytes(images[1].read_bytes())
    cache = ImageCache(tmp_path / "cache", SETTINGS)
    for _ in range(2):  # the second build finds it in the index
        got = cache.build([odd])
        np.testing.assert_array_equal(got[0], decode_image(images[1], size=SIZE))
    assert got.built == 0


def test_a_file_rewritten_with_the_same_size_and_mtime_is_not_served_stale(tmp_path: Path, make_image) -> None:
    path = make_image(tmp_path / "a.png", "L", size=(40, 40), seed=1)
    cache = ImageCache(tmp_path / "cache", SETTINGS)
    before = cache.build([path])[0]
    st = path.stat()
    replacement = make_image(tmp_path / "b.png", "L", size=(40, 40), seed=2).read_bytes()
    assert len(replacement) == st.st_size  # same size (uncompressed-ish noise PNGs of one shape)
    with open(path, "r+b") as handle:  # in place: same inode
        handle.write(replacement)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    after = cache.build([path])
    assert after.built == 1 and not np.array_equal(after[0], before)
    np.testing.assert_array_equal(after[0], decode_image(path, size=SIZE))


def test_a_second_process_waits_for_the_builder_with_a_message(tmp_path: Path, images: list[Path], capfd) -> None:
    import fcntl
    import threading

    cache = ImageCache(tmp_path / "cache", SETTINGS)
    cache.build(images[:1])
    holder = open(cache.location / "lock", "a+b")
    fcntl.flock(holder, fcntl.LOCK_EX)  # another process building (flock is per open file)
    threading.Timer(0.5, lambda: holder.close()).start()
    got = cache.build(images)
    assert "Waiting for another process that is filling the image cache" in capfd.readouterr().err
    np.testing.assert_array_equal(got[3], decode_image(images[3], size=SIZE))
