"""`medtransfer experiment`: a grid of runs on one patient-level split and one warm cache.

EXP/split.csv is drawn once (as `medtransfer split` draws it; with ``folds: K``, with the K folds
as `train --folds K` draws them) and every cell reads it (``split_file``): with folds, every cell
is a cross-validation on the same folds. Every cell shares the cache folder. Each cell is an ordinary run folder,
EXP/cells/NAME: a finished one (metrics.json and report.html) is skipped, an interrupted
one resumes (``train --resume``), a failing one is reported and the grid goes on. Each
cell is then evaluated on every external set (``medtransfer evaluate``) into
EXP/cells/NAME/external/SET. EXP/summary.{md,html,json} compare the configurations.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from medtransfer.config import resolve_train_config
from medtransfer.errors import ConfigError, TrainingInterrupted
from medtransfer.evaluation.external import evaluate_saved_model
from medtransfer.experiment.grid import Cell, ExperimentPlan, read_experiment, with_split
from medtransfer.experiment.summary import CellOutcome, write_summary
from medtransfer.rundir import CONFIG_FILE, RunDir
from medtransfer.train.cross_validation import write_fold_split
from medtransfer.train.pipeline import write_split
from medtransfer.train.seed_ensemble import train_run

SPLIT_FILE = "split.csv"
CELLS = "cells"
EXTERNAL = "external"


@dataclass(frozen=True)
class ExperimentResult:
    plan: ExperimentPlan
    outcomes: dict[str, CellOutcome]
    summary: dict
    files: list[Path]


def run_experiment(
    config_file: Path, *, data: str | None, out: Path, externals: list[Path] | None = None,
    cache_dir: str | None = None, bootstrap: int = 2000, console: Console | None = None, jobs: int = 1,
) -> ExperimentResult:
    """Run every cell of EXPERIMENT.yaml not yet finished, evaluate each on `externals`, write the summary.

    With ``jobs`` > 1, that many cells run at once, each in its own process (log: EXP/cells/NAME.log);
    each cell's data-loading workers are its own ``num_workers``, so set that to share the cores."""
    console = console or Console()
    plan = read_experiment(config_file, data=data, cache_dir=cache_dir)  # every cell checked before anything runs
    sets = external_sets(externals or [])
    if bootstrap < 1:
        raise ConfigError(f"--bootstrap: got {bootstrap}; the paired tests need at least 1 resample (e.g. 2000)")
    if jobs < 1:
        raise ConfigError(f"--jobs: got {jobs}; run at least 1 cell at a time")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; name a folder for the experiment")
    out.mkdir(parents=True, exist_ok=True)
    split_file = out / SPLIT_FILE
    if split_file.is_file():
        console.print(f"Using the experiment's split {split_file}")
    elif plan.base.folds:  # one set of folds for every cell: paired out-of-fold comparisons
        write_fold_split(plan.base, split_file, console)
    else:
        write_split(plan.base, split_file, console)
    console.print(f"{len(plan.cells)} cells, {len(plan.configurations)} configurations, cache {plan.base.cache_dir}")
    if jobs == 1:
        outcomes = {cell.name: run_cell(with_split(cell, split_file), out / CELLS / cell.name, sets, console=console)
                    for cell in plan.cells}
    else:
        child = [sys.executable, "-m", "medtransfer.experiment.runner", str(config_file), str(out),
                 str(plan.base.data), str(plan.base.cache_dir), *map(str, externals or [])]
        with ThreadPoolExecutor(jobs) as pool:
            done = pool.map(lambda cell: run_cell_process(child, cell.name, out / CELLS, console), plan.cells)
            outcomes = {outcome.name: outcome for outcome in done}
    summary, files = write_summary(plan, out, outcomes, list(sets), bootstrap=bootstrap, console=console)
    return ExperimentResult(plan, outcomes, summary, files)


def run_cell_process(child: list[str], name: str, cells_dir: Path, console: Console) -> CellOutcome:
    """One cell in its own process (`python -m medtransfer.experiment.runner ... NAME`), output to NAME.log."""
    cells_dir.mkdir(parents=True, exist_ok=True)
    log, result = cells_dir / f"{name}.log", cells_dir / f"{name}.outcome.json"
    result.unlink(missing_ok=True)
    console.print(f"Cell {escape(name)}: started in its own process (log {escape(str(log))})")
    with open(log, "w") as stream:
        code = subprocess.run([*child, "--cell", name], stdout=stream, stderr=subprocess.STDOUT).returncode
    if result.is_file():
        outcome = CellOutcome(**json.loads(result.read_text()))
    else:
        tail = (log.read_text(errors="replace").strip().splitlines() or [""])[-1]
        outcome = CellOutcome(name, "failed", f"process exited with code {code}: {tail[:200]}")
    console.print(f"Cell {escape(name)}: {outcome.status}" + (f" ({escape(outcome.error)})" if outcome.error else ""))
    return outcome


