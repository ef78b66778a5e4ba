"""Tests for the published results on the Kermany test split (medtransfer.evaluation.published)."""

from __future__ import annotations

import pytest

from medtransfer.evaluation.published import published_results, published_section


def test_published_results_are_package_data_matching_the_literature():
    published = published_results()
    assert published.classes == ("NORMAL", "PNEUMONIA") and published.test_images == 624
    by_source = {row["source"]: row for row in published.rows}
    kermany = by_source["Kermany et al. 2018 (Cell)"]
    assert (kermany["accuracy"], kermany["sensitivity"], kermany["specificity"], kermany["auc"]) == (0.928, 0.932, 0.901, 0.968)
    assert by_source["Original transfer-learning script"]["accuracy"] == 0.813
    assert by_source["Original transfer-learning script"]["specificity"] == 0.5
    assert by_source["Same script, frozen stem"]["accuracy"] == 0.838
    assert (by_source["MedMNIST v2, PneumoniaMNIST"]["accuracy"], by_source["MedMNIST v2, PneumoniaMNIST"]["auc"]) == (0.864, 0.956)
    assert (by_source["Google AutoML Vision"]["accuracy"], by_source["Google AutoML Vision"]["auc"]) == (0.946, 0.991)
    assert all(set(row) == {"source", "model", "accuracy", "sensitivity", "specificity", "auc"} for row in published.rows)


@pytest.mark.parametrize(
    ("classes", "test_images", "shown", "note"),
    [
        (("PNEUMONIA", "NORMAL"), 624, True, "624 images (the same size as the official split)"),
        (("NORMAL", "PNEUMONIA"), 100, True, "test split has 100 images; its numbers"),
        (("NORMAL", "PNEUMONIA"), None, True, None),
        (("NORMAL", "TUBERCULOSIS"), 624, False, None),
        (("NORMAL", "BACTERIA", "VIRUS"), 624, False, None),
    ],
)
def test_section_only_for_the_published_task(classes, test_images, shown, note):
    text = published_section(classes, test_images)
    assert text.startswith('<section id="published">') is shown and (text == "") is not shown
    if shown:
        assert "not computed by this run" in text and "92.8%" in text and "<td>0.968</td>" in text
        assert "<td>50.0%</td>" in text and text.count("<td>\u2013</td>") == 9  # values the sources do not report
        assert ("its numbers are comparable" in text) is (note is not None)
    if note:
        assert note in text
