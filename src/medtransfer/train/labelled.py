"""The run's labelled data: discovery (task, patient-ID rules, views), the patient-level split, the leakage check.

`train`, `split` and `experiment` draw the same split from the same settings. The task kind
(single-label classes or multi-label findings, :mod:`medtransfer.task`) is decided here, by the
data source, and recorded in config.yaml, so a resumed run or a `--split-file` reads the same
task back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from medtransfer.config import TrainConfig, default_cache_dir
from medtransfer.data.discover import Discovered, Record, discover_data
from medtransfer.data.near_duplicates import ImageHashes, hash_images
from medtransfer.data.patients import patient_grouping_warning, rules_summary
from medtransfer.data.split import check_leakage, read_split_csv, resplit, split_summary, summary_lines, write_split_csv
from medtransfer.errors import ConfigError, DataError, MedtransferError
from medtransfer.evaluation.evaluate import default_positive_class
from medtransfer.task import MULTI_LABEL, SINGLE_LABEL, Task
from medtransfer.train.validate import validate_multilabel_splits, validate_splits


@dataclass(frozen=True)
class LabelledData:
    records: list[Record]  # with their split
    classes: list[str]  # classes, or findings in output order (multi-label)
    positive_class: str | None  # None for multi-label: every finding has its own operating point
    leakage: dict[str, Any]
    summary: dict[str, Any]
    task: Task  # single-label over `classes`, or multi-label over the findings


def findings_of(config: TrainConfig) -> tuple[str, ...] | None:
    return tuple(config.findings) if config.findings else None


def discover_records(config: TrainConfig, console: Console | None = None) -> list[Record]:
    """The labelled images of `config.data`: label scheme, class map and .npz class names applied."""
    return discover_task(config, console).records


def discover_task(config: TrainConfig, console: Console | None = None) -> Discovered:
    """Records and task of `config.data`; prints which patient-ID rule fired, and warns (or, under
    --strict, fails) when no rule fired and most patients have a single image."""
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    found = discover_data(
        config.data, patient_regex=config.patient_regex, labels=config.labels, class_map=config.class_map,
        class_names=config.class_names, extract_dir=cache_dir / "npz", labels_column=config.labels_column,
        findings=findings_of(config), uncertain=config.uncertain, views=config.views, salt_dir=cache_dir,
    )
    if config.task != "auto" and config.task != found.task.kind:
        raise ConfigError(f"--task {config.task}: {config.data} holds {found.task.kind} data; leave --task out or fix the data")
    if console is not None:
        console.print(rules_summary(found.patient_rules), markup=False, highlight=False)
    warning = patient_grouping_warning([r.patient_id for r in found.records], found.patient_rules)
    if warning:
        if config.strict:
            raise DataError(f"--strict: {warning}")
        if console is not None:
            console.print(f"[yellow]Warning:[/yellow] {escape(warning)}")
    return found


def draw_split_hashed(config: TrainConfig, console: Console | None = None) -> tuple[list[Record], ImageHashes, Task]:
    """The patient-level split of `config.data`, the content hashes it was drawn with, and the task.

    Images are hashed once: near-duplicates travel together in the split, and the leakage
    check reuses the same hashes. Multi-label data is stratified over findings.
    """
    found = discover_task(config, console)
    hashes = hash_images([r.path for r in found.records])
    drawn = resplit(
        found.records, val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=config.seed,
        keep_official_val=config.keep_official_val, hashes=hashes,
        findings=found.task.classes if found.task.multilabel else None,
    )
    return drawn, hashes, found.task


def draw_split(config: TrainConfig) -> list[Record]:
    """The patient-level split of `config.data` (the same for `train` and `split`)."""
    return draw_split_hashed(config)[0]


def report_leakage(records: list[Record], config: TrainConfig, console: Console, hashes: ImageHashes | None = None) -> dict:
    """Check IDs, bytes and content across splits: the summary line, each finding as a warning."""
    leakage = check_leakage(records, hashes=hashes)
    console.print(leakage.summary(), markup=False, highlight=False)
    for line in leakage.lines():
        console.print(f"[yellow]Leakage:[/yellow] {escape(line)}")
    if config.strict and not leakage.clean:
        raise DataError(f"--strict: {leakage.lines()[0]}; remove the duplicates or run without --strict")
    return leakage.to_dict()


def write_split(config: TrainConfig, out: Path, console: Console) -> None:
    """`medtransfer split`: the split `train` would draw, checked for leakage, saved as CSV."""
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; name a CSV file, e.g. --out split.csv")
    records, hashes, task = draw_split_hashed(config, console)
    report_leakage(records, config, console, hashes)
    for line in summary_lines(_summary(records, task)):
        console.print(line)
    write_split_csv(records, out)
    console.print(f"Wrote {out}")


def _summary(records: list[Record], task: Task) -> dict:
    return split_summary(records, findings=task.classes) if task.multilabel else split_summary(records)


def task_of_split_file(records: list[Record], config: TrainConfig) -> Task:
    """The task of records read from a split.csv: the run's recorded one (config.yaml holds the resolved
    kind and findings), else the one the data source defines, else told by the records themselves."""
    if config.task == MULTI_LABEL and config.findings:
        return Task(MULTI_LABEL, tuple(config.findings))
    if config.task == SINGLE_LABEL:
        return Task(SINGLE_LABEL, tuple(sorted({r.label for r in records})))
    if config.data and Path(config.data).exists():
        try:
            return discover_task(config).task
        except MedtransferError:
            pass  # the source changed since the split was drawn: the records decide
    if config.findings or any(r.masked for r in records) or any("|" in r.label for r in records):
        seen = sorted({f for r in records for f in (*r.label.split("|"), *r.masked) if f})
        return Task(MULTI_LABEL, tuple(config.findings or seen))
    return Task(SINGLE_LABEL, tuple(sorted({r.label for r in records})))


def load_labelled_data(config: TrainConfig, run_dir: Path, console: Console, *, resume: bool) -> LabelledData:
    """Records with their split (a resumed run's split.csv, else `split_file`, else drawn), task, leakage, summary."""
    split_file = run_dir / "split.csv" if resume and (run_dir / "split.csv").is_file() else config.split_file
    if split_file:
        records = read_split_csv(Path(split_file))
        hashes = hash_images([r.path for r in records])
        task = task_of_split_file(records, config)
    else:
        records, hashes, task = draw_split_hashed(config, console)
    classes = list(task.classes)
    present = [s for s in ("train", "val", "test") if any(r.split == s for r in records)]
    if task.multilabel:
        if config.positive_class:
            raise ConfigError("--positive-class: multi-label data has one operating point per finding; leave it out")
        positive_class = None
        validate_multilabel_splits({s: [r for r in records if r.split == s] for s in present}, task, config)
    else:
        positive_class = config.positive_class or default_positive_class(classes)
        if positive_class not in classes:
            raise ConfigError(f"--positive-class: got {positive_class!r}; classes are {', '.join(classes)}")
        validate_splits({s: [r.label for r in records if r.split == s] for s in present}, classes, config, positive_class)
    leakage = report_leakage(records, config, console, hashes)
    summary = _summary(records, task)
    for line in summary_lines(summary):
        console.print(line)
    return LabelledData(records, classes, positive_class, leakage, summary, task)


__all__ = [
    "LabelledData", "discover_records", "discover_task", "draw_split", "draw_split_hashed",
    "load_labelled_data", "report_leakage", "task_of_split_file", "write_split",
]
