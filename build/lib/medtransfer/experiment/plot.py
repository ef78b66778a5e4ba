"""The experiment's one figure: AUC per configuration, a point per seed with its 95% CI, per evaluation set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

# set -> configuration -> [(seed, auc, (lo, hi) or None)]
AucPoints = dict[str, dict[str, list[tuple[int, float, tuple[float, float] | None]]]]


def plot_auc(points: AucPoints, path: Path) -> Path:
    """One panel per evaluation set; within it, configurations side by side, seeds as points with
    bootstrap CIs as bars and the mean over seeds as a black line. Written as PNG to `path`."""
    panels = [(name, configs) for name, configs in points.items() if any(configs.values())]
    width = max(4.0, sum(1.2 + 0.9 * len(configs) for _, configs in panels))
    fig = Figure(figsize=(width, 4.2), layout="constrained")
    axes = fig.subplots(1, max(1, len(panels)), sharey=True, squeeze=False)[0]
    for ax, (set_name, configs) in zip(axes, panels):
        for i, (config, seeds) in enumerate(configs.items()):
            offsets = np.linspace(-0.18, 0.18, len(seeds)) if len(seeds) > 1 else [0.0]
            for dx, (_, auc, ci) in zip(offsets, seeds):
                yerr = [[auc - ci[0]], [ci[1] - auc]] if ci else None
                ax.errorbar(i + dx, auc, yerr=yerr, fmt="o", color=f"C{i % 10}", capsize=3, markersize=4)
            if seeds:
                ax.hlines(float(np.mean([auc for _, auc, _ in seeds])), i - 0.28, i + 0.28, color="black")
        ax.set_xticks(range(len(configs)), labels=list(configs), rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(configs) - 0.4)
        ax.set_title(set_name)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("AUC (points: seeds, bars: 95% CI, line: mean)")
    fig.savefig(path, dpi=110)
    return Path(path)
