"""EXPERIMENT.yaml: ordinary train settings plus ``grid:`` and/or ``variants:``, expanded into
named, validated cells.

    backbone: resnet18
    epochs: 10
    grid:
      strategy: [finetune, linear-probe]
      seed: [0, 1]
    variants:             # optional: named bundles of settings, one factor at a time
      baseline: {}
      ema: {weight_averaging: ema}
      probe: {strategy: linear-probe, freeze_children: null}   # null: back to the default

The cells are every variant (or none) times every combination of the grid's values.

Every cell (one combination of the grid's values, in YAML order) is checked as a run would
be (:func:`~medtransfer.train.validate.validate_config`) before anything runs, so a bad
grid fails with one line. Settings that shape the one split and the one cache cannot vary.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtransfer.config import TrainConfig, default_cache_dir, read_yaml
from medtransfer.errors import ConfigError, MedtransferError
from medtransfer.train.cross_validation import check_cross_validation
from medtransfer.train.validate import validate_config

GRID_KEY = "grid"
VARIANTS_KEY = "variants"
VARIANT = "variant"  # the cell value naming its variant
# The split is drawn once from these (into EXP/split.csv); every cell then reads that file.
SPLIT_DRAWING = ("val_fraction", "test_fraction", "keep_official_val")
# Settings every cell shares: the data, its split and its cache.
# With folds: K, every cell is a cross-validation on the experiment's one set of folds.
FIXED = ("data", "split_file", "cache_dir", "labels", "patient_regex", "class_map", "class_names", "folds", *SPLIT_DRAWING)
SEED = "seed"


@dataclass(frozen=True)
class Cell:
    name: str  # the run folder's name: grid values, readable and filesystem-safe
    values: dict[str, Any]  # this cell's grid values, as the YAML gives them
    config: TrainConfig  # resolved; split_file is set once the experiment's split exists
    configuration: str  # the name without the seed: cells that differ only by seed share it

    @property
    def seed(self) -> int:
        return self.config.seed


@dataclass(frozen=True)
class ExperimentPlan:
    base: TrainConfig  # the settings outside grid: they draw the split
    grid: dict[str, list[Any]]
    cells: list[Cell]
    variants: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # name -> its settings

    @property
    def configurations(self) -> list[str]:
        return list(dict.fromkeys(cell.configuration for cell in self.cells))


def read_experiment(path: Path, *, data: str | None = None, cache_dir: str | None = None) -> ExperimentPlan:
    """The plan of EXPERIMENT.yaml at `path` (`data` and `cache_dir` override the file's); ConfigError
    naming the file, the setting and the value for a bad grid or a cell that a run would refuse."""
    values = read_yaml(Path(path))
    source = f"--config {path}"
    variants = _read_variants(values.pop(VARIANTS_KEY, None), values, source)
    grid = _read_grid(values.pop(GRID_KEY, None), values, source, required=not variants)
    clash = sorted({k for settings in variants.values() for k in settings} & set(grid))
    if clash:
        raise ConfigError(f"{source}: {clash[0]} is set both in a variant and in grid:; keep one")
    values["data"] = data or values.get("data")
    if not values["data"]:
        raise ConfigError(f"--data: required; pass the dataset folder or CSV (or set data: in {path})")
    values["cache_dir"] = str(cache_dir or values.get("cache_dir") or default_cache_dir())
    base = TrainConfig.from_dict(values, source=source)
    shared = {k: v for k, v in values.items() if k not in SPLIT_DRAWING}
    cells: list[Cell] = []
    for variant, settings in (variants or {"": {}}).items():
        for combination in itertools.product(*grid.values()):
            chosen = {**({VARIANT: variant} if variant else {}), **dict(zip(grid, combination))}
            name = _unique(cell_name(chosen), {c.name for c in cells})
            where = f"{source}: grid cell {name}"
            merged = {**shared, **settings, **{k: v for k, v in chosen.items() if k != VARIANT}}
            config = TrainConfig.from_dict({k: v for k, v in merged.items() if k not in settings or settings[k] is not None},
                                           source=where)  # a variant's `setting: null` restores the default
            try:
                validate_config(config)
                if config.folds:
                    check_cross_validation(config)
            except MedtransferError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            without_seed = {k: v for k, v in chosen.items() if k != SEED}
            cells.append(Cell(name, chosen, config, cell_name(without_seed) or "default"))
    return ExperimentPlan(base, grid, cells, variants)


def _read_grid(grid: Any, values: dict[str, Any], source: str, *, required: bool = True) -> dict[str, list[Any]]:
    example = "e.g. grid: {strategy: [finetune, linear-probe], seed: [0, 1]}"
    if grid is None and not required:
        return {}
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{source}: needs {GRID_KEY}: (or {VARIANTS_KEY}:), a mapping of setting: [values]; {example}")
    for key, options in grid.items():
        _check_varying(key, f"{source}: grid", "grid:")
        if key in values:
            raise ConfigError(f"{source}: {key} is set both outside and inside grid:; keep one")
        if not isinstance(options, list) or not options:
            raise ConfigError(f"{source}: grid: {key} got {options!r}; expected a non-empty list of values, e.g. {key}: [a, b]")
        repeated = [v for i, v in enumerate(options) if v in options[:i]]
        if repeated:
            raise ConfigError(f"{source}: grid: {key} lists {repeated[0]!r} twice; list each value once")
    return {str(k): list(v) for k, v in grid.items()}


def _check_varying(key: Any, where: str, block: str) -> None:
    known = TrainConfig.field_names()
    if key not in known:
        close = difflib.get_close_matches(str(key).replace("-", "_"), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: unknown setting {key!r}{hint}")
    if key in FIXED:
        raise ConfigError(f"{where}: {key} cannot vary (every cell uses the experiment's one split and "
                          f"cache); set it once outside {block}")


def _read_variants(variants: Any, values: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """``variants: {NAME: {setting: value, ...}}``: each variant's settings replace the shared ones."""
    if variants is None:
        return {}
    example = "e.g. variants: {baseline: {}, ema: {weight_averaging: ema}}"
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"{source}: {VARIANTS_KEY}: got {variants!r}; expected a mapping of name: {{settings}}; {example}")
    for name, settings in variants.items():
        if not isinstance(settings, dict):
            raise ConfigError(f"{source}: {VARIANTS_KEY}: {name} got {settings!r}; expected a mapping of settings "
                              f"(or {{}} for the shared ones); {example}")
        for key in settings:
            _check_varying(key, f"{source}: variant {name}", f"{VARIANTS_KEY}:")
    return {str(k): dict(v) for k, v in variants.items()}


def cell_name(values: dict[str, Any]) -> str:
    """``strategy=finetune__seed=0``: each KEY=VALUE with characters outside [A-Za-z0-9._+-] replaced by '-'."""
    return "__".join(f"{key}={_safe(value)}" for key, value in values.items())


def _safe(value: Any) -> str:
    text = "-".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    text = Path(text).stem if "/" in text or "\\" in text else text  # a weights file: its name
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-.") or "x"


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate


def with_split(cell: Cell, split_file: Path) -> Cell:
    """The cell reading the experiment's split file."""
    return dataclasses.replace(cell, config=dataclasses.replace(cell.config, split_file=str(Path(split_file).resolve())))
