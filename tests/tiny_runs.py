"""Test helper: run folders as `train` leaves them, built in seconds without training, and the check that the
files a user shares name no local folder.

`fake_home(tmp_path, monkeypatch)` points HOME at ``tmp_path/home-zq9alice`` (its name stands for the user name), so
data and runs under it sit where they would on a laptop. `kermany_set(root)` writes tiny val, test (and train)
images with Kermany names - the patient ID is in the file name - and returns `root`. `tiny_run(folder, records)`
saves an untrained ResNet-18 (32 px, decoded at 40) with split.csv, config.yaml and metrics.json. `local_mentions(
folder, *needles)` lists where a shareable file (metrics.json, model.json, adaptation.json, gallery.json,
report.html, MODEL_CARD.md) holds one of `needles`. `write_test_predictions(run)` adds predictions_test.csv.

    home = fake_home(tmp_path, monkeypatch)
    run = tiny_run(home / "runs" / "a", discover(kermany_set(home / "xr")))
    assert local_mentions(run, str(tmp_path), home.name) == []
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from medtransfer.data.discover import Record
from tests.conftest import kermany_names, write_image

HOME = "home-zq9alice"
SHAREABLE = ("metrics.json", "model/model.json", "adaptation.json", "gallery.json", "report.html", "MODEL_CARD.md")
CLASSES = ["NORMAL", "PNEUMONIA"]


def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME (and so the default cache with its patient salt) in tmp_path, as on a laptop; matplotlib keeps its cache."""
    import matplotlib

    monkeypatch.setenv("MPLCONFIGDIR", matplotlib.get_configdir())
    folder = tmp_path / HOME
    folder.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(folder))
    for name in ("XDG_CACHE_HOME", "MEDTRANSFER_CACHE"):
        monkeypatch.delenv(name, raising=False)
    return folder


def kermany_set(root: Path, *, splits: dict[str, int] | None = None) -> Path:
    """root/SPLIT/CLASS/ 40 px noise PNGs, `splits` images per class (default val 4, test 4), one patient each,
    named as Kermany names them (IM-0001-0001.png, person1_bacteria_3.png: the patient ID in the file name)."""
    start = 1
    for split, count in (splits or {"val": 4, "test": 4}).items():
        for label in CLASSES:
            for name in kermany_names(label, count, start=start):
                write_image(root / split / label / Path(name).with_suffix(".png"), "L", size=(40, 40))
        start += 100  # other patients in every split
    return root


def tiny_run(folder: Path, records: list[Record], *, seed: int = 0, cache_dir: Path | None = None,
             settings: dict[str, Any] | None = None, val: dict[str, Any] | None = None) -> Path:
    """An untrained ResNet-18 run folder as train writes it: model/ (training_config without local folders),
    split.csv (`records`), config.yaml (`settings` over the defaults below, absolute data and cache folders: a
    working file) and metrics.json (`val`: its val block)."""
    import torch

    from medtransfer.artifacts import model_info, save_model
    from medtransfer.data.split import write_split_csv
    from medtransfer.models.backbones import create_backbone
    from medtransfer.models.strategies import Strategy, build_transfer_model
    from medtransfer.privacy import shareable_settings
    from medtransfer.rundir import write_metrics

    data = Path(records[0].path).parents[2]
    config = {"data": str(data), "cache_dir": str(cache_dir or folder.parent / "cache"), "seed": seed,
              "threshold": "youden", "calibrate": "temperature", "precision": "32-true", "bootstrap": 20,
              "labels": "folder", "cam_method": "gradcam", "keep_identifiers": False, **(settings or {})}
    torch.manual_seed(seed)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    model = build_transfer_model(net, spec, Strategy("finetune", 0))
    info = model_info(model, classes=CLASSES, positive_class="PNEUMONIA", threshold=0.5, image_size=32, decode_size=40,
                      threshold_policy="youden", training_config=shareable_settings(config))
    save_model(model, info, folder)
    write_split_csv(records, folder / "split.csv")
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    block = val or {"n": 8, "patients": 8, "auc": 0.5, "accuracy": 0.5, "sensitivity": 0.5, "specificity": 0.5}
    write_metrics(folder, {"backbone": "resnet18", "strategy": "finetune", "weights": "none", "epochs_run": 1,
                           "best_epoch": 1, "train_seconds": 1.0, "positive_class": "PNEUMONIA", "threshold": 0.5,
                           "classes": CLASSES, "val": block, "test": None})
    return folder


def write_test_predictions(run: Path) -> Path:
    """run/predictions_test.csv for the test images of its split.csv, each called PNEUMONIA at 0.6 (with patient IDs)."""
    rows = [line.split(",") for line in (run / "split.csv").read_text().splitlines()[1:] if line.endswith(",test")]
    path = run / "predictions_test.csv"
    path.write_text("path,label,prob_NORMAL,prob_PNEUMONIA,pred,patient_id\n" + "".join(
        f"{image},{label},0.4,0.6,PNEUMONIA,{patient}\n" for image, label, patient, _ in rows))
    return path


def local_mentions(folder: Path, *needles: str) -> list[str]:
    """'FILE: NEEDLE' for each shareable file under `folder` that holds a needle."""
    found = []
    for name in SHAREABLE:
        path = folder / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            found += [f"{name}: {needle}" for needle in needles if needle and needle in text]
    return found


def local_needles(tmp_path: Path, home: Path) -> tuple[str, ...]:
    """What no shareable output may hold: the test's absolute folder (as given and resolved), the home folder and
    its name (the user name), pytest's per-user folder."""
    return (str(tmp_path), str(tmp_path.resolve()), str(home), home.name, "pytest-of-")
