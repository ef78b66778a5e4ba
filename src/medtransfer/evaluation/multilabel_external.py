"""A multi-label model on another labelled set: findings matched by name, scored with the saved operating points.

`evaluate` and `recalibrate` call these for a model whose model.json says ``task:
multi-label``. The external set is discovered with the run's rules (its labels column where the set has
it, uncertain policy, patient regex; the findings are read from the set itself) and its findings are matched
to the model's by name (:func:`medtransfer.evaluation.multilabel_io.match_findings`: exact, else
without case and with ``_`` as a space). A model finding the set does not label is unknown
(masked) on every image and reported under ``findings_match.missing``; a set that labels none of
the model's findings is a DataError. The set's own extra findings are listed and ignored.

The records come back relabelled in the model's names and order, so ``Task.targets`` gives
the 1 / 0 / NaN target matrix directly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.artifacts import SavedModel
from medtransfer.data.discover import Record, discover_data
from medtransfer.data.manifest import read_rows
from medtransfer.errors import DataError
from medtransfer.evaluation.multilabel import MultiLabelPoint, multilabel_split_metrics
from medtransfer.evaluation.multilabel_io import match_findings, reference_predictions
from medtransfer.evaluation.shift import multilabel_shift_summary
from medtransfer.task import join_findings, split_findings

__all__ = ["ExternalFindings", "discover_multilabel_external", "multilabel_ood_summary", "multilabel_shift", "point_of"]


@dataclass(frozen=True)
class ExternalFindings:
    """The records (labels and masks in the model's finding names) and how the findings matched."""

    records: list[Record]
    matched: dict[str, str]  # model finding -> the set's name for it
    missing: list[str]  # model findings the set does not label: masked for every image
    extra: list[str]  # the set's findings the model does not have: ignored
    views_left_out: int = 0

    def targets(self, saved: SavedModel, records: list[Record] | None = None) -> np.ndarray:
        chosen = self.records if records is None else records
        return saved.task.targets([r.label for r in chosen], [r.masked for r in chosen])

    def to_dict(self) -> dict[str, Any]:
        return {"matched": self.matched, "missing": self.missing, "extra": self.extra,
                **({"views_left_out": self.views_left_out} if self.views_left_out else {})}


def point_of(saved: SavedModel) -> MultiLabelPoint:
    """The operating points in model.json (per-finding temperatures and thresholds) as a MultiLabelPoint."""
    info = saved.info
    assert info.temperatures is not None and info.thresholds is not None, "a saved multi-label model has both"
    return MultiLabelPoint(saved.task, [float(t) for t in info.temperatures], [float(t) for t in info.thresholds],
                           info.threshold_policy or "saved")


def discover_multilabel_external(saved: SavedModel, data: Path, *, split: str, cache_dir: Path) -> ExternalFindings:
    """The labelled images of `data` (its `split` when it has splits), findings matched to the model's."""
    training = saved.info.training_config or {}
    is_npz = Path(data).suffix.lower() == ".npz"
    found = discover_data(
        data, patient_regex=None if is_npz else training.get("patient_regex"),
        class_names=training.get("class_names") if is_npz else None, extract_dir=Path(cache_dir) / "npz",
        labels_column=_labels_column(Path(data), training.get("labels_column")),
        findings=(training.get("findings") or list(saved.classes)) if is_npz else None,
        uncertain=training.get("uncertain") or "ignore", salt_dir=cache_dir,
    )
    findings = saved.classes
    if not found.task.multilabel:
        raise DataError(
            f"--data {data}: holds single-label classes ({', '.join(found.task.classes)}), but the model is multi-label "
            f"(findings {', '.join(findings)}); pass a CSV with a labels column or one column per finding"
        )
    records = found.records
    if any(r.split for r in records):
        records = [r for r in records if r.split == split]
        if not records:
            raise DataError(f"--split {split}: --data {data} has no {split} images; choose another --split")
    views = tuple(training.get("views") or ())
    left_out = 0
    if views and any(r.view for r in records):  # the run's views, where the set says which view an image is
        kept = [r for r in records if r.view is None or r.view in views]
        left_out, records = len(records) - len(kept), kept
        if not records:
            raise DataError(f"--data {data}: no image of the run's views ({', '.join(views)})")
    mapping = match_findings(findings, found.task.classes)
    matched = {f: name for f, name in mapping.items() if name is not None}
    if not matched:
        raise DataError(
            f"--data {data}: labels none of the model's findings ({', '.join(findings)}); its findings are "
            f"{', '.join(found.task.classes)}. Name the columns (or labels) as in training"
        )
    missing = [f for f in findings if f not in matched]
    extra = [name for name in found.task.classes if name not in set(matched.values())]
    back = {name: f for f, name in matched.items()}
    relabelled = [
        replace(
            r,
            label=join_findings([f for f in findings if f in {back.get(x) for x in split_findings(r.label)}]),
            masked=tuple(f for f in findings if f in missing or (f in matched and matched[f] in r.masked)),
        )
        for r in records
    ]
    return ExternalFindings(relabelled, matched, missing, extra, left_out)


def _labels_column(data: Path, column: str | None) -> str | None:
    """The run's --labels-column when the external CSV has it; else None (the layout is read from the file)."""
    if column is None or not (data.is_file() and data.suffix.lower() == ".csv"):
        return None
    header, _ = read_rows(data)
    return column if column.strip().lower() in {name.strip().lower() for name in header} else None


def multilabel_shift(run: Path, targets: np.ndarray, probs: np.ndarray, saved: SavedModel, missing: list[str]) -> dict[str, Any]:
    """The shift summary per finding against the run's own predictions (test, else validation)."""
    findings = saved.classes
    reference = reference_predictions(run)
    if reference is None or set(reference[1].findings) != set(findings):
        return multilabel_shift_summary(targets, probs, findings, reference_targets=None, reference_probs=None,
                                        reference="", missing=missing)
    name, predictions = reference
    order = [predictions.findings.index(f) for f in findings]
    return multilabel_shift_summary(
        targets, probs, findings, reference_targets=predictions.targets[:, order],
        reference_probs=predictions.probabilities[:, order], reference=name, missing=missing,
    )


def multilabel_ood_summary(
    saved: SavedModel, paths: list[str], targets: np.ndarray, patient_ids: list[str], logits: np.ndarray,
    scores: np.ndarray, point: MultiLabelPoint, *, bootstrap: int, seed: int,
) -> dict[str, Any]:
    """The flagged fraction and the metrics on the images the OOD guard accepts (metrics.json "ood")."""
    assert saved.ood is not None, "ood scores come only from a model with a detector"
    flagged = saved.ood.flags(scores)
    summary: dict[str, Any] = {
        "method": saved.ood.method, "threshold": saved.ood.threshold, "flagged": int(flagged.sum()),
        "flagged_fraction": float(flagged.mean()), "score_median": float(np.median(scores)),
    }
    keep = np.flatnonzero(~flagged)
    if len(keep):
        summary["test_without_flagged"] = multilabel_split_metrics(
            logits[keep], targets[keep], [patient_ids[i] for i in keep], point, bootstrap=bootstrap, seed=seed
        )
    return summary
