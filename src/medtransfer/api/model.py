"""``medtransfer.load``: a saved model for notebooks, with predict, evaluate, explain and recalibrate.

Each method is the command of the same name from Python and calls the function that command
calls: ``predict`` :func:`medtransfer.predict.predict_files` (and, for images in memory, the
same preprocessing, network and decision), ``evaluate``
:func:`medtransfer.evaluation.external.evaluate_saved_model`, ``recalibrate``
:func:`medtransfer.evaluation.recalibrate.recalibrate_model`, ``explain`` the class activation
maps of :mod:`medtransfer.explain` with the captions of :mod:`medtransfer.explain.render`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medtransfer.api.display import model_rows, recalibration_rows, text_table
from medtransfer.api.inputs import data_path, image_items, require_pandas, to_source
from medtransfer.api.results import Evaluation, Explanation

if TYPE_CHECKING:
    import pandas as pd

    from medtransfer.artifacts import SavedModel

__all__ = ["Model", "Recalibration", "load"]


def load(run: Any) -> Model:
    """Open a saved model: a run folder, its ``model/`` folder, or a :class:`~medtransfer.api.TrainedRun`.

    Loading never unpickles (safetensors weights and a checked model.json); the model carries
    its preprocessing, temperature, threshold(s), test-time augmentation, ensemble members and
    OOD guard.

    Args:
        run: The folder ``medtransfer train`` (or :func:`medtransfer.train`, ``recalibrate``,
            ``ensemble``) wrote, or its ``model/`` folder, or a ``TrainedRun``.

    Returns:
        A :class:`Model`.

    Raises:
        WeightsError: No saved model in the folder, or a model.json that does not check.

    Example:
        The run of :func:`medtransfer.train`'s example:

        >>> import medtransfer
        >>> model = medtransfer.load("runs/demo")  # doctest: +SKIP
        >>> model.classes  # doctest: +SKIP
        ['NORMAL', 'PNEUMONIA']
    """
    from medtransfer.artifacts import load_model

    folder = Path(getattr(run, "run", run))
    return Model(load_model(folder), folder)


class Model:
    """A saved model: predict, evaluate, explain and recalibrate from Python.

    Attributes:
        saved: The underlying :class:`~medtransfer.artifacts.SavedModel` (preprocess, network, decide).
        run: The folder it was loaded from.

    Example:
        >>> import medtransfer
        >>> model = medtransfer.load("runs/demo")  # doctest: +SKIP
        >>> model  # in Jupyter a table: backbone, task, classes, threshold, TTA, members, OOD guard  # doctest: +SKIP
    """

    def __init__(self, saved: SavedModel, run: str | Path):
        self.saved = saved
        self.run = Path(run)

    @property
    def classes(self) -> list[str]:
        """The class names (single-label) or findings (multi-label), in output order."""
        return list(self.saved.classes)

    @property
    def task(self) -> str:
        """``single-label`` or ``multi-label``."""
        return self.saved.info.task

    # ------------------------------------------------------------------ predict

    def predict(
        self, images: Any, *, batch_size: int = 32, accelerator: str = "auto", skip_bad_images: bool = False,
        tta: str | None = None,
    ) -> pd.DataFrame:
        """Calibrated probabilities and decisions at the saved operating point, one row per image.

        Args:
            images: One image or a list: file paths or folders (their images, sorted), encoded
                bytes (PNG, JPEG, DICOM, ...), numpy arrays (uint8 H x W or H x W x 3, uint16
                H x W; a 4-D array is a batch), PIL images; or a DataFrame with a ``path`` column.
            batch_size: Images per forward pass.
            accelerator: ``auto``, ``cpu`` or ``gpu``.
            skip_bad_images: Leave unreadable images out instead of raising.
            tta: Override the saved test-time augmentation (``none``, ``crops``, ``flip``); the
                saved threshold was chosen with the saved one.

        Returns:
            A DataFrame in input order with ``path`` (None for images given in memory), then
            ``prob_<class>`` per class and ``pred`` (single-label), or ``prob_<finding>``,
            ``pred_<finding>`` (0/1) and ``findings`` (those called, ``|``-joined, most probable
            first) (multi-label); plus ``ood_score`` and ``ood`` (``in``/``out``) when the model
            has an OOD guard. For file paths these are the rows ``medtransfer predict --csv`` writes.

        Raises:
            DataError: A missing or unreadable image (unless ``skip_bad_images``).

        Example:
            >>> from PIL import Image
            >>> model = medtransfer.load("runs/demo")  # doctest: +SKIP
            >>> table = model.predict("demo_data/test")  # every image of the folder  # doctest: +SKIP
            >>> table[["path", "prob_PNEUMONIA", "pred"]].head()  # doctest: +SKIP
            >>> bool(model.predict(Image.open(table.path[0])).prob_PNEUMONIA[0] == table.prob_PNEUMONIA[0])  # doctest: +SKIP
            True
        """
        from medtransfer.predict import predict_files

        pd = require_pandas("Model.predict")

        saved = self.saved.with_tta(tta)
        items, all_files = image_items(images)
        if all_files:  # exactly what `medtransfer predict` computes for these files
            rows = predict_files(saved, items, batch_size=batch_size, accelerator=accelerator, skip_bad=skip_bad_images)
        else:
            rows = _predict_in_memory(saved, items, batch_size=batch_size, accelerator=accelerator, skip_bad=skip_bad_images)
        return pd.DataFrame(rows, columns=_columns(saved))

    # ------------------------------------------------------------------ evaluate

    def evaluate(
        self, data: Any, *, out: str | Path | None = None, split: str = "test", bootstrap: int = 2000, seed: int = 0,
        cache_dir: str | Path | None = None, skip_bad_images: bool = False, accelerator: str = "auto",
        tta: str | None = None, quiet: bool = False,
    ) -> Evaluation:
        """Score the model on a labelled set (an external test set) at its saved operating point.

        The command ``medtransfer evaluate``: metrics with patient-bootstrap CIs, predictions,
        plots, the shift summary against the run's own test split, the OOD guard's share of
        foreign images, and report.html, in a new folder. The run is only read.

        Args:
            data: A folder, CSV manifest or ``.npz`` (the run's class map applies), or a DataFrame
                with ``path``, ``label`` (multi-label ``labels``) and optionally ``patient_id``, ``split``.
            out: A new folder for the results (default: a new temporary folder).
            split: Which split of ``data`` to score, when it has splits.
            bootstrap: Patient-bootstrap resamples for the 95% CIs (0: none).
            seed: Bootstrap seed.
            cache_dir: Decoded-image cache (default ``$MEDTRANSFER_CACHE``, else ``~/.cache/medtransfer``).
            skip_bad_images: Leave unreadable images out.
            accelerator: ``auto``, ``cpu`` or ``gpu``.
            tta: Override the saved test-time augmentation.
            quiet: Print nothing.

        Returns:
            An :class:`~medtransfer.api.Evaluation` (``.metrics``, ``.out``, ``.report``, ``.predictions``).

        Example:
            >>> model = medtransfer.load("runs/demo")  # doctest: +SKIP
            >>> evaluation = model.evaluate("demo_data", out="runs/demo-evaluation", bootstrap=200)  # doctest: +SKIP
            >>> evaluation.metrics["test"]["auc"], evaluation.report  # doctest: +SKIP
        """
        from rich.console import Console

        from medtransfer.config import default_cache_dir
        from medtransfer.evaluation.external import evaluate_saved_model

        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="medtransfer-evaluation-"))
        source = Path(data_path(data, cache_dir=cache, what="Model.evaluate(data)"))
        metrics = evaluate_saved_model(
            self.run, source, folder, split=split, cache_dir=cache, bootstrap=bootstrap, seed=seed,
            skip_bad=skip_bad_images, accelerator=accelerator, console=Console(quiet=quiet), tta=tta,
        )
        return Evaluation(out=folder, metrics=metrics)

    # ------------------------------------------------------------------ recalibrate

    def recalibrate(
        self, data: Any, out: str | Path, *, fit_fraction: float = 0.5, split: str = "test", bootstrap: int = 2000,
        seed: int = 0, cache_dir: str | Path | None = None, skip_bad_images: bool = False, accelerator: str = "auto",
        quiet: bool = False,
    ) -> Recalibration:
        """Refit temperature and threshold (the run's policy) on part of a local labelled set.

        The command ``medtransfer recalibrate``: the local patients are split (stratified,
        seeded) into a part that refits and a part that only reports before/after; the weights
        stay as they are. The new model folder loads with :func:`medtransfer.load`.

        Args:
            data: The local labelled set: a folder, CSV manifest, ``.npz`` or DataFrame.
            out: A new folder for the recalibrated model and its report.
            fit_fraction: Share of the local patients that refits (the rest reports).
            split: Which split of ``data`` to use, when it has splits.
            bootstrap: Patient-bootstrap resamples for the 95% CIs.
            seed: Seed of the fit/report split and the bootstrap.
            cache_dir: Decoded-image cache (default as for :meth:`evaluate`).
            skip_bad_images: Leave unreadable images out.
            accelerator: ``auto``, ``cpu`` or ``gpu``.
            quiet: Print nothing.

        Returns:
            A :class:`~medtransfer.api.Recalibration` (before/after table; ``.model`` loads the new model).

        Example:
            >>> model = medtransfer.load("runs/demo")  # doctest: +SKIP
            >>> recalibrated = model.recalibrate("demo_data", "runs/demo-local", bootstrap=200)  # doctest: +SKIP
            >>> recalibrated  # before/after table  # doctest: +SKIP
            >>> recalibrated.model.predict("demo_data/test/NORMAL")  # doctest: +SKIP
        """
        from rich.console import Console

        from medtransfer.config import default_cache_dir
        from medtransfer.evaluation.recalibrate import recalibrate_model

        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        source = Path(data_path(data, cache_dir=cache, what="Model.recalibrate(data)"))
        metrics = recalibrate_model(
            self.run, source, Path(out), fit_fraction=fit_fraction, seed=seed, split=split, cache_dir=cache,
            bootstrap=bootstrap, skip_bad=skip_bad_images, accelerator=accelerator, progress=not quiet,
            console=Console(quiet=quiet),
        )
        return Recalibration(out=Path(out), metrics=metrics)

    # ------------------------------------------------------------------ explain

    def explain(self, image: Any, method: str | None = None, finding: str | None = None, *,
                target_layer: str | None = None) -> Explanation:
        """A heatmap of where the evidence for the decision lies in one image.

        As ``medtransfer explain``: the image is prepared as prediction prepares it; a
        single-label model is explained for its predicted class (at the saved threshold), a
        multi-label model for ``finding``, or by default for its top finding (the one furthest
        above its threshold, or closest below it when none reaches it). A seed ensemble or TTA
        decides with every member and view; the map is the first member's.

        Args:
            image: A file path, encoded bytes, a numpy array or a PIL image.
            method: ``cam``, ``gradcam``, ``gradcam++``, ``layercam`` or ``occlusion`` (default:
                the run's ``cam_method``, Grad-CAM unless set).
            finding: Multi-label models: the finding to explain.
            target_layer: The layer to read the map from (default: the method's).

        Returns:
            An :class:`~medtransfer.api.Explanation`; ``heatmap, overlay = model.explain(x)``
            gives the H x W float map in [0, 1] and the captioned overlay (a PIL image).

        Raises:
            ConfigError: An unknown method or finding, or ``finding`` for a single-label model.

        Example:
            >>> from pathlib import Path
            >>> model = medtransfer.load("runs/demo")  # doctest: +SKIP
            >>> image = sorted(Path("demo_data/test/PNEUMONIA").glob("*.png"))[0]
            >>> heatmap, overlay = model.explain(image, method="layercam")  # doctest: +SKIP
            >>> heatmap.shape  # the model's input size  # doctest: +SKIP
            (48, 48)
            >>> overlay.save("heatmap.png")  # doctest: +SKIP
        """
        import numpy as np
        import torch

        from medtransfer.errors import ConfigError
        from medtransfer.explain.cam import ClassActivationMap
        from medtransfer.explain.files import check_findings
        from medtransfer.explain.layers import eval_mode
        from medtransfer.explain.render import finding_caption, gray_from_pixels, overlay_picture, prediction_caption

        saved = self.saved
        method = method or saved.cam_method
        items, _ = image_items(image)
        if len(items) != 1:
            raise ConfigError(f"Model.explain: explains one image; got {len(items)} (call it once per image)")
        pixels = saved.crop(saved.decode(to_source(items[0])))
        parameter = next(saved.model.parameters())
        batch = saved.normalise(pixels)[None].to(device=parameter.device, dtype=parameter.dtype)
        network = saved.network
        with eval_mode(network), torch.no_grad():
            decision = saved.decide(network(batch))
        probabilities = decision.probabilities[0]
        classes = self.classes
        multilabel = saved.task.multilabel
        if multilabel:
            thresholds = np.asarray(saved.info.thresholds, dtype=np.float64)
            k = check_findings(classes, [finding])[0] if finding else int(np.argmax(probabilities - thresholds))
            caption = finding_caption(classes[k], probabilities[k], thresholds[k])
        else:
            if finding:
                raise ConfigError(f"Model.explain(finding={finding!r}): finding is for multi-label models; this model is "
                                  f"single-label (classes {', '.join(classes)}) and explains its predicted class")
            k = int(decision.predicted[0])
            assert saved.threshold is not None, "a saved single-label model has a threshold (checked on load)"
            caption = prediction_caption(classes, probabilities, k, positive_index=saved.positive_index,
                                         threshold=saved.threshold)
        with ClassActivationMap(saved.model, target_layer=target_layer, method=method, multilabel=multilabel) as cam:
            result = cam(batch, class_index=[k])
        heatmap = result.maps[0].detach().cpu().numpy().astype(np.float32)
        shown = gray_from_pixels(pixels)
        return Explanation(
            heatmap=heatmap, overlay=overlay_picture(shown, heatmap, caption), image=shown, target=classes[k],
            probability=float(probabilities[k]), caption=caption, method=method, target_layer=result.target_layer,
            probabilities={c: float(p) for c, p in zip(classes, probabilities)},
        )

    # ------------------------------------------------------------------ display

    def _rows(self) -> list[list[str]]:
        return model_rows(self.saved, str(self.run))

    def _repr_html_(self) -> str:
        from medtransfer.evaluation.html import table

        return "<div><strong>medtransfer model</strong>" + table(None, self._rows()) + "</div>"

    def __repr__(self) -> str:
        return "Model\n" + text_table(["field", "value"], self._rows())


def _columns(saved: SavedModel) -> list[str]:
    """The prediction columns, in the order ``medtransfer predict --csv`` writes them (also for zero rows)."""
    columns = ["path", *(f"prob_{c}" for c in saved.classes)]
    columns += [*(f"pred_{c}" for c in saved.classes), "findings"] if saved.task.multilabel else ["pred"]
    return columns + (["ood_score", "ood"] if saved.ood is not None else [])


def _predict_in_memory(saved: SavedModel, items: list[Any], *, batch_size: int, accelerator: str,
                       skip_bad: bool) -> list[dict]:
    """predict_files' rows for images given as bytes, arrays or PIL images (and paths among them):
    the same preprocessing (:meth:`SavedModel.preprocess`), network and decision, batch by batch."""
    import torch

    from medtransfer.errors import ConfigError, DataError
    from medtransfer.predict import Classifier, decision_row

    if batch_size < 1:
        raise ConfigError(f"batch_size: got {batch_size}; use 1 or more")
    classifier = Classifier.on(saved, accelerator=accelerator)
    rows: list[dict] = []
    for start in range(0, len(items), batch_size):
        names, tensors = [], []
        for item in items[start : start + batch_size]:
            source = to_source(item)
            try:
                tensors.append(saved.preprocess(source))
            except DataError:
                if not skip_bad:
                    raise
                continue
            names.append(str(source) if isinstance(source, Path) else None)
        if not tensors:
            continue
        decision, scores = classifier.scored(torch.stack(tensors))
        rows += [decision_row(saved, name, decision, i, scores) for i, name in enumerate(names)]
    return rows


@dataclass(frozen=True)
class Recalibration:
    """A model whose temperature and threshold were refitted on part of a local labelled set.

    The weights are unchanged; the figures before and after are measured on the patients the
    refit never saw (``medtransfer recalibrate``; :mod:`medtransfer.evaluation.recalibrate`).

    Attributes:
        out: The new model folder (model/, metrics.json, predictions_test.csv, report.html).
        metrics: Its metrics.json; ``metrics["recalibration"]`` holds ``before`` and ``after``.

    Example:
        >>> recalibrated = medtransfer.load("runs/demo").recalibrate("demo_data", "runs/demo-recalibrated")  # doctest: +SKIP
        >>> after = recalibrated.metrics["recalibration"]["after"]  # doctest: +SKIP
    """

    out: Path
    metrics: dict[str, Any]

    @property
    def report(self) -> Path:
        """The recalibration's report.html."""
        return self.out / "report.html"

    @property
    def model(self) -> Model:
        """The recalibrated model (:func:`medtransfer.load` on :attr:`out`)."""
        return load(self.out)

    def _repr_html_(self) -> str:
        from medtransfer.evaluation.html import escape, table

        r = self.metrics["recalibration"]
        caption = (f"Fitted on {r['fit_images']} images ({r['fit_patients']} patients), reported on "
                   f"{r['report_images']} images ({r['report_patients']} patients) the fit never saw")
        return (f"<div><strong>Recalibration {escape(self.out)}</strong>"
                + table(["", "Before (as trained)", "After (recalibrated)"], recalibration_rows(self.metrics))
                + f"<p>{escape(caption)}</p><p>Report: {escape(self.report)}</p></div>")

    def __repr__(self) -> str:
        return f"Recalibration({str(self.out)!r})\n" + text_table(["", "before", "after"], recalibration_rows(self.metrics))
