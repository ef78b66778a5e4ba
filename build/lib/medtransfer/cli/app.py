"""The Typer application and what every command shares: consoles, defaults, Lightning's log level.

Commands live in :mod:`medtransfer.cli.train_command` and :mod:`medtransfer.cli.commands`;
:func:`medtransfer.cli.main` turns domain errors into one line and exit code 1.
"""

from __future__ import annotations

import logging

import typer
from rich.console import Console

from medtransfer.config import TrainConfig

app = typer.Typer(
    help="Transfer learning for medical image classification: train, evaluate, predict, explain.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
error_console = Console(stderr=True)
DEFAULTS = TrainConfig()  # the one source of default values, also for `split`, `cache` and `evaluate`
TTA_OVERRIDE = "Override the saved test-time augmentation: none, crops or flip (the saved threshold was chosen with the saved one)."


def _quiet_lightning() -> None:
    """Lightning (configured on import) logs a hardware summary and product tips at INFO;
    medtransfer prints what matters itself. Call after Lightning is imported."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


