"""Local recalibration (medtransfer.evaluation.recalibrate) over several fit/report splits.

    python benchmarks/recalibrate.py --run RUN --data DATA/kermany-224-test-dev [--seeds 0,1,2]

Prints ONE JSON line on stdout (logs go to stderr): for each seed, the patient-level
fit/report split's sizes, the refitted temperature and threshold, and accuracy,
sensitivity, specificity and AUC on the report part before and after (with 95% CIs), then
the mean over seeds and whether the targets (accuracy >= 0.93, sensitivity and
specificity >= 0.90 after recalibration) are met on average.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from medtransfer.config import default_cache_dir
from medtransfer.evaluation.recalibrate import recalibrate_model

KEYS = ("accuracy", "sensitivity", "specificity", "auc")
TARGETS = {"accuracy": 0.93, "sensitivity": 0.90, "specificity": 0.90}


def figures(block: dict) -> dict:
    return {k: round(block[k], 4) for k in KEYS} | {f"{k}_ci": block.get(f"{k}_ci") for k in KEYS if block.get(f"{k}_ci")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fit-fraction", type=float, default=0.5)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            print(f"seed {seed}", file=sys.stderr, flush=True)
            metrics = recalibrate_model(
                args.run, args.data, Path(tmp) / f"seed{seed}", fit_fraction=args.fit_fraction, seed=seed,
                cache_dir=args.cache_dir or default_cache_dir(), bootstrap=args.bootstrap, progress=False,
                console=Console(stderr=True, quiet=True),
            )
            r = metrics["recalibration"]
            results.append({
                "seed": seed, "fit_images": r["fit_images"], "report_images": r["report_images"],
                "temperature": round(r["temperature"], 4), "threshold": round(r["threshold"], 4),
                "before": figures(r["before"]), "after": figures(r["after"]),
            })
    mean = {
        when: {k: round(sum(x[when][k] for x in results) / len(results), 4) for k in KEYS} for when in ("before", "after")
    }
    print(json.dumps({
        "run": str(args.run), "data": str(args.data), "fit_fraction": args.fit_fraction, "seeds": results, "mean": mean,
        "targets": TARGETS, "targets_met_on_mean": all(mean["after"][k] >= v for k, v in TARGETS.items()),
    }))


if __name__ == "__main__":
    main()
