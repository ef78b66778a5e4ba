"""The training settings as a JSON Schema (`medtransfer config --schema`), for editors and tools.

Each setting's name, type and default come from :class:`~medtransfer.config.TrainConfig` (the one
typed definition; YAML and flags are coerced and checked against it); its description is the
`train` flag's own help text, passed in by the CLI, so the schema, `--help` and the YAML agree.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from medtransfer.config import RESUME_OVERRIDABLE, TrainConfig

SCHEMA_ID = "https://medtransfer.invalid/schemas/train-config.json"

# The annotation text of a TrainConfig field -> its JSON Schema type.
_TYPES: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "str | None": {"type": ["string", "null"]},
    "int | None": {"type": ["integer", "null"]},
    "float | None": {"type": ["number", "null"]},
    "list[str] | None": {"type": ["array", "null"], "items": {"type": "string"}},
    "dict[str, str]": {"type": "object", "additionalProperties": {"type": "string"}},
    "tuple[float, float]": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
}


def field_schema(field: dataclasses.Field) -> dict[str, Any]:
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    if annotation not in _TYPES:
        raise TypeError(f"TrainConfig.{field.name}: no JSON Schema type for annotation {annotation!r}; add it to _TYPES")
    return dict(_TYPES[annotation])


def train_config_schema(descriptions: Mapping[str, str] | None = None) -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a YAML config / config.yaml: every setting, its type, default and description."""
    defaults = TrainConfig().to_dict()
    properties: dict[str, Any] = {}
    for field in dataclasses.fields(TrainConfig):
        entry = field_schema(field)
        entry["default"] = defaults[field.name]
        description = (descriptions or {}).get(field.name)
        if description:
            entry["description"] = description
        if field.name in RESUME_OVERRIDABLE:
            entry["x-resume-overridable"] = True
        properties[field.name] = entry
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "medtransfer training settings",
        "description": "Precedence: defaults < YAML file (--config) < command-line flags. Unknown keys are refused.",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }


def schema_json(descriptions: Mapping[str, str] | None = None) -> str:
    return json.dumps(train_config_schema(descriptions), indent=2)
