"""The training settings as a JSON Schema (`medtransfer config --schema`), for editors and tools.

Derived from :class:`~medtransfer.config.TrainConfig`'s fields: name, type and default from the
field, description (the `train` flag's help), fixed choices and the resume rule from its
:class:`~medtransfer.config.setting.Setting`. So the schema, `train --help` and YAML checking agree.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from medtransfer.config.setting import RESUME_ANY, RESUME_EFFECTIVE_BATCH
from medtransfer.config.settings import TrainConfig

__all__ = ["SCHEMA_ID", "field_schema", "schema_json", "settings_markdown", "train_config_schema"]

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
    entry = {k: (dict(v) if isinstance(v, dict) else v) for k, v in _TYPES[annotation].items()}
    choices = field.metadata["setting"].choices
    if choices:
        target = entry["items"] if "items" in entry else entry
        target["enum"] = list(choices) + ([None] if target is entry and "null" in entry["type"] else [])
    return entry


def train_config_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a YAML config / config.yaml: every setting, its type, default and description."""
    defaults = TrainConfig().to_dict()
    descriptions = TrainConfig.descriptions()
    properties: dict[str, Any] = {}
    for field in dataclasses.fields(TrainConfig):
        entry = field_schema(field)
        entry["default"] = defaults[field.name]
        entry["description"] = descriptions[field.name]
        resume = field.metadata["setting"].resume
        if resume == RESUME_ANY:
            entry["x-resume-overridable"] = True
        elif resume == RESUME_EFFECTIVE_BATCH:
            entry["x-resume-overridable"] = "with batch_size x accumulate unchanged"
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


def schema_json() -> str:
    return json.dumps(train_config_schema(), indent=2)


def settings_markdown() -> str:
    """Every setting as a Markdown table (YAML key, flags, default, description): the docs' settings page."""
    from medtransfer.config.setting import flag_name, shown_default

    defaults = TrainConfig()
    rows = ["| setting (YAML) | flag | default | description |", "|---|---|---|---|"]
    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata["setting"]
        flags = list(meta.flags or [flag_name(field.name)])
        if field.type == "bool" and getattr(defaults, field.name) is True:
            flags = [f"{f}/--no-{f[2:]}" for f in flags]
        default = getattr(defaults, field.name)
        shown = "" if default in (None, "", {}) else shown_default(default)
        resume = " May change on `--resume`." if meta.resume else ""
        text = (meta.help_text(default) + resume).replace("|", "\\|").replace("*", "\\*").replace("_", "\\_")
        rows.append(f"| `{field.name}` | {', '.join(f'`{f}`' for f in flags)} | {f'`{shown}`' if shown else ''} | {text} |")
    return "\n".join(rows) + "\n"