def _cell_main(argv: list[str]) -> None:
    """Child process of ``--jobs N``: CONFIG OUT DATA CACHE [EXTERNAL...] --cell NAME."""
    *positional, flag, name = argv
    config_file, out, data, cache_dir, *externals = positional
    assert flag == "--cell", argv
    plan = read_experiment(Path(config_file), data=data, cache_dir=cache_dir)
    cell = next(c for c in plan.cells if c.name == name)
    out_dir = Path(out)
    outcome = run_cell(with_split(cell, out_dir / SPLIT_FILE), out_dir / CELLS / name,
                       external_sets(list(map(Path, externals))), console=Console(width=120))
    (out_dir / CELLS / f"{name}.outcome.json").write_text(json.dumps(asdict(outcome)))


def external_sets(paths: list[Path]) -> dict[str, Path]:
    """Each --external DIR under a filesystem-safe name (its folder or file name; repeats get -2, -3...)."""
    sets: dict[str, Path] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise ConfigError(f"--external {path}: no such folder or file; pass a labelled dataset folder, CSV or .npz")
        base = re.sub(r"[^A-Za-z0-9._+-]+", "-", path.resolve().stem).strip("-.") or "external"
        name, n = base, 2
        while name in sets:
            name, n = f"{base}-{n}", n + 1
        sets[name] = path
    return sets


def run_cell(cell: Cell, run_dir: Path, sets: dict[str, Path], *, console: Console) -> CellOutcome:
    """Train (or resume, or skip) one cell and evaluate it on every external set; a failure becomes the
    outcome's one-line error. Ctrl-C stops the grid (the cell resumes on the next run)."""
    run = RunDir(run_dir)
    try:
        warn_if_settings_changed(cell, run, console)
        if run.finished():
            console.print(f"Cell {cell.name}: finished earlier, skipped")
            status = "skipped"
        elif (run_dir / CONFIG_FILE).is_file():
            console.rule(f"Cell {escape(cell.name)} (resuming)")
            settings, _ = resolve_train_config(out=None, resume=run_dir, config_file=None, overrides={})
            train_run(settings, run_dir, resume=True, console=console)
            status = "resumed"
        else:
            console.rule(f"Cell {escape(cell.name)}")
            train_run(cell.config, run_dir, resume=False, console=console)
            status = "trained"
        for name, data in sets.items():
            evaluate_external(cell, run_dir, name, data, console)
    except (TrainingInterrupted, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - one cell's failure is reported, the grid goes on
        message = (str(exc).strip().splitlines() or [""])[0]
        error = message if exc.__class__.__module__.startswith("medtransfer") else f"{type(exc).__name__}: {message}"
        console.print(f"[red]Cell {escape(cell.name)} failed:[/red] {escape(error)}")
        return CellOutcome(cell.name, "failed", error)
    return CellOutcome(cell.name, status, None)


# Settings that a run folder records differently (absolute paths) or that do not change results.
NOT_COMPARED = ("data", "cache_dir", "split_file", "weights", "num_workers", "progress")


def warn_if_settings_changed(cell: Cell, run: RunDir, console: Console) -> None:
    """A cell folder from an earlier run of a changed YAML keeps its own settings: say so, once per cell."""
    saved = run.config()
    if not saved:
        return
    wanted = cell.config.to_dict()
    changed = sorted(k for k in wanted if k not in NOT_COMPARED and k in saved and saved[k] != wanted[k])
    if changed:
        listed = ", ".join(f"{k}: {saved[k]!r} -> {wanted[k]!r}" for k in changed)
        console.print(f"[yellow]Cell {escape(cell.name)}[/yellow] keeps the settings it was run with ({escape(listed)}); "
                      f"delete {escape(str(run.root))} to run it with the YAML's")


def evaluate_external(cell: Cell, run_dir: Path, name: str, data: Path, console: Console) -> None:
    """`medtransfer evaluate` of the cell's model on one external set, unless done earlier."""
    target = run_dir / EXTERNAL / name
    if RunDir(target).finished():
        return
    if target.exists():  # an evaluation cut short: evaluate refuses a non-empty folder, so it starts over
        shutil.rmtree(target)
    console.print(f"Cell {escape(cell.name)}: evaluating on {escape(str(data))}")
    assert cell.config.cache_dir is not None  # read_experiment fills it in for every cell
    evaluate_saved_model(
        run_dir, data, target, cache_dir=Path(cell.config.cache_dir), bootstrap=cell.config.bootstrap,
        seed=cell.config.seed, skip_bad=cell.config.skip_bad_images, accelerator=cell.config.accelerator,
        console=console,
    )


if __name__ == "__main__":
    _cell_main(sys.argv[1:])
