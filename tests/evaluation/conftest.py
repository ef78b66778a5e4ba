"""Shared test data for the metric, threshold and resampling tests.

`scored(name)` returns (0/1 labels, scores) of a named data set: "continuous", "ties"
(scores on a 0.1 grid: many positive/negative ties), "imbalanced" (10% positive), "tiny",
"all_tied" (every score equal). The same name always gives the same arrays.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest


def _scored(name: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(sum(map(ord, name)))
    if name == "continuous":
        y = rng.integers(0, 2, 300)
        p = 1 / (1 + np.exp(-(rng.normal(size=300) + 1.2 * y)))
    elif name == "ties":
        y = rng.integers(0, 2, 200)
        p = np.round(np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1), 1)
    elif name == "imbalanced":
        y = (rng.random(400) < 0.1).astype(int)
        p = np.clip(rng.beta(2, 5, 400) + 0.25 * y, 0, 1)
    elif name == "tiny":
        y = np.array([0, 0, 1, 1, 0, 1])
        p = np.array([0.1, 0.4, 0.35, 0.8, 0.8, 0.8])
    elif name == "all_tied":
        y = np.array([0, 1, 0, 1, 1])
        p = np.full(5, 0.5)
    else:  # pragma: no cover
        raise KeyError(name)
    return y.astype(int), p.astype(float)


@pytest.fixture
def scored() -> Callable[[str], tuple[np.ndarray, np.ndarray]]:
    return _scored
