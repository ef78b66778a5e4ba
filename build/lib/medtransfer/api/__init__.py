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
    Demo radiographs (generated, offline), a tiny run, then the model (about a minute on a CPU;
    the examples of the functions below continue from this one):

    >>> import medtransfer
    >>> from medtransfer.data.synthetic import generate_demo_dataset
    >>> _ = generate_demo_dataset("demo_data", patients_per_class=8, image_size=64)  # doctest: +SKIP
    >>> result = medtransfer.train("demo_data", "runs/demo", weights="none", image_size=48, epochs=2)  # doctest: +SKIP
    >>> model = result.load()  # doctest: +SKIP
    >>> model.predict("demo_data/test/PNEUMONIA").head()  # doctest: +SKIP
    >>> model.evaluate("demo_data", out="runs/demo-evaluation")  # doctest: +SKIP
    >>> heatmap, overlay = model.explain(model.predict("demo_data/test/PNEUMONIA").path[0])  # doctest: +SKIP
"""

from medtransfer.api.model import Model, Recalibration, load
from medtransfer.api.results import Evaluation, Explanation
from medtransfer.api.training import TrainedRun, train

__all__ = ["Evaluation", "Explanation", "Model", "Recalibration", "TrainedRun", "load", "train"]
