"""privacy: image paths relative to the data folder with patient IDs hashed, settings without local folders,
metrics.json de-identified (idempotently), and the report's thumbnails read from inside the run folder only."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from medtransfer.data.patients import salted_patient_id
from medtransfer.evaluation.report_findings import leakage_html, write_pair_thumbnails
from medtransfer.privacy import (
    Identities, deidentify_metrics, folder_name, locate, relative_location, shareable_settings, visible_settings,
    without_folders,
)

SALT = b"s" * 32
ROWS = [
    ("/home/ana/xr/test/PNEUMONIA/person7_virus_1.png", "person7_virus"),
    ("/home/ana/xr/train/NORMAL/IM-0121-0002.png", "IM-0121"),
    ("/home/ana/xr/train/NORMAL/IM-0121-0003.png", "IM-0121"),
    ("/home/ana/xr/val/NORMAL/1.png", "p12"),
    ("/home/ana/xr/test/NORMAL/1.png", "p13"),
]
IDS = Identities(ROWS, salt=SALT)
PID = {p: salted_patient_id(p, SALT) for _, p in ROWS}


@pytest.mark.parametrize("path,expected", [
    (ROWS[0][0], f"test/PNEUMONIA/{PID['person7_virus']}_1.png"),
    (ROWS[1][0], f"train/NORMAL/{PID['IM-0121']}-0002.png"),
    (ROWS[3][0], "val/NORMAL/1.png"),  # the ID is not in the name: the relative path alone
    ("/elsewhere/IM-0121-0009.png", f"{PID['IM-0121']}-0009.png"),  # not in the data set: its name, IDs hashed
    (f"train/NORMAL/{PID['IM-0121']}-0002.png", f"train/NORMAL/{PID['IM-0121']}-0002.png"),  # already shareable
])
def test_an_image_is_named_relative_to_the_data_folder_with_its_patient_hashed(path, expected):
    assert IDS.image(path) == expected
    assert IDS.root.as_posix() == "/home/ana/xr"


@pytest.mark.parametrize("text,patients,expected", [
    ("IM-0121 in train+test", True, f"{PID['IM-0121']} in train+test"),
    ("IM-01210 and XIM-0121 stay", True, "IM-01210 and XIM-0121 stay"),  # glued to a letter or digit: another ID
    ("IM-0121 in train+test", False, "IM-0121 in train+test"),  # counts and words untouched without `patients`
    ("/home/ana/xr/val/NORMAL/1.png ~ /home/ana/xr/test/NORMAL/1.png", False, "val/NORMAL/1.png ~ test/NORMAL/1.png"),
    ("1.png: 40% in the band", True, "1.png: 40% in the band"),  # a name without an ID stays
    ("/home/ana/xr", False, "xr"),
    ("/srv/other/set", False, "set"),  # any other absolute path: its last part
])
def test_text_replaces_known_identifiers_where_they_stand_alone(text, patients, expected):
    assert IDS.text(text, patients=patients) == expected


def test_settings_lose_the_cache_folder_and_keep_the_last_part_of_paths():
    settings = {"data": "/home/ana/xr", "cache_dir": "/home/ana/.cache/medtransfer", "split_file": "/home/ana/s.csv",
                "weights": "imagenet", "backbone": "resnet18", "keep_identifiers": False, "class_map": {}}
    assert shareable_settings(settings) == {"data": "xr", "split_file": "s.csv", "weights": "imagenet",
                                            "backbone": "resnet18", "keep_identifiers": False, "class_map": {}}
    assert visible_settings({**settings, "keep_identifiers": True}) == {**settings, "keep_identifiers": True}
    assert visible_settings(None) is None


def test_metrics_lose_identifiers_where_they_name_images_and_nowhere_else_and_twice_changes_nothing():
    metrics = {
        "leakage": {"summary": "Leakage check on 5 images (test 2, train 2, val 1)",
                    "examples": [f"{ROWS[1][0]} = {ROWS[0][0]} (test+train)", "1 patient(s) ..., e.g. IM-0121 in train+test"],
                    "near_duplicate_pairs": [{"path_a": ROWS[0][0], "path_b": ROWS[1][0], "distance": 0,
                                              "thumbnails": ["plots/leakage/pair-01-a.png", None]}]},
        "border_evidence": {"gallery": [{"image": "plots/border/border_01.png", "caption": "IM-0121-0003.png: 49% in the band"}]},
        "data": "/home/ana/external", "test": {"n": 5},
    }
    clean = deidentify_metrics(metrics, IDS)
    text = repr(clean)
    assert "/home/ana" not in text and "IM-0121" not in text and "person7_virus" not in text
    assert clean["leakage"]["summary"] == metrics["leakage"]["summary"] and clean["test"] == {"n": 5}
    assert clean["leakage"]["near_duplicate_pairs"][0]["path_a"] == f"test/PNEUMONIA/{PID['person7_virus']}_1.png"
    assert clean["leakage"]["near_duplicate_pairs"][0]["thumbnails"] == ["plots/leakage/pair-01-a.png", None]
    assert clean["border_evidence"]["gallery"][0]["caption"] == f"{PID['IM-0121']}-0003.png: 49% in the band"
    assert clean["data"] == "external" and set(clean) == set(metrics)
    assert deidentify_metrics(clean, IDS) == clean


def _png(path, value):
    Image.fromarray(np.full((40, 40), value, np.uint8)).save(path)
    return str(path)


def test_pair_thumbnails_are_written_into_the_run_and_the_report_reads_nothing_else(tmp_path):
    run, data = tmp_path / "run", tmp_path / "data"
    run.mkdir(), data.mkdir()
    a, b, secret = _png(data / "a.png", 10), _png(data / "b.png", 12), _png(tmp_path / "secret.png", 200)
    leakage = {"clean": False, "near_duplicates": 3, "near_duplicate_pairs": [
        {"path_a": a, "split_a": "train", "path_b": b, "split_b": "test", "distance": 1, "correlation": 0.999},
        {"path_a": a, "split_a": "train", "path_b": secret, "split_b": "test", "distance": 2, "correlation": 0.998}]}
    write_pair_thumbnails(run, leakage, readable={a, b})  # secret.png is not one of the run's images
    assert leakage["near_duplicate_pairs"][0]["thumbnails"] == ["plots/leakage/pair-01-a.png", "plots/leakage/pair-01-b.png"]
    assert leakage["near_duplicate_pairs"][1]["thumbnails"] == ["plots/leakage/pair-02-a.png", None]
    assert sorted(p.name for p in (run / "plots" / "leakage").iterdir()) == ["pair-01-a.png", "pair-01-b.png", "pair-02-a.png"]
    assert leakage_html(leakage, run).count("data:image/png;base64,") == 3

    crafted = {"clean": False, "near_duplicate_pairs": [  # metrics.json naming files outside the run
        {"path_a": secret, "path_b": secret, "thumbnails": ["../secret.png", secret]},
        {"path_a": a, "path_b": b}]}
    page = leakage_html(crafted, run)
    assert "data:image/png;base64," not in page and page.count("no thumbnail in the run folder") == 4
    assert "data:image/png;base64," not in leakage_html(leakage)  # no run folder given: nothing is read


def test_without_a_data_folder_below_the_home_folder_images_are_named_by_file_name(monkeypatch):
    monkeypatch.setenv("HOME", "/home/ana")
    spread = Identities([("/srv/a/IM-0001-0001.png", "IM-0001"), ("/mnt/b/x.png", "p2")], salt=SALT)  # common: "/"
    assert spread.root is None and spread.image("/srv/a/IM-0001-0001.png") == f"{salted_patient_id('IM-0001', SALT)}-0001.png"
    users = Identities([("/home/ana/a/1.png", "p1"), ("/home/bob/b/2.png", "p2")], salt=SALT)  # common: /home
    assert users.root is None and users.image("/home/bob/b/2.png") == "2.png"
    assert users.text("/home/ana/notes") == "notes" and users.text("see /home/ana/x y") == "see ~/x y"


@pytest.mark.parametrize("target,base,expected", [
    ("/home/ana/runs/ens/members/seed-3", "/home/ana/runs/ens", "members/seed-3"),  # inside: the path below it
    ("/home/ana/runs/demo", "/home/ana/evaluations/site", "../../runs/demo"),  # both in the home folder
    ("/home/ana/runs/demo", "/tmp/out", "demo"),  # a relative path would climb through /home/ana: the name only
    ("/home/bob/runs/demo", "/home/ana/out", "demo"),  # through /home: another user's name
    ("/srv/runs/demo", "/srv/out", "../runs/demo"),
])
def test_a_folder_is_named_relative_to_the_output_where_that_names_no_user(monkeypatch, target, base, expected):
    monkeypatch.setenv("HOME", "/home/ana")
    assert relative_location(target, base) == expected
    if "/" in expected:
        assert os.path.normpath(locate(expected, base)) == target  # read back from the output's folder


def test_free_text_names_folders_by_their_last_part_and_keeps_relative_paths(monkeypatch):
    monkeypatch.setenv("HOME", "/home/ana")
    value = {"skipped": "--run /home/ana/runs/demo: no split.csv in /home/ana/runs/demo/model", "n": 3,
             "list": ["see /home/ana/notes.txt.", "/srv/data/set2 and /srv/data/set", "runs/a", "image/png", "1/2",
                      "http://host/a/b", "/predict"]}
    assert without_folders(value, ["/home/ana/runs/demo", "/srv/data/set"]) == {
        "skipped": "--run demo: no split.csv in demo/model", "n": 3,
        "list": ["see ~/notes.txt.", "set2 and set", "runs/a", "image/png", "1/2", "http://host/a/b", "/predict"]}
    assert folder_name("/home/ana/xr/") == "xr" and folder_name("site.csv") == "site.csv"
