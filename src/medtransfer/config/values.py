"""Settings from YAML and the command line: a bounded YAML reader, each value coerced to its setting's type.

Every refusal is one line naming the source (``--config FILE`` or ``options``), the setting, the
value received (shortened) and what was expected.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from medtransfer.errors import ConfigError

__all__ = ["MAX_NAME", "MAX_NAMES", "coerced_values", "parse_class_map", "read_yaml", "shown"]

MAX_YAML_BYTES, MAX_YAML_NODES = 1 << 20, 100_000  # a settings file: its size, and its values with aliases expanded
MAX_NAMES, MAX_NAME = 1000, 200  # class or finding names in a setting (as in a saved model.json), and their length


def coerced_values(values: Mapping[str, Any], defaults: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """`values` with unknown keys refused (with "did you mean") and each converted to the type of its default."""
    known = list(defaults)
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key).replace("-", "_"), known, n=1) if len(str(key)) <= 80 else []
            hint = f"; did you mean {close[0]!r}?" if close else f"; known settings: {', '.join(known)}"
            raise ConfigError(f"{source}: unknown setting {shown(key)}{hint}")
    return {key: _SPECIAL.get(key, _coerce)(key, value, defaults[key], source) for key, value in values.items()}


def read_yaml(path: Path) -> dict[str, Any]:
    """A settings file: safe YAML of at most MAX_YAML_BYTES whose values, every alias (*name) expanded, number at
    most MAX_YAML_NODES: a few hundred bytes of nested aliases ("billion laughs") are refused before use."""
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file; pass a YAML file such as configs/chest_xray_pneumonia.yaml")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"--config {path}: {path.stat().st_size:,} bytes; a settings file holds at most {MAX_YAML_BYTES:,}")
    try:
        values = yaml.load(path.read_text(), Loader=_BoundedLoader) or {}
    except (yaml.YAMLError, RecursionError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0][:200] if isinstance(exc, yaml.YAMLError) else f"{type(exc).__name__}: too deep or not UTF-8"
        raise ConfigError(f"--config {path}: not valid YAML ({reason})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of setting: value, got {type(values).__name__}")
    return values


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts a document's values with every alias expanded (memoised; a cycle is refused)."""
    def compose_document(self):
        node, sizes = super().compose_document(), {}

        def size(item: yaml.Node, active: frozenset = frozenset()) -> int:
            if id(item) in active:
                raise yaml.YAMLError("an alias refers to the value that contains it")
            if id(item) not in sizes:
                children = item.value if isinstance(item, yaml.SequenceNode) else (
                    [n for pair in item.value for n in pair] if isinstance(item, yaml.MappingNode) else [])
                sizes[id(item)] = 1 + sum(size(child, active | {id(item)}) for child in children)
                if sizes[id(item)] > MAX_YAML_NODES:
                    raise yaml.YAMLError(f"its aliases expand to more than {MAX_YAML_NODES:,} values; write them out")
            return sizes[id(item)]
        return node if node is None or size(node) else node


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 80, 80, 8, 8
_WORDS = {"true": True, "yes": True, "1": True, "on": True, "false": False, "no": False, "0": False, "off": False}


