"""Time to quality: a main and a fast training configuration, scored on the same external dev set.

    python benchmarks/time_to_quality.py --data DIR --external DIR --main MAIN.yaml --fast FAST.yaml [--out DIR]

Each configuration is trained as `medtransfer train --config CONFIG --data DIR` would train it
(resolve_train_config, then train_run: one run, or a seed ensemble with `ensemble: N`) and
evaluated on --external as `medtransfer evaluate` would (evaluate_saved_model). The members
of an ensemble are evaluated too (``members`` in its block: each member's external AUC, and
the ensemble minus its first member, paired). The decoded-image cache is built before the clock starts, so
neither run pays for decoding. Prints ONE JSON line on stdout (logs go to stderr): per
configuration the external AUC with its patient-bootstrap CI, the wall clock of training and
the run's own train_seconds; then the wall-clock ratio main / fast and the AUC difference
main - fast with the patient-level paired bootstrap CI and p-value (and DeLong's p).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from medtransfer.config import resolve_train_config
from medtransfer.evaluation.compare import compare_runs
from medtransfer.evaluation.external import evaluate_saved_model
from medtransfer.rundir import RunDir
from medtransfer.train.pipeline import prebuild_cache
from medtransfer.train.seed_ensemble import MEMBERS, train_run

CONSOLE = Console(stderr=True)


def train_and_evaluate(name: str, config: Path, args: argparse.Namespace, root: Path) -> dict:
    """Train `config` on --data into ROOT/NAME, evaluate on --external into ROOT/NAME-external."""
    overrides = {"data": str(args.data), "cache_dir": str(args.cache_dir) if args.cache_dir else None}
    settings, run_dir = resolve_train_config(out=root / name, resume=None, config_file=config, overrides=overrides)
    prebuild_cache(Path(settings.data), cache_dir=Path(settings.cache_dir), size=settings.cache_size, workers=None,
                   skip_bad=settings.skip_bad_images, console=CONSOLE)
    started = time.perf_counter()
    train_run(settings, run_dir, resume=False, console=CONSOLE)
    wall = time.perf_counter() - started
    evaluation = root / f"{name}-external"
    test = evaluate(run_dir, evaluation, settings, args)
    result = {
        "config": str(config), "run": str(run_dir), "wall_seconds": round(wall, 1),
        "train_seconds": RunDir(run_dir).metrics().train_seconds, "external_auc": test["auc"],
        "external_auc_ci": test.get("auc_ci"), "external_n": test["n"],
    }
    members = sorted((run_dir / MEMBERS).glob("seed-*"), key=lambda p: int(p.name.removeprefix("seed-")))
    if members:  # not timed: what the ensemble adds over its members on the same images
        blocks = {m.name: evaluate(m, root / f"{name}-{m.name}-external", settings, args) for m in members}
        paired = compare_runs([evaluation, root / f"{name}-{members[0].name}-external"],
                              n_resamples=max(1, args.bootstrap)).tests[0]
        result["members"] = {
            **{k: {"external_auc": b["auc"], "external_auc_ci": b.get("auc_ci")} for k, b in blocks.items()},
            "ensemble_minus_first": {"auc_diff": paired["auc_diff"], "auc_diff_ci": paired["ci"],
                                     "p_bootstrap": paired["p_bootstrap"], "p_delong": paired["p_delong"]},
        }
    return result


def evaluate(run_dir: Path, target: Path, settings, args: argparse.Namespace) -> dict:
    """`medtransfer evaluate --run RUN_DIR --data EXTERNAL --out TARGET`; the test block of its metrics."""
    return evaluate_saved_model(
        run_dir, args.external, target, split=args.split, cache_dir=Path(settings.cache_dir),
        bootstrap=args.bootstrap, seed=settings.seed, accelerator=settings.accelerator, console=CONSOLE,
    )["test"]


def run(args: argparse.Namespace) -> dict:
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="time_to_quality-"))
    results = {name: train_and_evaluate(name, config, args, root) for name, config in (("main", args.main), ("fast", args.fast))}
    paired = compare_runs([root / "main-external", root / "fast-external"], n_resamples=max(1, args.bootstrap)).tests[0]
    return {
        "benchmark": "time_to_quality", "data": str(args.data), "external": str(args.external), **results,
        "wall_ratio": round(results["main"]["wall_seconds"] / max(results["fast"]["wall_seconds"], 1e-9), 3),
        "auc_diff": paired["auc_diff"], "auc_diff_ci": paired["ci"], "p_bootstrap": paired["p_bootstrap"],
        "p_delong": paired["p_delong"], "bootstrap_unit": paired["bootstrap_unit"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="training dataset (as for medtransfer train)")
    parser.add_argument("--external", type=Path, required=True, help="labelled external dev set")
    parser.add_argument("--main", type=Path, required=True, help="YAML of the main configuration")
    parser.add_argument("--fast", type=Path, required=True, help="YAML of the fast configuration")
    parser.add_argument("--out", type=Path, help="new folder for both runs and evaluations (default: a temporary one)")
    parser.add_argument("--cache-dir", type=Path, help="decoded-image cache (default: the configs' or ~/.cache/medtransfer)")
    parser.add_argument("--split", default="test", help="split of --external to use when it has splits")
    parser.add_argument("--bootstrap", type=int, default=2000, help="resamples for the CIs and the paired test")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # as the CLI: no hardware summary or tips
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds the JSON line only
        result = run(parse_args(argv))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
