"""`medtransfer demo`: both classic scenarios on built-in synthetic radiographs, offline.

Generates chest-radiograph-like phantoms in the Kaggle layout (with a deliberately tiny
val folder, as the real set has), then fine-tunes and freezes the first 4 children of the
ImageNet-pretrained EfficientNet-Lite0 (its weights ship with a Python package, so no
download), and prints the two runs side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medtransfer.config import TrainConfig
from medtransfer.data.synthetic import generate_demo_dataset
from medtransfer.evaluation.html import format_number, split_value
from medtransfer.rundir import CONFIG_FILE, RunDir, RunMetrics
from medtransfer.train.pipeline import run_training

SCENARIOS: dict[str, dict[str, Any]] = {
    "finetune": {"strategy": "finetune"},
    "freeze-4": {"strategy": "freeze", "freeze_children": 4},
}


def demo_config(data: Path, cache_dir: Path, *, epochs: int, **overrides) -> TrainConfig:
    """Small, fast settings: 160 px, few epochs, modest bootstrap; LayerCAM heatmaps (stride 16, 10 x 10 cells at 160 px)."""
    values = dict(
        data=str(data),
        backbone="efficientnet_lite0",
        weights="imagenet",
        image_size=160,
        cache_size=176,
        epochs=epochs,
        patience=3,
        batch_size=32,
        lr=1e-3,
        bootstrap=500,
        cache_dir=str(cache_dir),
        progress=False,
        cam_method="layercam",  # Grad-CAM's 5 x 5 map misses the lesions at 160 px (docs: science, heatmaps)
    )
    values.update(overrides)
    return TrainConfig.from_dict(values, source="demo")


def run_demo(
    out: Path, *, epochs: int = 6, cache_dir: Path | None = None, console: Console | None = None
) -> dict[str, RunMetrics]:
    """Generate the data (once), train every scenario not yet done, print the comparison; return each run's metrics."""
    console = console or Console()
    data = out / "data"
    if not (data / "README.txt").is_file():
        summary = generate_demo_dataset(data, seed=0)
        console.print(f"Generated {summary.total_images} synthetic radiographs of {summary.total_patients} patients in {data}")
    cache_dir = cache_dir or out / "cache"
    results = {}
    for name, settings in SCENARIOS.items():
        run = RunDir(out / name)
        if run.has_metrics():
            console.print(f"[bold]{name}[/bold]: already done in {run.root}")
        else:
            console.rule(f"Scenario {name}")
            resume = (run.root / CONFIG_FILE).is_file()
            run_training(demo_config(data, cache_dir, epochs=epochs, **settings), run.root, resume=resume, console=console)
        results[name] = run.metrics()
    console.print(comparison_table(results))
    for name in results:
        console.print(f"Report: {out / name / 'report.html'}")
    return results


def comparison_table(results: dict[str, RunMetrics]) -> Table:
    """The runs side by side: size, training, threshold, and the test metrics with their intervals."""
    table = Table(title="Demo: test split of the synthetic data (threshold chosen on validation)")
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    rows: list[tuple[str, Callable[[RunMetrics], str]]] = [
        ("trainable / total params", _params),
        ("epochs (best)", lambda m: f"{m.epochs_run} ({m.best_epoch})"),
        ("train seconds", lambda m: f"{m.train_seconds:.0f}"),
        ("threshold", lambda m: f"{m.threshold:.3f}"),
    ]
    for key in ("auc", "accuracy", "sensitivity", "specificity", "f1"):
        rows.append((key, _test_metric(key)))
    for label, get in rows:
        table.add_row(label, *[get(m) for m in results.values()])
    return table


def _params(m: RunMetrics) -> str:
    params = m.params or {}  # a dash for a count the run did not record
    return f"{format_number(params.get('trainable'))} / {format_number(params.get('total'))}"


def _test_metric(key: str) -> Callable[[RunMetrics], str]:
    """One test metric with its interval (a dash without a test split)."""
    return lambda m: format_number(None) if m.test is None else split_value(m.test, key)