def shown(value: Any, limit: int = 200) -> str:
    """repr(value) for an error message, cut to `limit` characters without building the whole repr first."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_EXPECTED = {bool: "true or false", int: "a whole number", float: "a number", str: "a text value", tuple: "a list of numbers"}


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    """Convert YAML/CLI values to the type of the default, with a clear error."""
    try:
        if default is None:  # optional text settings
            if isinstance(value, (list, tuple, dict)):
                raise ValueError
            return None if value is None else str(value)
        if isinstance(default, bool):
            if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in _WORDS:
                return _WORDS[value.strip().lower()]
            raise ValueError
        if isinstance(value, bool):  # YAML turns yes/no/on/off into booleans; never read them as 1/0
            raise ValueError
        if isinstance(default, tuple):
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            if len(items) != len(default):
                raise ValueError
            return tuple(float(v) for v in items)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, str):
            if value is None or isinstance(value, (list, tuple, dict)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        expected = _EXPECTED.get(type(default), type(default).__name__)
        if isinstance(default, tuple):
            expected = f"a list of {len(default)} numbers, e.g. {','.join(str(v) for v in default)}"
        raise ConfigError(f"{source}: setting {key!r} got {shown(value)}; expected {expected}") from None
    return value


def _optional_fraction(key: str, value: Any, default: Any, source: str) -> float | None:
    """None (also "none" or "") keeps the default rule; anything else must be a number."""
    blank = value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))
    return None if blank else _coerce(key, value, 0.0, source)


def _class_map(key: str, value: Any, default: Any, source: str) -> dict[str, str]:
    """A YAML mapping {OLD: NEW}, or OLD=NEW text (several separated by commas, as --set gives them)."""
    if isinstance(value, str):
        value = [item for item in value.split(",") if item.strip()]
    if not isinstance(value, (dict, list, tuple)) and value is not None:
        raise ConfigError(f"{source}: setting {key!r} got {shown(value)}; expected a mapping OLD: NEW or OLD=NEW items")
    return parse_class_map(value)


def _class_names(key: str, value: Any, default: Any, source: str) -> list[str] | None:
    """A YAML list, or names separated by commas."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if (not isinstance(items, (list, tuple)) or len(items) > MAX_NAMES
            or not all(isinstance(v, (str, int)) and len(str(v)) <= MAX_NAME for v in items)):
        raise ConfigError(f"{source}: setting {key!r} got {shown(value)}; expected class names, e.g. normal,pneumonia "
                          f"(at most {MAX_NAMES}, of at most {MAX_NAME} characters each)")
    names = [str(v).strip() for v in items]
    if not all(names):
        raise ConfigError(f"{source}: setting {key!r} got {shown(value)}; a class name is empty")
    return names


def _augment(key: str, value: Any, default: Any, source: str) -> str:
    """A policy name; true/false (run folders and YAML from before the policies) read as light/none."""
    if isinstance(value, bool):
        return "light" if value else "none"
    text = _coerce(key, value, default, source).strip().lower()
    return {"true": "light", "yes": "light", "on": "light", "false": "none", "no": "none", "off": "none"}.get(text, text)


_SPECIAL = {
    "test_fraction": _optional_fraction, "class_map": _class_map, "class_names": _class_names, "augment": _augment,
    "findings": _class_names, "views": _class_names,
}


def parse_class_map(values: Iterable[str] | Mapping[str, str] | None) -> dict[str, str]:
    """{OLD: NEW} from "OLD=NEW" strings (the repeatable flag) or a YAML mapping.

    >>> parse_class_map(["BACTERIA=PNEUMONIA", "VIRUS=PNEUMONIA"])
    {'BACTERIA': 'PNEUMONIA', 'VIRUS': 'PNEUMONIA'}
    """
    if values is None:
        return {}
    pairs = [(str(k), str(v)) for k, v in values.items()] if isinstance(values, Mapping) else []
    if not isinstance(values, Mapping):
        for value in [values] if isinstance(values, str) else values:
            old, sep, new = str(value).partition("=")
            if not sep:
                raise ConfigError(f"--class-map {shown(value)}: expected OLD=NEW, e.g. --class-map BACTERIA=PNEUMONIA")
            pairs.append((old, new))
    mapping: dict[str, str] = {}
    for old, new in ((o.strip(), n.strip()) for o, n in pairs):
        if not old or not new:
            raise ConfigError(f"--class-map {shown(f'{old}={new}')}: both the old and the new class name are needed")
        if mapping.get(old, new) != new:
            raise ConfigError(f"--class-map maps {shown(old)} twice ({shown(old)[1:-1]}={shown(mapping[old])[1:-1]}, "
                              f"{shown(old)[1:-1]}={shown(new)[1:-1]}); keep one")
        mapping[old] = new
    return mapping
