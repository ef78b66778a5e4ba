"""One domain exception hierarchy.

Library code raises these; only the CLI boundary turns them into a one-line message and
exit code 1 (and, later, the server into an HTTP 4xx). Messages name the file or option,
the value received, and what to do.
"""


class MedtransferError(Exception):
    """Base class for every error a user can fix by changing input or options."""


class DataError(MedtransferError):
    """Bad or missing images, folders, manifests or splits."""


class ConfigError(MedtransferError):
    """An option or config file value that is invalid or inconsistent."""


class WeightsError(MedtransferError):
    """Pretrained or saved weights that cannot be obtained or do not fit the model."""


class TrainingInterrupted(MedtransferError):
    """The user stopped training; the run directory holds the last full epoch and can be resumed."""

    def __init__(self, run_dir):
        super().__init__(f"training interrupted; continue it with: medtransfer train --resume {run_dir}")
        self.run_dir = run_dir


class MissingExtraError(ConfigError):
    """A command needs an optional part of the package (an extra) that is not installed."""


def missing_extra(what: str, extra: str) -> MissingExtraError:
    """The one message for a missing extra: what needs it and the install line that adds it.

    >>> str(missing_extra("medtransfer serve", "serve"))
    "medtransfer serve needs the [serve] extra: pip install 'medtransfer[serve]'"
    """
    return MissingExtraError(f"{what} needs the [{extra}] extra: pip install 'medtransfer[{extra}]'")
