"""Results published on the official Kermany test split, kept as data (``published_results.json``),
and the report section that shows them beside a run of the same task.

The numbers are quoted from their sources (DESIGN.md, "Facts"), never computed here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Sequence

from medtransfer.evaluation import html as h

__all__ = ["PublishedResults", "published_results", "published_section"]


@dataclass(frozen=True)
class PublishedResults:
    """The task, its two classes, the size of the official test split, and one row per source."""

    task: str
    classes: tuple[str, ...]
    test_images: int
    rows: tuple[dict[str, Any], ...]  # source, model, accuracy, sensitivity, specificity, auc (None: not reported)


def published_results() -> PublishedResults:
    """Read the table shipped with the package."""
    text = resources.files(__package__).joinpath("published_results.json").read_text(encoding="utf-8")
    data = json.loads(text)
    return PublishedResults(data["task"], tuple(data["classes"]), data["test_images"], tuple(data["results"]))


def published_section(classes: Sequence[str], test_images: int | None) -> str:
    """The report's "published" section for a run with these ``classes`` and a test split of
    ``test_images`` images (None: no test split); "" when the run is not of the published task."""
    published = published_results()
    if sorted(classes) != sorted(published.classes):
        return ""
    rows = [
        (r["source"], r["model"], *(h.format_percent(r[k]) for k in ("accuracy", "sensitivity", "specificity")), h.format_number(r["auc"]))
        for r in published.rows
    ]
    parts = [
        h.note(
            "Published results, official Kaggle/Kermany test split; not computed by this run. "
            f"The official test split has {published.test_images} images.",
            css="warn",
        ),
        h.table(["Source", "Model", "Accuracy", "Sensitivity", "Specificity", "AUC"], rows, css="published"),
    ]
    if test_images is not None:
        same = " (the same size as the official split)" if test_images == published.test_images else ""
        comparable = "its numbers are comparable with the table only when it is the official test split."
        parts.append(h.note(f"This run's test split has {h.format_number(test_images)} images{same}; {comparable}"))
    return h.section("published", "Published results on this task", "\n".join(parts))
