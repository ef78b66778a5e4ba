"""``medtransfer.train``: one training run from Python, as ``medtransfer train`` runs it.

The settings are :class:`~medtransfer.config.TrainConfig`'s fields, checked as the command's
flags are (an unknown one is refused with the closest name); the run is
:func:`medtransfer.train.seed_ensemble.train_run` (one run, or a seed ensemble with
``ensemble=N``), and its result is read back from the run folder's metrics.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medtransfer.api.display import metrics_rows, metrics_table, text_table
from medtransfer.api.inputs import data_path

if TYPE_CHECKING:
    from medtransfer.api.model import Model

__all__ = ["TrainedRun", "train"]

SOURCE = "medtransfer.train()"


@dataclass(frozen=True)
class TrainedRun:
    """A finished training run: its folder and its metrics.json.

    In Jupyter it shows as a table of the validation and test figures (AUC with its 95%
    patient-bootstrap interval, accuracy, sensitivity and specificity at the threshold chosen
    on validation); a multi-label run shows one row per split and finding.

    Attributes:
        run: The run folder (config.yaml, split.csv, metrics.json, report.html, model/, ...).
        metrics: metrics.json's content, as written.
        data: The data the run read: the folder or file given, or the CSV manifest written
            for a DataFrame.

    Example:
        The run of :func:`train`'s example, read again later:

        >>> result = TrainedRun.read("runs/demo")  # doctest: +SKIP
        >>> result.metrics["test"]["auc"], result.report  # doctest: +SKIP
    """

    run: Path
    metrics: dict[str, Any]
    data: str

    @classmethod
    def read(cls, run: str | Path, data: str | None = None) -> TrainedRun:
        """The result of a finished run folder (written by ``medtransfer train`` or :func:`train`).

        Raises:
            DataError: the folder has no metrics.json (not a run, or not finished).
        """
        from medtransfer.errors import DataError
        from medtransfer.rundir import METRICS_FILE, RunDir

        folder = Path(run)
        if not (folder / METRICS_FILE).is_file():
            raise DataError(f"{folder}: no {METRICS_FILE}; pass a finished run folder (written by medtransfer train)")
        metrics = json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))
        config = RunDir(folder).config() or {}
        return cls(run=folder, metrics=metrics, data=data or str(config.get("data", "")))

    @property
    def report(self) -> Path:
        """The run's report.html (open it in a browser: it is one self-contained file)."""
        return self.run / "report.html"

    @property
    def task(self) -> str:
        """``single-label`` or ``multi-label``."""
        return self.metrics.get("task") or "single-label"

    @property
    def val(self) -> dict[str, Any] | None:
        """The validation block of metrics.json."""
        return self.metrics.get("val")

    @property
    def test(self) -> dict[str, Any] | None:
        """The test block of metrics.json (None when the data had no test split)."""
        return self.metrics.get("test")

    def load(self) -> Model:
        """The run's saved model (:func:`medtransfer.load` on :attr:`run`)."""
        from medtransfer.api.model import load

        return load(self.run)

    def _splits(self) -> dict[str, Any]:
        return {"val": self.val, "test": self.test}

    def _notes(self) -> list[str]:
        m = self.metrics
        what = f"{m.get('backbone')} ({m.get('weights')}), {m.get('strategy')}, {m.get('epochs_run')} epoch(s)"
        threshold = "" if self.task == "multi-label" else f"; threshold {m.get('threshold_policy')} on validation"
        return [what + threshold, f"Report: {self.report}"]

    def _repr_html_(self) -> str:
        return metrics_table(self._splits(), title=f"Run {self.run}", notes=self._notes())

    def __repr__(self) -> str:
        header, rows = metrics_rows(self._splits())
        return f"TrainedRun({str(self.run)!r})\n" + text_table(header, rows) + "\n" + "\n".join(self._notes())


def train(data: Any, out: str | Path, *, quiet: bool = False, **settings: Any) -> TrainedRun:
    """Train and evaluate a classifier into the new run folder ``out``, as ``medtransfer train`` does.

    Patient-level splits with a leakage check, the decode-once cache, training with early
    stopping, temperature and threshold chosen on validation, validation and test metrics
    with patient-bootstrap CIs, plots, report.html and the saved model: the command's run,
    from Python.

    Args:
        data: A folder (``DIR/{train,val,test}/CLASS/*`` or ``DIR/CLASS/*``), a CSV manifest or a
            MedMNIST ``.npz`` path; or a pandas DataFrame with columns ``path``, ``label``
            and optionally ``patient_id`` and ``split`` (``train``/``val``/``test``); multi-label:
            a ``labels`` column of ``|``-joined findings (or lists of them), or one column per
            finding. A DataFrame is written once as a CSV manifest under the cache folder
            (``<cache_dir>/manifests/``, named by its content; relative image paths are taken
            from the working directory), since the run folder must be empty when training starts.
        out: A new (or empty) folder for the run.
        quiet: Print nothing (the console otherwise shows the split, leakage check, epochs and
            results, as the command does).
        **settings: Any :class:`~medtransfer.config.TrainConfig` field, e.g. ``backbone="resnet18"``,
            ``epochs=10``, ``strategy="lp-ft"``, ``threshold="sensitivity:0.95"``, ``ensemble=3``
            (docs: guide/training-options). ``cache_dir`` defaults to ``$MEDTRANSFER_CACHE``, else
            ``~/.cache/medtransfer``, as for the command.

    Returns:
        The finished run (:class:`TrainedRun`): ``.metrics`` (metrics.json), ``.run``, ``.report``.

    Raises:
        ConfigError: An unknown setting (``unknown setting 'epoch'; did you mean 'epochs'?``), a bad
            value, or a run folder that is not new.
        DataError: Data that cannot be read or split (the message names the file and the fix).

    Example:
        A tiny run on generated demo radiographs (offline, about a minute on a laptop CPU):

        >>> import medtransfer
        >>> from medtransfer.data.synthetic import generate_demo_dataset
        >>> _ = generate_demo_dataset("demo_data", patients_per_class=8, image_size=64)  # doctest: +SKIP
        >>> result = medtransfer.train("demo_data", "runs/demo", weights="none", image_size=48, epochs=2)  # doctest: +SKIP
        >>> result  # a table of val/test AUC with CIs, accuracy, sensitivity, specificity  # doctest: +SKIP
        >>> result.metrics["test"]["auc"] == result.test["auc"]  # doctest: +SKIP
        True
    """
    from rich.console import Console

    from medtransfer.config import TrainConfig, default_cache_dir
    from medtransfer.train.seed_ensemble import train_run

    config = TrainConfig.from_dict({**settings, "data": ""}, source=SOURCE)  # every setting checked before any file is written
    if config.cache_dir is None:
        config.cache_dir = str(default_cache_dir())
    config = dataclasses.replace(config, data=data_path(data, cache_dir=config.cache_dir, what=f"{SOURCE} data"))
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # as the command: medtransfer prints what matters
    out = Path(out)
    train_run(config, out, resume=False, console=Console(quiet=quiet))
    return TrainedRun.read(out, data=config.data)
