"""medtransfer: transfer learning for medical image classification.

The Python API, for notebooks and scripts, is two functions (:mod:`medtransfer.api`):

- :func:`medtransfer.train` ``(data, out, **settings)`` trains a run exactly as
  ``medtransfer train`` does and returns a :class:`~medtransfer.api.TrainedRun`;
- :func:`medtransfer.load` ``(run)`` opens a saved model as a :class:`~medtransfer.api.Model`
  with ``predict``, ``evaluate``, ``explain`` and ``recalibrate``.

Both are imported on first use, so ``import medtransfer`` stays fast: torch, Lightning and
pandas load only when a function runs.

Example:
    >>> import medtransfer
    >>> result = medtransfer.train("chest_xray", "runs/first", epochs=5)  # doctest: +SKIP
    >>> model = medtransfer.load("runs/first")  # doctest: +SKIP
    >>> model.predict(["xray.png"])  # doctest: +SKIP

``medtransfer.train`` is also the name of the training package (``medtransfer.train.pipeline``
and its siblings): the function answers attribute look-ups for the package, so both
``medtransfer.train(...)`` and ``import medtransfer.train.pipeline`` keep working.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.2.0"
__all__ = ["__version__", "load", "train"]


def _api() -> Any:
    # importlib rather than an import statement: the API (layer 7) is loaded on first use only,
    # and the lower layers that read __version__ from this module must not depend on it.
    return importlib.import_module("medtransfer.api")


class _TrainEntry:
    """``medtransfer.train``: calls :func:`medtransfer.api.train`; other attributes are the training package's."""

    __slots__ = ()
    __name__ = "train"
    __qualname__ = "train"

    def __call__(self, data: Any, out: Any, **settings: Any) -> Any:
        return _api().train(data, out, **settings)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]  # help() and IPython's ? show the API's docstring
        return _api().train.__doc__

    @property
    def __wrapped__(self) -> Any:  # inspect.signature follows it to the real signature
        return _api().train

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module("medtransfer.train"), name)

    def __dir__(self) -> list[str]:
        return sorted(set(dir(importlib.import_module("medtransfer.train"))) | {"__call__"})

    def __repr__(self) -> str:
        return "<function medtransfer.train (medtransfer.api.train); also the medtransfer.train package>"


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and isinstance(value, types.ModuleType):
            return  # importing medtransfer.train.* binds the package here; the entry answers for it instead
        super().__setattr__(name, value)


train = _TrainEntry()
sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name == "load":
        return _api().load
    raise AttributeError(f"module 'medtransfer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "load"})
