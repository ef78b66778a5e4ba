"""One settings schema: each setting defined once (TrainConfig's field and its Setting), from which the `train`
flags and their help, YAML checking with "did you mean", the resume rule, the ignored-setting refusals and
`medtransfer config --schema` are derived. These tests compare every derived view with the fields."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import typer.main
import yaml

from medtransfer.cli import app
from medtransfer.config import EFFECTIVE_BATCH, RESUME_OVERRIDABLE, TrainConfig, flag_name, resolve_train_config
from medtransfer.config.schema import train_config_schema
from medtransfer.errors import ConfigError
from tests.e2e.test_train_predict import invoke

ROOT = Path(__file__).resolve().parents[1]
COMMAND_OPTIONS = {"out", "config", "resume", "set_values"}  # the command's own options, not settings
_PYTHON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": (list, tuple),
                 "object": dict, "null": type(None)}
# Every `train` flag before the settings were generated from one definition: none may disappear.
FLAGS_BEFORE = {
    "--accelerator", "--accumulate", "--augment", "--augment-on", "--backbone", "--batch-size", "--bootstrap",
    "--border-crop", "--cache-dir", "--calibrate", "--cam-method", "--class-map", "--class-names", "--class-weights",
    "--compile", "--config", "--cutmix", "--data", "--devices", "--distributed", "--ensemble", "--epochs", "--findings",
    "--folds", "--freeze-children", "--head", "--hflip", "--image-size", "--jobs", "--keep-identifiers",
    "--keep-official-val", "--labels", "--labels-column", "--logger", "--loss", "--lp-epochs", "--lp-lr", "--lr",
    "--lr-decay", "--mixup", "--no-progress", "--num-nodes", "--num-workers", "--out", "--output-stride", "--patience",
    "--patient-regex", "--positive-class", "--precision", "--progress", "--refit", "--resume", "--sampler", "--seed",
    "--set", "--skip-bad-images", "--split-file", "--strategy", "--strict", "--test-fraction", "--threshold", "--tta",
    "--uncertain", "--unfreeze-every", "--val-fraction", "--views", "--weight-averaging", "--weights", "--wise-ft",
}


def _train_params():
    return {p.name: p for p in typer.main.get_command(app).commands["train"].params}  # type: ignore[attr-defined]


def _conforms(value, entry) -> bool:
    kinds = entry["type"] if isinstance(entry["type"], list) else [entry["type"]]
    return any(isinstance(value, _PYTHON_TYPES[k]) and not (k in ("integer", "number") and isinstance(value, bool))
               for k in kinds)


def test_every_setting_is_one_train_flag_with_its_help_and_nothing_else_is():
    params, descriptions = _train_params(), TrainConfig.descriptions()
    assert set(params) == set(TrainConfig.field_names()) | COMMAND_OPTIONS
    for name, meta in TrainConfig.settings().items():
        param = params[name]
        assert param.help == descriptions[name]
        assert param.default is None, f"{name}: an unset flag must leave the YAML's value"
        assert set(param.opts) == set(meta.flags or [flag_name(name)])
    assert "{default}" not in "".join(descriptions.values())
    assert "(default 32)" in descriptions["batch_size"] and "(default 0.001)" in descriptions["lr"]


def test_every_flag_the_command_had_is_kept():
    flags = {opt for p in _train_params().values() for opt in (*p.opts, *p.secondary_opts)}
    assert FLAGS_BEFORE <= flags
    assert {"--label-smoothing", "--weight-decay", "--no-channels-last", "--horizontal-flip"} <= flags


def test_every_setting_is_in_the_schema_with_its_default_type_and_help():
    schema = train_config_schema()
    assert list(schema["properties"]) == TrainConfig.field_names()
    defaults, descriptions = TrainConfig().to_dict(), TrainConfig.descriptions()
    for name, entry in schema["properties"].items():
        assert entry["default"] == defaults[name]
        assert entry["description"] == descriptions[name]
        assert _conforms(defaults[name], entry), name
    assert schema["additionalProperties"] is False
    assert schema["properties"]["uncertain"]["enum"] == ["ones", "zeros", "ignore"]
    assert schema["properties"]["views"]["items"]["enum"] == ["frontal", "lateral"]


def test_the_resume_rule_comes_from_the_settings(tmp_path):
    schema = train_config_schema()["properties"]
    assert {k for k, v in schema.items() if v.get("x-resume-overridable") is True} == set(RESUME_OVERRIDABLE)
    assert set(EFFECTIVE_BATCH) == {"batch_size", "accumulate"}
    TrainConfig(data="x").write_yaml(tmp_path / "config.yaml")
    resolve_train_config(out=None, resume=tmp_path, config_file=None, overrides={"num_workers": 0, "progress": False})
    with pytest.raises(ConfigError, match="--lr cannot change") as caught:
        resolve_train_config(out=None, resume=tmp_path, config_file=None, overrides={"lr": 0.1})
    assert all(flag_name(name) in str(caught.value) for name in RESUME_OVERRIDABLE)


def test_each_check_refuses_with_the_flag_name_from_the_command_line(tmp_path, capsys):
    code = invoke(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--label-smoothing", "1.5"])
    assert code == 1
    assert "--label-smoothing: got 1.5; expected a number in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"--uncertain: got 'maybe'; expected ones, zeros or ignore"):
        TrainConfig(uncertain="maybe").validate()


def test_a_misspelled_yaml_key_gets_did_you_mean(tmp_path):
    (tmp_path / "c.yaml").write_text("label_smothing: 0.1\n")
    with pytest.raises(ConfigError, match="unknown setting 'label_smothing'; did you mean 'label_smoothing'"):
        TrainConfig.from_sources(tmp_path / "c.yaml")


def _training_configs() -> list[Path]:
    """The shipped training configs (experiment files, checked cell by cell in tests/test_shipped_configs.py, left out)."""
    return [p for p in sorted((ROOT / "configs").rglob("*.yaml"))
            if not {"grid", "variants", "runs"} & set(yaml.safe_load(p.read_text()) or {})]


@pytest.mark.parametrize("path", _training_configs(), ids=lambda p: p.name)
def test_shipped_configs_conform_to_the_schema(path):
    values = yaml.safe_load(path.read_text()) or {}
    properties = train_config_schema()["properties"]
    for key, value in values.items():
        assert key in properties, f"{path.name}: {key}"
        assert value is None or _conforms(value, properties[key]) or properties[key]["type"] == "number", (key, value)


def test_the_config_command_prints_the_schema(capsys):
    assert invoke(["config", "--schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(train_config_schema()))
    assert printed["properties"]["findings"]["type"] == ["array", "null"]


def test_a_new_flag_reaches_the_settings(tmp_path):
    flags = {"label_smoothing": "0.1", "channels_last": False, "crop_scale": "0.5,0.9"}
    config, _ = resolve_train_config(out=tmp_path / "r", resume=None, config_file=None, overrides={"data": "x", **flags})
    assert (config.label_smoothing, config.channels_last, config.crop_scale) == (0.1, False, (0.5, 0.9))
    assert dataclasses.asdict(config)["crop_scale"] == (0.5, 0.9)


def test_the_docs_settings_page_is_the_generated_table(capsys):
    from medtransfer.config.schema import settings_markdown

    page = (ROOT / "docs" / "guide" / "settings.md").read_text()
    table = settings_markdown()
    assert page.endswith(table), "docs/guide/settings.md is stale: regenerate its table with `medtransfer config --markdown`"
    assert len(table.splitlines()) == len(TrainConfig.field_names()) + 2
    assert invoke(["config", "--markdown"]) == 0
    assert capsys.readouterr().out == table
