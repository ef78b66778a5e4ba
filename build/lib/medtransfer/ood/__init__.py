"""Out-of-distribution guard: how foreign an image looks to the model's own backbone.

At the end of training a detector is fitted on the training split's features and its
threshold set on validation so that 95% of in-distribution validation images are accepted:
:mod:`~medtransfer.ood.scores` (the arithmetic), :mod:`~medtransfer.ood.detector` (the fitted
scores, ``multilayer`` by default), :mod:`~medtransfer.ood.capture` (the features captured on
the classifier's own forward pass, :class:`ScoredModel`) and :mod:`~medtransfer.ood.files`
(model/ood.safetensors + model/ood.json, no pickle).

    >>> layers = pick_layers(model, candidates, image_size=224)                     # doctest: +SKIP
    >>> train = collect_features(model, loader, layers, device=cpu, precision="32-true")  # doctest: +SKIP
    >>> detector = fit_detector(train, labels, val, layers=layers)                  # doctest: +SKIP
    >>> logits, ood_score = ScoredModel(model, detector)(images)                    # doctest: +SKIP
"""

from medtransfer.ood.capture import LogitsAndScore, ScoredModel, capture, collect_features, pick_layers
from medtransfer.ood.detector import (
    ACCEPT_FRACTION, DEFAULT_METHOD, METHODS, PENULTIMATE, PENULTIMATE_METHODS, OODDetector, fit_detector,
)
from medtransfer.ood.files import FORMAT_VERSION, OOD_JSON, OOD_WEIGHTS, load_detector, save_detector

__all__ = [
    "ACCEPT_FRACTION", "DEFAULT_METHOD", "FORMAT_VERSION", "LogitsAndScore", "METHODS", "OODDetector", "OOD_JSON",
    "OOD_WEIGHTS", "PENULTIMATE", "PENULTIMATE_METHODS", "ScoredModel", "capture", "collect_features", "fit_detector",
    "load_detector", "pick_layers", "save_detector",
]
