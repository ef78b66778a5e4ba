"""Typer commands only; each forwards to a plain function.

Domain errors (MedtransferError) become one line on stderr and exit code 1 here, and only
here. Configuration precedence: defaults < --config YAML < command-line flags.
"""

from __future__ import annotations

import sys

from medtransfer.cli import commands, train_command  # noqa: F401  (registers the commands on app)
from medtransfer.cli.app import app, error_console
from medtransfer.errors import MedtransferError


def main() -> None:
    try:
        app()
    except MedtransferError as exc:
        error_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        error_console.print("interrupted", markup=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
