"""`medtransfer config --schema`: every training setting once, typed, with its default and its flag's help."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from medtransfer.cli.train_command import flag_descriptions
from medtransfer.config import TrainConfig
from medtransfer.schema import train_config_schema
from tests.e2e.test_train_predict import invoke

ROOT = Path(__file__).resolve().parents[1]
_PYTHON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": (list, tuple),
                 "object": dict, "null": type(None)}


def _conforms(value, entry) -> bool:
    kinds = entry["type"] if isinstance(entry["type"], list) else [entry["type"]]
    return any(isinstance(value, _PYTHON_TYPES[k]) and not (k in ("integer", "number") and isinstance(value, bool))
               for k in kinds)


def test_every_setting_is_in_the_schema_with_its_default_and_type():
    schema = train_config_schema(flag_descriptions())
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert list(schema["properties"]) == names
    defaults = TrainConfig().to_dict()
    for name, entry in schema["properties"].items():
        assert entry["default"] == defaults[name]
        assert _conforms(defaults[name], entry), name
    assert schema["additionalProperties"] is False


def test_every_train_flag_is_a_setting_and_the_schema_carries_its_help():
    flags = flag_descriptions()
    own = {"out", "config", "resume", "set_values"}  # the command's own options, not settings
    assert set(flags) - own <= {f.name for f in dataclasses.fields(TrainConfig)}
    schema = train_config_schema(flags)
    assert schema["properties"]["threshold"]["description"] == flags["threshold"]
    assert schema["properties"]["num_workers"].get("x-resume-overridable") is True


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_conform_to_the_schema(path):
    values = yaml.safe_load(path.read_text()) or {}
    if "grid" in values or "variants" in values or "runs" in values:
        pytest.skip("an experiment file: its cells are checked by tests/test_shipped_configs.py")
    properties = train_config_schema()["properties"]
    for key, value in values.items():
        assert key in properties, f"{path.name}: {key}"
        assert value is None or _conforms(value, properties[key]) or properties[key]["type"] == "number", (key, value)


def test_the_config_command_prints_the_schema(capsys):
    assert invoke(["config", "--schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["properties"]["findings"]["type"] == ["array", "null"]
    assert "uncertain" in printed["properties"]
