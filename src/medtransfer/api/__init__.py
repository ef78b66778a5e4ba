"""The Python API: train, load, predict, evaluate, explain and recalibrate from a notebook.

Two entry points, also exported as ``medtransfer.train`` and ``medtransfer.load``:

- :func:`train` ``(data, out, **settings)`` -> :class:`TrainedRun`: a training run exactly as
  ``medtransfer train`` runs it (``data`` may be a folder, CSV, ``.npz`` or a pandas DataFrame;
  ``settings`` are :class:`~medtransfer.config.TrainConfig` fields);
- :func:`load` ``(run)`` -> :class:`Model`: a saved model, with :meth:`Model.predict` (a
  DataFrame of probabilities and decisions), :meth:`Model.evaluate` (:class:`Evaluation`),
  :meth:`Model.explain` (:class:`Explanation`: a heatmap and its overlay) and
  :meth:`Model.recalibrate` (:class:`Recalibration`).

Every result shows itself as a table in Jupyter (``_repr_html_``) and keeps the folder its
command would have written (``.run`` / ``.out``, ``.report``), so the API and the command line
produce and read the same run folders. Importing this package is cheap: torch, Lightning and
pandas load when a function runs.

Example:
    >>> import medtransfer
    >>> result = medtransfer.train("chest_xray", "runs/first", epochs=5)  # doctest: +SKIP
    >>> model = result.load()  # doctest: +SKIP
    >>> model.predict("chest_xray/test/PNEUMONIA").head()  # doctest: +SKIP
    >>> model.evaluate("other_hospital/", out="runs/first-external")  # doctest: +SKIP
    >>> heatmap, overlay = model.explain("chest_xray/test/PNEUMONIA/person1_virus_6.jpeg")  # doctest: +SKIP
"""

from medtransfer.api.model import Model, Recalibration, load
from medtransfer.api.results import Evaluation, Explanation
from medtransfer.api.training import TrainedRun, train

__all__ = ["Evaluation", "Explanation", "Model", "Recalibration", "TrainedRun", "load", "train"]
