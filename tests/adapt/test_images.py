"""The new site's images: found recursively by suffix, folder names ignored, identified by content."""

from __future__ import annotations

import pytest

from medtransfer.adapt.images import list_unlabelled
from medtransfer.errors import DataError
from tests.adapt.conftest import unlabelled_folder
from tests.conftest import write_image


def test_images_are_found_recursively_and_hidden_files_skipped(tmp_path):
    unlabelled_folder(tmp_path / "site", 5)
    write_image(tmp_path / "site" / "deep" / "er" / "person7_virus_3.jpeg")
    write_image(tmp_path / "site" / ".hidden" / "x.png")
    (tmp_path / "site" / "notes.txt").write_text("not an image")
    images = list_unlabelled(tmp_path / "site")
    assert len(images.paths) == 6 and "person7_virus" in images.patient_ids
    assert images.to_dict()["images"] == 6 and len(images.digest) == 64


def test_folder_names_do_not_matter_and_the_digest_follows_content(tmp_path):
    first = list_unlabelled(unlabelled_folder(tmp_path / "a", 6))
    (tmp_path / "a" / "PNEUMONIA").rename(tmp_path / "a" / "renamed")
    assert list_unlabelled(tmp_path / "a").digest == first.digest
    write_image(tmp_path / "a" / "NORMAL" / "img000.png", "L", size=(40, 40), seed=99)  # one image changed
    assert list_unlabelled(tmp_path / "a").digest != first.digest


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "missing", "not a folder"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no images found"),
])
def test_nothing_to_adapt_to_is_an_error(tmp_path, make, match):
    with pytest.raises(DataError, match=match):
        list_unlabelled(make(tmp_path))
