"""`medtransfer train`: every training setting as a flag (defaults < --config YAML < flags).

The flags are generated from :class:`~medtransfer.config.TrainConfig`'s fields (name, type, help,
spelling from each setting's definition), so a new setting is one field and nothing here.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, List, Optional

import typer

from medtransfer.cli.app import _quiet_lightning, app, console
from medtransfer.config import TrainConfig, flag_name, parse_set_values, resolve_train_config


_COMMAND_OPTIONS = [  # the command's own options (not settings, so not in config.yaml)
    ("out", Optional[Path], typer.Option(None, help="New run folder to write.")),
    ("config", Optional[Path], typer.Option(None, help="YAML file of settings (flags override it).")),
    ("resume", Optional[Path], typer.Option(None, help="Continue the interrupted run in this folder.")),
]
_SET = ("set_values", Optional[List[str]], typer.Option(None, "--set", help="Any other setting as KEY=VALUE (repeatable)."))

# A setting's annotation -> the flag's type: lists are comma-separated text, the class map a repeatable OLD=NEW.
_FLAG_TYPES: dict[str, Any] = {
    "str": str, "int": int, "float": float, "bool": bool, "str | None": str, "float | None": float,
    "list[str] | None": str, "tuple[float, float]": str, "dict[str, str]": List[str],
}


def _setting_option(field: dataclasses.Field, help_text: str) -> tuple[str, Any, Any]:
    """(name, type, typer.Option) of one setting's flag: help and spelling from its definition; default None
    ("not given": the YAML's or the default value stays)."""
    meta = field.metadata["setting"]
    kind = Path if meta.path else _FLAG_TYPES[str(field.type)]
    declarations = list(meta.flags or [flag_name(field.name)])
    if kind is bool:  # a switch: --name turns on; a setting that is on by default can also be turned off
        declarations = [d + "/--no-" + d[2:] if field.default is True else d for d in declarations]
    return field.name, Optional[kind], typer.Option(None, *declarations, help=help_text)


def _train_options() -> list[tuple[str, Any, Any]]:
    descriptions = TrainConfig.descriptions()
    settings = [_setting_option(f, descriptions[f.name]) for f in dataclasses.fields(TrainConfig)]
    return settings[:1] + _COMMAND_OPTIONS + settings[1:] + [_SET]


def train(**options: Any) -> None:
    """Train a classifier with a patient-level validation split and evaluate the best-on-validation model."""
    out, config, resume, set_values = (options.pop(k) for k in ("out", "config", "resume", "set_values"))
    options["class_map"] = options.get("class_map") or None  # not given: the YAML's map stays
    from medtransfer.train.seed_ensemble import train_run

    settings, run_dir = resolve_train_config(
        out=out, resume=resume, config_file=config, overrides={**options, **parse_set_values(set_values)}
    )
    _quiet_lightning()
    result = train_run(settings, run_dir, resume=resume is not None, console=console)
    if result is None:  # a DDP process other than rank 0: rank 0 prints
        return
    print_result({k: result.get(k) for k in ("val", "oof", "test") if k in result}, result["threshold"])


# Typer reads a command's options from its signature: here, one keyword parameter per setting.
_OPTIONS = _train_options()
train.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind) for name, kind, option in _OPTIONS])
train.__annotations__ = {name: kind for name, kind, _ in _OPTIONS} | {"return": None}
app.command("train")(train)


def print_result(splits: dict[str, dict | None], threshold: float | None) -> None:
    for split, block in splits.items():
        if not block:
            continue
        ci = block.get("auc_ci")
        if block.get("task") == "multi-label":  # the headline is macro AUC; each finding has its own threshold
            _print_findings(split, block)
            continue
        auc = f"{block['auc']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        console.print(
            f"{split:4s}: AUC {auc}  accuracy {block['accuracy']:.3f}  sensitivity {block['sensitivity']:.3f}  "
            f"specificity {block['specificity']:.3f}  (threshold {threshold:.3f})"
        )




def _print_findings(split: str, block: dict) -> None:
    ci = block.get("macro_auc_ci")
    macro = f"{block['macro_auc']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") if "macro_auc" in block else "n/a"
    console.print(f"{split:4s}: macro AUC {macro}  micro AUC {block.get('micro_auc', float('nan')):.3f}  ({len(block['findings'])} findings)")
    for finding, entry in block["findings"].items():
        if "auc" not in entry:
            console.print(f"      {finding}: no AUC ({entry['n_positive']} positive of {entry['n_known']} known)")
            continue
        console.print(
            f"      {finding}: AUC {entry['auc']:.3f}  sensitivity {entry['sensitivity']:.3f}  "
            f"specificity {entry['specificity']:.3f}  (threshold {entry['threshold']:.3f}, prevalence {entry['prevalence']:.3f})"
        )


def flag_descriptions() -> dict[str, str]:
    """Each `train` flag's help text by parameter name, read back from the generated command."""
    import typer.main

    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    return {param.name: param.help for param in command.params if getattr(param, "help", None)}
