"""What one training setting is, written once beside its field: help, CLI names, check, resume rule, when it is read.

:func:`setting` wraps :func:`dataclasses.field` and stores a :class:`Setting` in the field's metadata.
From these the package derives, without a second list anywhere: the `train` flags and their help
(:mod:`medtransfer.cli.train_command`), the per-value checks and their messages
(:meth:`TrainConfig.validate`), the settings a resumed run may change, the refusal of a changed
setting that the chosen training path would not read (:func:`~medtransfer.config.rules.ignored_settings`)
and the JSON Schema for editors (:mod:`medtransfer.config.schema`).

A dataclass with field metadata rather than pydantic or jsonargparse: TrainConfig stays a plain,
typed, dependency-free object that every layer (and mypy) already uses, its YAML coercion keeps
the project's one-line error messages, and the CLI keeps Typer with every flag name it had.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["RESUME_ANY", "RESUME_EFFECTIVE_BATCH", "Setting", "flag_name", "setting", "shown_default"]

RESUME_ANY = "any"  # a resumed run may change it: it does not change what the run computes
RESUME_EFFECTIVE_BATCH = "effective-batch"  # may change on resume together with its partner, keeping their product


@dataclass(frozen=True)
class Setting:
    """A training setting's description; ``help`` may say ``{default}``, filled in from the field's default."""

    help: str
    flags: tuple[str, ...] = ()  # CLI names; default: --name-with-dashes (a true default adds --no-name)
    check: Callable[[Any], bool] | None = None  # the value alone is acceptable
    expected: str = ""  # completes "expected ..." when check fails
    choices: tuple[str, ...] = ()  # a fixed set of values (checked here, an enum in the schema)
    resume: str = ""  # RESUME_ANY, RESUME_EFFECTIVE_BATCH or "" (fixed for the run's life)
    read_when: tuple[str, ...] = ()  # conditions (config.rules.CONDITIONS) under which a changed value is read
    path: bool = False  # a file or folder (the flag's type)

    def accepts(self, value: Any) -> bool:
        if self.choices:
            values = value if isinstance(value, (list, tuple)) else [value]
            if value is not None and not set(values) <= set(self.choices):
                return False
        return self.check is None or bool(self.check(value))

    def expectation(self) -> str:
        if self.expected or len(self.choices) < 2:
            return self.expected or "".join(self.choices)
        return ", ".join(self.choices[:-1]) + " or " + self.choices[-1]

    def help_text(self, default: Any) -> str:
        return self.help.replace("{default}", shown_default(default))


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            **described: Any) -> Any:
    """A TrainConfig field: its default (or `factory` for a mutable one) and its :class:`Setting`."""
    metadata = {"setting": Setting(help=help, **described)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(name: str) -> str:
    """The command-line spelling of a setting: ``label_smoothing`` -> ``--label-smoothing``."""
    return "--" + name.replace("_", "-")


def shown_default(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
