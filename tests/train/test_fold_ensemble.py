"""train/fold_ensemble: what the cross-validation folder shares - its folds named relative to it, the leakage
check's images and patients in their shareable forms, settings without local folders - on fold runs built
without training."""

from __future__ import annotations

import dataclasses
import json
import shutil

from rich.console import Console

from medtransfer.artifacts import load_model
from medtransfer.config import TrainConfig
from medtransfer.data.discover import discover
from medtransfer.data.folds import draw_folds, write_fold_split_csv
from medtransfer.data.split import check_leakage, split_summary
from medtransfer.train.fold_ensemble import out_of_fold, shown_run, write_fold_ensemble
from medtransfer.train.refit import REFIT
from tests.tiny_runs import fake_home, kermany_set, local_mentions, local_needles, tiny_run


def test_the_fold_ensemble_shares_no_local_folder_or_patient_id(tmp_path, monkeypatch):
    home = fake_home(tmp_path, monkeypatch)
    data = kermany_set(home / "xr", splits={"train": 4, "test": 3})
    shared = sorted((data / "train" / "PNEUMONIA").glob("*.png"))[0]  # the same patient (and bytes) in test
    shutil.copy(shared, data / "test" / "PNEUMONIA" / f"{shared.stem.rsplit('_', 1)[0]}_999.png")
    records, numbers = draw_folds(discover(data), folds=2, seed=0)
    out, cache = home / "runs" / "cv", home / "cache"
    config = TrainConfig(data=str(data), cache_dir=str(cache), folds=2, bootstrap=20, accelerator="cpu",
                         precision="32-true")
    out.mkdir(parents=True)
    write_fold_split_csv(records, numbers, out / "split.csv")
    runs = []
    for k in (1, 2):
        rows = [dataclasses.replace(r, split="test" if n is None else "val" if n == k else "train")
                for r, n in zip(records, numbers)]
        runs.append(tiny_run(out / "folds" / f"fold-{k}", rows, seed=k, cache_dir=cache))
    oof = out_of_fold(config, runs, [r for r in records if r.split != "test"])
    leakage = check_leakage(records).to_dict()
    assert leakage["shared_patients"] == 1  # the check found the patient in both splits: metrics.json names it

    write_fold_ensemble(config, out, oof, records, leakage=leakage, data_summary=split_summary(records),
                        console=Console(quiet=True))

    info = json.loads((out / "model" / "model.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    folds = ["folds/fold-1", "folds/fold-2"]  # relative to the cross-validation folder
    assert [m["run"] for m in info["provenance"]["cross_validation"]["members"]] == folds
    assert metrics["cross_validation"]["runs"] == folds and [m["run"] for m in metrics["ensemble"]["members"]] == folds
    assert info["training_config"]["data"] == "xr" and "cache_dir" not in info["training_config"]
    assert all("pid-" in line for line in metrics["leakage"]["examples"])
    patients = {r.patient_id for r in records}
    assert local_mentions(out, *local_needles(tmp_path, home), *patients) == []
    assert len(load_model(out).extra) == 1  # the fold models' weights: found beside model.json, as before
    # the refit's folder as metrics.json names it; keep_identifiers keeps absolute folders
    assert shown_run(out / REFIT, out, config) == "refit"
    assert shown_run(runs[0], out, dataclasses.replace(config, keep_identifiers=True)) == str(runs[0].resolve())
