"""The typed results of :meth:`Model.evaluate <medtransfer.api.Model.evaluate>` and
:meth:`Model.explain <medtransfer.api.Model.explain>`; each shows itself in Jupyter."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medtransfer.api.display import metrics_rows, metrics_table, text_table
from medtransfer.api.inputs import require_pandas

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from PIL import Image

__all__ = ["Evaluation", "Explanation"]


@dataclass(frozen=True)
class Evaluation:
    """A saved model scored on a labelled set (what ``medtransfer evaluate`` writes to its folder).

    Attributes:
        out: The evaluation folder: metrics.json, predictions.csv, plots/, report.html.
        metrics: metrics.json's content. ``metrics["test"]`` holds the figures with CIs at the
            run's own threshold, ``metrics["shift"]`` the shift summary against the run's test
            split, ``metrics["ood"]`` (with an OOD guard) the share of images flagged as foreign.

    Example:
        >>> evaluation = medtransfer.load("runs/demo").evaluate("demo_data")  # doctest: +SKIP
        >>> evaluation.metrics["test"]["sensitivity"], evaluation.report  # doctest: +SKIP
        >>> evaluation.predictions.head()  # doctest: +SKIP
    """

    out: Path
    metrics: dict[str, Any]

    @property
    def report(self) -> Path:
        """The evaluation's report.html."""
        return self.out / "report.html"

    @property
    def predictions(self) -> pd.DataFrame:
        """predictions.csv as a DataFrame: one row per image (path, label, probabilities, prediction)."""
        return require_pandas("Evaluation.predictions").read_csv(self.out / "predictions.csv")

    def _notes(self) -> list[str]:
        notes = [f"{self.metrics.get('data')} ({self.metrics.get('split')} split) with the model of {self.metrics.get('run')}"]
        ood = self.metrics.get("ood")
        if ood:
            notes.append(f"OOD guard: {ood['flagged']} image(s) ({ood['flagged_fraction']:.1%}) do not look like the training data")
        notes.append(f"Report: {self.report}")
        return notes

    def _repr_html_(self) -> str:
        return metrics_table({"external": self.metrics.get("test")}, title=f"Evaluation {self.out}", notes=self._notes())

    def __repr__(self) -> str:
        header, rows = metrics_rows({"external": self.metrics.get("test")})
        return f"Evaluation({str(self.out)!r})\n" + text_table(header, rows) + "\n" + "\n".join(self._notes())


@dataclass(frozen=True, eq=False)
class Explanation:
    """A heatmap of one image: where the evidence for the explained class (or finding) lies.

    Unpacks as ``heatmap, overlay = model.explain(image)``; in Jupyter it shows the overlay.

    Attributes:
        heatmap: H x W float32 in [0, 1] at the model's input size (the image as the model saw
            it: resized and centre-cropped).
        overlay: The map over the image with its caption, a PIL image (``.save("x.png")``).
        image: The image as the model saw it, H x W uint8 grayscale.
        target: The class (single-label: the predicted one) or finding explained.
        probability: Its calibrated probability.
        caption: E.g. ``PNEUMONIA p=0.93 (threshold 0.41)``.
        method: ``cam``, ``gradcam``, ``gradcam++``, ``layercam`` or ``occlusion``.
        target_layer: The layer the map was read from (``input`` for occlusion).
        probabilities: ``{class or finding: probability}`` for the image.

    Example:
        >>> explanation = medtransfer.load("runs/demo").explain("demo_data/test/NORMAL/IM-0104-0001.png")  # doctest: +SKIP
        >>> explanation.caption  # doctest: +SKIP
        'PNEUMONIA p=0.61 (threshold 0.57)'
    """

    heatmap: np.ndarray
    overlay: Image.Image
    image: np.ndarray
    target: str
    probability: float
    caption: str
    method: str
    target_layer: str
    probabilities: dict[str, float] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.heatmap, self.overlay))

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.overlay.save(buffer, format="PNG")
        return buffer.getvalue()

    def __repr__(self) -> str:
        return f"Explanation({self.method}: {self.caption}; heatmap {self.heatmap.shape[0]} x {self.heatmap.shape[1]})"
