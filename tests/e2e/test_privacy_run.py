"""Privacy by default, end to end: a run on tiny generated data with a shared patient, a byte-identical copy and
a near-duplicate across splits writes a report, metrics.json, model.json, gallery and logs that hold neither
the absolute data path, nor the home folder (the user name), nor any patient ID of split.csv; with
--keep-identifiers they may; `medtransfer redact` makes such a run (an old-style one) clean in place."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtransfer.artifacts import load_model
from medtransfer.cli import main
from tests.conftest import write_demo_data

FAST = ["--backbone", "resnet18", "--weights", "none", "--image-size", "48", "--set", "cache_size=56", "--batch-size", "8",
        "--bootstrap", "50", "--num-workers", "0", "--no-progress", "--strategy", "freeze", "--epochs", "1"]
HOME = "home-zq9alice"  # the home folder (its name stands for the user name); the data and the cache live in it
SHAREABLE = ["report.html", "metrics.json", "model/model.json", "model/ood.json", "gallery.json", "logs/csv/hparams.yaml"]


def invoke(args: list) -> int:
    saved = sys.argv
    sys.argv = ["medtransfer", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as exit_:
        return exit_.code or 0
    finally:
        sys.argv = saved


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """HOME points at a folder named HOME, so the default cache (the patient salt) is under it, as on a laptop."""
    folder = tmp_path_factory.mktemp("users") / HOME
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(folder))
        for name in ("XDG_CACHE_HOME", "MEDTRANSFER_CACHE"):
            patch.delenv(name, raising=False)
        data = write_demo_data(folder / "data" / "chest_xray", patients_per_class=8, images_per_patient=(1, 2),
                               val_patients_per_class=2, test_patients_per_class=4, image_size=64)
        shared = sorted((data / "train" / "PNEUMONIA").glob("*.png"))[0]  # the same patient (and file) in test
        shutil.copy(shared, data / "test" / "PNEUMONIA" / f"{shared.stem.rsplit('_', 1)[0]}_999.png")
        normal = sorted((data / "train" / "NORMAL").glob("*.png"))[0]  # a near-duplicate under another patient
        pixels = np.asarray(Image.open(normal)).astype(np.int16)
        Image.fromarray(np.clip(pixels + 2, 0, 255).astype(np.uint8)).save(data / "test" / "NORMAL" / "IM-0999-0001.png")
        yield folder


def _train(home: Path, name: str, *extra: str) -> Path:
    run = home / "runs" / name
    assert invoke(["train", "--data", home / "data" / "chest_xray", "--out", run, *FAST, *extra]) == 0
    return run


@pytest.fixture(scope="module")
def default_run(home) -> Path:
    return _train(home, "default")


@pytest.fixture(scope="module")
def kept_run(home) -> Path:
    return _train(home, "kept", "--keep-identifiers")


def identifiers(run: Path) -> tuple[str, set[str]]:
    """The absolute data folder and every patient ID, from the run's split.csv."""
    with (run / "split.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return os.path.commonpath([os.path.dirname(r["path"]) for r in rows]), {r["patient_id"] for r in rows}


def leaks(run: Path) -> list[str]:
    """Where a shareable output (or a file name under plots/) holds the data path, the home folder or a patient ID."""
    data, patients = identifiers(run)
    found = []
    texts = {name: (run / name).read_text(encoding="utf-8") for name in SHAREABLE if (run / name).is_file()}
    texts["file names under plots/"] = "\n".join(p.name for p in (run / "plots").rglob("*"))
    for name, text in texts.items():
        for needle in (data, HOME, "pytest-of-"):
            if needle in text:
                found.append(f"{name}: {needle}")
        found += [f"{name}: patient {p}" for p in sorted(patients)
                  if re.search(rf"(?<![A-Za-z0-9]){re.escape(p)}(?![A-Za-z0-9])", text)]
    return found


def test_a_run_shares_no_path_user_or_patient_id_by_default(default_run):
    assert leaks(default_run) == []
    metrics = json.loads((default_run / "metrics.json").read_text())
    leakage = metrics["leakage"]
    assert leakage["shared_patients"] == 1 and leakage["duplicate_images"] == 1 and leakage["near_duplicates"] >= 1
    assert all("pid-" in line for line in leakage["examples"])
    pair = leakage["near_duplicate_pairs"][0]
    assert not os.path.isabs(pair["path_a"]) and pair["thumbnails"] == ["plots/leakage/pair-01-a.png", "plots/leakage/pair-01-b.png"]
    assert (default_run / pair["thumbnails"][0]).is_file()
    assert re.fullmatch(r"(tp|fp|fn|tn|loss)_\d\d_gradcam\.png", next((default_run / "plots" / "gallery").glob("*.png")).name)
    settings = json.loads((default_run / "model" / "model.json").read_text())["training_config"]
    assert settings["data"] == "chest_xray" and "cache_dir" not in settings and settings["keep_identifiers"] is False
    # the working files keep what resume, evaluation and the user's lookups need
    data, patients = identifiers(default_run)
    assert data in (default_run / "predictions_test.csv").read_text() and os.path.isabs(data)


def test_keep_identifiers_keeps_them_and_redact_removes_them_in_place(kept_run, tmp_path):
    assert leaks(kept_run)  # paths, the home folder and patient IDs, as before privacy by default
    assert any(re.search(r"_\d\d_(person|IM-)", p.name) for p in (kept_run / "plots" / "gallery").glob("*.png"))
    old = tmp_path / "old-run"  # a run written before privacy by default looks like this one
    shutil.copytree(kept_run, old, ignore=shutil.ignore_patterns(".lock*", "leakage"))
    metrics = json.loads((old / "metrics.json").read_text())
    for pair in metrics["leakage"]["near_duplicate_pairs"]:
        pair.pop("thumbnails")
    (old / "metrics.json").write_text(json.dumps(metrics))
    gallery_before = json.loads((old / "gallery.json").read_text())

    assert invoke(["redact", old]) == 0
    assert leaks(old) == []
    assert (old / "plots" / "leakage" / "pair-01-a.png").is_file()  # thumbnails of the run's own images
    gallery = json.loads((old / "gallery.json").read_text())
    assert [len(s["items"]) for s in gallery["sections"]] == [len(s["items"]) for s in gallery_before["sections"]]
    assert all((old / item["image"]).is_file() for s in gallery["sections"] for item in s["items"])
    assert sorted(p.name for p in (old / "plots" / "gallery").glob("*.png")) == sorted(
        Path(item["image"]).name for s in gallery["sections"] for item in s["items"])
    assert "keep_identifiers: false" in (old / "config.yaml").read_text()
    assert load_model(old).info.training_config["data"] == "chest_xray"
    before = {name: (old / name).read_text() for name in ("metrics.json", "gallery.json", "model/model.json")}
    assert invoke(["redact", old]) == 0  # a second pass changes nothing
    assert {name: (old / name).read_text() for name in before} == before
