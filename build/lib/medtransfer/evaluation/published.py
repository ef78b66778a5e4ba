"""Results published on the official Kermany test split, kept as data (``published_results.json``),
and the report section that shows them beside a run of the same task; and the per-finding AUROC
of CheXNet's Table 1 on NIH ChestX-ray14 (``published_chestxray14.json``: Wang et al. 2017,
Yao et al. 2017, CheXNet), set beside a multi-label run whose findings carry ChestX-ray14 names.

The numbers are quoted from their sources (DESIGN.md, "Facts"), never computed here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping, Sequence

from medtransfer.evaluation import html as h
from medtransfer.evaluation.multilabel_io import match_findings

__all__ = [
    "ChestXray14Comparison", "PublishedFindings", "chestxray14_comparison", "chestxray14_section", "published_chestxray14",
    "published_results", "published_section",
]


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


# ------------------------------------------------------------------ ChestX-ray14 (multi-label)


@dataclass(frozen=True)
class PublishedFindings:
    """CheXNet's Table 1: the findings, the size of the official test split, one entry per source
    (source, model, test_set, auroc: {finding: value})."""

    dataset: str
    table: str
    findings: tuple[str, ...]
    official_test_images: int
    sources: tuple[dict[str, Any], ...]
    note: str


def published_chestxray14() -> PublishedFindings:
    """Read the ChestX-ray14 table shipped with the package."""
    text = resources.files(__package__).joinpath("published_chestxray14.json").read_text(encoding="utf-8")
    d = json.loads(text)
    return PublishedFindings(d["dataset"], d["table"], tuple(d["findings"]), d["official_test_images"],
                             tuple(d["sources"]), d["note"])


@dataclass(frozen=True)
class ChestXray14Comparison:
    """A run's per-finding AUC beside the published ones.

    ``rows``: one dict per matched finding, in the run's order: ``finding`` (the run's name),
    ``published_name``, ``auc`` and ``auc_ci`` (the run's; None without an AUC there), and
    one value per source under its name. ``official_test_split``: the caller said the run's data
    is ChestX-ray14's official test split; otherwise ``label`` calls it a different test set.
    """

    header: list[str]
    sources: list[str]
    rows: list[dict[str, Any]]
    unmatched: list[str]  # the run's findings with no published row
    official_test_split: bool
    label: str
    note: str


def chestxray14_comparison(block: Mapping[str, Any], *, official_test_split: bool = False) -> ChestXray14Comparison | None:
    """The side-by-side rows for a multi-label split block (metrics.json "test": ``findings`` -> {auc, auc_ci, ...}).

    Finding names match without case and with ``_`` as a space (``Pleural_Thickening``); None
    when the block is not multi-label or no finding carries a ChestX-ray14 name.
    ``official_test_split``: the caller knows the run's data is ChestX-ray14's official
    test_list.txt split; otherwise every row is labelled a different test set."""
    findings = block.get("findings")
    if not isinstance(findings, Mapping) or not findings:
        return None
    table = published_chestxray14()
    mapping = match_findings(list(findings), table.findings)
    matched = [f for f in findings if mapping[f] is not None]
    if not matched:
        return None
    names = [s["source"] for s in table.sources]
    rows = []
    for finding in matched:
        entry = findings[finding] if isinstance(findings[finding], Mapping) else {}
        published = mapping[finding]
        rows.append({"finding": finding, "published_name": published, "auc": entry.get("auc"), "auc_ci": entry.get("auc_ci"),
                     **{s["source"]: s["auroc"].get(published) for s in table.sources}})
    n = block.get("n")
    if official_test_split:
        label = ("This run's data is ChestX-ray14's official test split; each published column is on its paper's own "
                 "test split of ChestX-ray14 (see the note).")
    else:
        size = (f" It has {n:,} images, the size of the official test split; it is the same test set only if it is "
                "that split." if n == table.official_test_images else "")
        label = "Different test set: the published figures are not on this run's images." + size
    return ChestXray14Comparison(
        header=["Finding", "This run (AUC)", *names], sources=names, rows=rows,
        unmatched=[f for f in findings if mapping[f] is None], official_test_split=official_test_split, label=label,
        note=f"{table.table}. {table.note}",
    )


def chestxray14_section(block: Mapping[str, Any], *, official_test_split: bool = False) -> str:
    """A report section with :func:`chestxray14_comparison`'s rows ("" when it returns None)."""
    found = chestxray14_comparison(block, official_test_split=official_test_split)
    if found is None:
        return ""
    rows = [(r["finding"], h.format_with_ci(r["auc"], r["auc_ci"]), *(h.format_number(r[s], 4) for s in found.sources))
            for r in found.rows]
    parts = [h.note(found.label, css="warn"), h.table(found.header, rows, css="published"), h.note(found.note)]
    if found.unmatched:
        parts.append(h.note(f"Not in the published table: {', '.join(found.unmatched)}."))
    return h.section("published-chestxray14", "Published results on ChestX-ray14", "\n".join(parts))
