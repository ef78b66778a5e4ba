"""train/ensemble: which runs may form one ensemble, and the one-line refusal naming the run that differs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from medtransfer.artifacts import ModelInfo
from medtransfer.errors import ConfigError
from medtransfer.rundir import SplitRow
from medtransfer.train.ensemble import Member, check_members

INFO = ModelInfo(backbone="resnet18", classes=("NORMAL", "PNEUMONIA"), positive_class="PNEUMONIA", threshold=0.5,
                 image_size=48, decode_size=56, mean=(0.5,), std=(0.25,), tta="crops")
SPLIT = [SplitRow("a.png", "NORMAL", "p1", "val"), SplitRow("b.png", "PNEUMONIA", "p2", "test")]
CONFIG = {"threshold": "youden", "calibrate": "temperature", "seed": 1}


def member(name: str, *, info=INFO, split=SPLIT, config=CONFIG) -> Member:
    return Member(Path(name), SimpleNamespace(info=info), list(split), dict(config))


def test_runs_differing_only_in_seed_and_threshold_form_an_ensemble():
    other = member("b", info=dataclasses.replace(INFO, threshold=0.3), config={**CONFIG, "seed": 2})
    check_members([member("a"), other])


@pytest.mark.parametrize("change,message", [
    ({"info": dataclasses.replace(INFO, classes=("NORMAL", "PNEUMONIA", "VIRUS"))},
     "RUNS b: model.json classes ['NORMAL', 'PNEUMONIA', 'VIRUS'] differs from a's ['NORMAL', 'PNEUMONIA']"),
    ({"info": dataclasses.replace(INFO, tta="none")}, "RUNS b: model.json tta 'none' differs from a's 'crops'"),
    ({"info": dataclasses.replace(INFO, mean=(0.4,))}, "RUNS b: model.json mean [0.4] differs from a's [0.5]"),
    ({"config": {**CONFIG, "threshold": "f1"}}, "RUNS b: config.yaml threshold 'f1' differs from a's 'youden'"),
    ({"split": [SPLIT[0], dataclasses.replace(SPLIT[1], split="val")]},
     "RUNS b: split.csv differs from a's (1 image(s) in another split or missing)"),
])
def test_a_member_that_differs_is_named_with_the_field_and_both_values(change, message):
    with pytest.raises(ConfigError) as error:
        check_members([member("a"), member("b", **change)])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_an_ensemble_is_not_a_member():
    nested = dataclasses.replace(INFO, members=("weights.safetensors", "member_2.safetensors"))
    with pytest.raises(ConfigError, match="RUNS b: is an ensemble already; pass the runs it was built from"):
        check_members([member("a"), member("b", info=nested)])


def test_one_run_or_the_same_run_twice_is_refused():
    with pytest.raises(ConfigError, match="RUNS: got 1 run; an ensemble needs two or more"):
        check_members([member("a")])
    with pytest.raises(ConfigError, match="RUNS a: given twice"):
        check_members([member("a"), member("a")])


def test_the_ensemble_names_its_members_relative_to_its_folder_and_no_local_folder(tmp_path, monkeypatch):
    import json

    from rich.console import Console

    from medtransfer.artifacts import load_model
    from medtransfer.data.discover import discover
    from medtransfer.train.ensemble import build_ensemble
    from tests.tiny_runs import fake_home, kermany_set, local_mentions, local_needles, tiny_run

    home = fake_home(tmp_path, monkeypatch)
    records = discover(kermany_set(home / "xr"))
    runs = [tiny_run(home / "runs" / f"seed-{seed}", records, seed=seed) for seed in (1, 2)]
    out = home / "runs" / "ensemble"

    build_ensemble(runs, out, cache_dir=home / "runs" / "cache", accelerator="cpu", bootstrap=20,
                   console=Console(quiet=True))

    info = json.loads((out / "model" / "model.json").read_text())
    shown = ["../seed-1", "../seed-2"]  # relative to the ensemble's folder: no absolute path, no user name
    assert [m["run"] for m in info["provenance"]["ensemble"]["members"]] == shown
    assert [m["run"] for m in json.loads((out / "metrics.json").read_text())["ensemble"]["members"]] == shown
    assert info["training_config"]["data"] == "xr" and "cache_dir" not in info["training_config"]
    assert local_mentions(out, *local_needles(tmp_path, home)) == []
    assert len(load_model(out).extra) == 1  # the members' weights: found beside model.json, as before
