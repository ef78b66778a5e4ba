"""medtransfer.evaluation.plots: every figure is written as a readable PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medtransfer.errors import DataError
from medtransfer.evaluation import plots
from medtransfer.evaluation.calibration import apply_temperature
from medtransfer.evaluation.metrics import binary_metrics
from medtransfer.evaluation.resampling import roc_band


@pytest.fixture(scope="module")
def binary():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = 1 / (1 + np.exp(-(2.5 * rng.normal(size=200) + 2.0 * (y - 0.5))))
    return y, p


def _assert_png(path, min_side=200):
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert min(image.size) >= min_side


def test_plot_history_marks_best_epoch_and_accepts_csv_strings(tmp_path):
    rows = [
        {"epoch": str(e), "train_loss": str(1 / (e + 1)), "val_loss": str(abs(e - 3) / 5 + 0.2),
         "train_acc": str(0.5 + e / 20), "val_acc": str(0.5 + e / 25), "lr": "0.001"}
        for e in range(8)
    ]
    rows[5]["val_acc"] = ""  # a missing cell leaves a gap
    out = plots.plot_history(rows, tmp_path / "nested" / "history.png")
    assert out == tmp_path / "nested" / "history.png"
    _assert_png(out)


def test_plot_history_rejects_empty(tmp_path):
    with pytest.raises(DataError, match="empty"):
        plots.plot_history([], tmp_path / "h.png")


def test_plot_roc_with_ci_operating_point_and_band(binary, tmp_path):
    y, p = binary
    m = binary_metrics(y, p, threshold=0.5)
    band = roc_band(y, p, n_resamples=50)
    out = plots.plot_roc(
        y, p, tmp_path / "roc.png", auc=m["auc"], ci=[m["auc"] - 0.05, m["auc"] + 0.03],
        operating_point=(1 - m["specificity"], m["sensitivity"]), label="resnet18", band=band,
    )
    _assert_png(out)
    _assert_png(plots.plot_roc(y, p, tmp_path / "roc_plain.png", auc=m["auc"]))


def test_plot_pr(binary, tmp_path):
    y, p = binary
    m = binary_metrics(y, p, threshold=0.5)
    _assert_png(plots.plot_pr(y, p, tmp_path / "pr.png", average_precision=m["average_precision"]))


@pytest.mark.parametrize("cm, names", [
    ([[50, 10], [5, 135]], ["NORMAL", "PNEUMONIA"]),
    ([[30, 2, 1], [4, 25, 6], [0, 0, 0]], ["normal", "bacterial", "viral"]),  # empty row: 0%
])
def test_plot_confusion(cm, names, tmp_path):
    _assert_png(plots.plot_confusion(cm, names, tmp_path / "cm.png", title="test"))


def test_plot_confusion_rejects_shape_mismatch(tmp_path):
    with pytest.raises(DataError, match="3x3"):
        plots.plot_confusion([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "cm.png")


def test_plot_reliability_several_curves(binary, tmp_path):
    y, p = binary
    sharpened = np.clip(p**3 / (p**3 + (1 - p) ** 3), 0, 1)
    out = plots.plot_reliability({"before": (y, sharpened), "after temperature scaling": (y, p)}, tmp_path / "rel.png")
    _assert_png(out)
    with pytest.raises(DataError, match="no curves"):
        plots.plot_reliability({}, tmp_path / "empty.png")


def test_plot_multiclass_roc(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 150)
    probs = apply_temperature(rng.normal(size=(150, 3)) + 2 * np.eye(3)[y], 1.0)
    _assert_png(plots.plot_multiclass_roc(y, probs, ["normal", "bacterial", "viral"], tmp_path / "mroc.png"))
    with pytest.raises(DataError, match=r"\(n, 2\)"):
        plots.plot_multiclass_roc(y, probs, ["a", "b"], tmp_path / "bad.png")


def test_plots_do_not_touch_pyplot_state():
    import sys

    import matplotlib

    assert matplotlib.get_backend()  # importing plots did not require a display
    if "matplotlib.pyplot" in sys.modules:
        assert not sys.modules["matplotlib.pyplot"].get_fignums()
