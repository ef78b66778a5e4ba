"""Report sections: the leakage check with near-duplicate pairs, and the shift summary."""

from __future__ import annotations

import numpy as np
from PIL import Image

from medtransfer.evaluation.report_findings import write_pair_thumbnails, leakage_html, shift_html


def _image(path, value: int):
    Image.fromarray(np.full((40, 40), value, np.uint8)).save(path)
    return path


def test_near_duplicate_pairs_are_shown_side_by_side_with_the_summary(tmp_path):
    a, b = _image(tmp_path / "train_a.png", 10), _image(tmp_path / "test_b.png", 12)
    leakage = {
        "clean": False, "near_duplicates": 2, "summary": "Leakage check on 10 images (test 2, train 8): 1 near-duplicate",
        "examples": ["1 near-duplicate image pair(s) by content in different splits"],
        "near_duplicate_pairs": [
            {"path_a": str(a), "split_a": "train", "path_b": str(b), "split_b": "test", "distance": 3, "correlation": 0.999},
            {"path_a": str(tmp_path / "gone.png"), "split_a": "train", "path_b": str(b), "split_b": "test", "distance": 9,
             "correlation": 0.998},
        ],
    }
    run = tmp_path / "run"
    write_pair_thumbnails(run, leakage)  # what training does: the pairs' images as thumbnails inside the run folder
    text = leakage_html(leakage, run)
    assert "Leakage check on 10 images" in text and "2 of 2 shown" in text
    assert text.count("data:image/png;base64,") == 3  # two pairs, one file missing
    assert "train_a.png (train) ~ test_b.png (test): 3 bits" in text and "gone.png (train) ~ test_b.png" in text
    outside = leakage_html(leakage, tmp_path / "another_run")  # thumbnails are read only inside the run folder
    assert "data:image/png;base64," not in outside  # a path metrics.json names outside the run folder is not read


def test_a_clean_check_states_what_was_checked():
    text = leakage_html({"clean": True, "summary": "Leakage check on 5 images: no patient ID in two splits."})
    assert 'class="ok"' in text and "no patient ID in two splits" in text and "<img" not in text


def test_shift_table_compares_this_set_with_the_run_split():
    shift = {
        "n": 314, "prevalence": 0.627, "mean_probability": 0.71, "calibration_in_the_large": -0.42, "calibration_slope": 0.61,
        "reference": {"name": "test split of runs/a", "n": 1054, "prevalence": 0.744, "mean_probability": 0.74,
                      "ks_distance": 0.21, "ks_pvalue": 1e-9, "calibration_in_the_large": 0.01, "calibration_slope": 0.98},
    }
    text = shift_html(shift)
    assert '<section id="shift">' in text and "test split of runs/a" in text
    assert "0.627" in text and "0.744" in text and "0.610" in text and "distance 0.210" in text
    assert shift_html(None) == ""
