"""Kill training with SIGKILL at random moments and resume it each time; print one JSON line.

An uninterrupted run of a small demo dataset is the reference. Then, ``--kills`` times, a
run with its own fresh cache folder (so the kill may land in the cache build too) is
started, killed with SIGKILL at a moment drawn uniformly over the reference's duration
(cache build, epochs, checkpoint writes, evaluation, report), and resumed with
``train --resume`` until it finishes. A run killed before its marker (config.yaml) exists
is not a run yet and is started again. A run is lost when a resume fails.

    python benchmarks/reliability.py --kills 20      # the issue's measure (~20 min on 2 CPU cores)
    python benchmarks/reliability.py --kills 5       # a quick run

It also runs every bad-input case of the CLI below (``BAD_INPUTS``) and counts those that
end as the project promises: exit code 1 and one line on stderr, no traceback. The server's
part of the measure (concurrent and hostile requests) is ``benchmarks/serve_load.py``.

Output: runs_completed, runs_lost, kills_landed (kills that hit a live process),
max_abs_diff_final_val_auc (vs the uninterrupted run) and max_abs_diff_val_loss (every epoch of
history.csv), plus the reference's seconds; bad_input_cases, bad_input_clean (exit 1 with one
line) and the commands of any case that was not clean.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medtransfer.data.synthetic import generate_demo_dataset  # noqa: E402

ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--set", "cache_size=40",
        "--batch-size", "8", "--bootstrap", "20", "--num-workers", "0", "--no-progress", "--epochs", "3",
        "--patience", "5", "--precision", "32-true", "--accelerator", "cpu", "--lr", "0.003"]


def command(*args) -> list[str]:
    return [sys.executable, "-m", "medtransfer.cli", *map(str, args)]


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), env=environment(), capture_output=True, text=True)


def outcome(folder: Path) -> tuple[float, list[float]]:
    metrics = json.loads((folder / "metrics.json").read_text())
    with (folder / "history.csv").open(newline="") as handle:
        return metrics["val"]["auc"], [float(row["val_loss"]) for row in csv.DictReader(handle)]


def killed_run(data: Path, folder: Path, cache: Path, delay: float) -> bool:
    """Start a run, SIGKILL it after `delay` seconds; True when the kill hit a live process."""
    process = subprocess.Popen(command("train", "--data", data, "--out", folder, "--cache-dir", cache, *ARGS),
                               env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True


def finish(data: Path, folder: Path, cache: Path) -> str | None:
    """Resume (or restart, when the kill came before the run's marker) until done; the error line if lost."""
    if (folder / "metrics.json").is_file() and (folder / "report.html").is_file():
        return None  # the kill came after the run had finished
    if not (folder / "config.yaml").is_file():
        for leftover in folder.glob("*") if folder.exists() else []:
            leftover.unlink()
        done = run("train", "--data", data, "--out", folder, "--cache-dir", cache, *ARGS)
    else:
        done = run("train", "--resume", folder)
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1]


def bad_inputs(work: Path, data: Path, run_dir: Path) -> list[list[str]]:
    """CLI calls with bad input, each of which must exit 1 with one line (no traceback)."""
    junk = work / "junk.png"
    junk.write_bytes(b"not an image")
    yaml_bad = work / "bad.yaml"
    yaml_bad.write_text("epochs: [1, 2\n")
    yaml_unknown = work / "unknown.yaml"
    yaml_unknown.write_text("epoks: 3\n")
    out = lambda name: str(work / "bad" / name)  # noqa: E731
    return [
        ["train", "--data", str(work / "missing"), "--out", out("a")],
        ["train", "--data", str(data), "--out", out("b"), "--backbone", "resnet1800"],
        ["train", "--data", str(data), "--out", out("c"), "--epochs", "0"],
        ["train", "--data", str(data), "--out", out("d"), "--threshold", "sensitivity:2"],
        ["train", "--data", str(data), "--out", out("e"), "--config", str(yaml_bad)],
        ["train", "--data", str(data), "--out", out("f"), "--config", str(yaml_unknown)],
        ["train", "--data", str(data), "--out", out("g"), "--set", "nonsense=1"],
        ["train", "--data", str(data), "--out", str(run_dir)],  # a finished run is never overwritten
        ["train", "--resume", str(work / "missing-run")],
        ["predict", "--run", str(work / "missing-run"), str(junk)],
        ["predict", "--run", str(run_dir), str(work / "missing.png")],
        ["predict", "--run", str(run_dir), str(junk)],
        ["evaluate", "--run", str(run_dir), "--data", str(work / "missing"), "--out", out("h")],
        ["explain", "--run", str(run_dir), str(junk), "--out", out("j"), "--method", "lime"],
        ["export", "--run", str(work / "missing-run")],
        ["recalibrate", "--run", str(run_dir), "--data", str(data), "--out", out("i"), "--fit-fraction", "1.5"],
    ]


def clean_refusal(result: subprocess.CompletedProcess) -> bool:
    lines = [line for line in result.stderr.splitlines() + result.stdout.splitlines() if line.strip()]
    return result.returncode == 1 and "Traceback" not in result.stderr and len(
        [line for line in result.stderr.splitlines() if line.strip()]) == 1 and bool(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    rng = random.Random(options.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "chest_xray"
        generate_demo_dataset(data, patients_per_class=8, images_per_patient=(1, 2), val_patients_per_class=2,
                              test_patients_per_class=3, image_size=48, seed=0)
        started = time.perf_counter()
        reference = run("train", "--data", data, "--out", work / "reference", "--cache-dir", work / "cache0", *ARGS)
        seconds = time.perf_counter() - started
        if reference.returncode != 0:
            raise SystemExit(f"the uninterrupted run failed: {reference.stderr.strip()}")
        auc, losses = outcome(work / "reference")
        completed, lost, landed, auc_diff, loss_diff, errors = 0, 0, 0, 0.0, 0.0, []
        for i in range(options.kills):
            folder, cache = work / f"run{i}", work / f"cache{i + 1}"
            landed += killed_run(data, folder, cache, rng.uniform(0.5, 0.9 * seconds))
            error = finish(data, folder, cache)
            if error is not None:
                lost += 1
                errors.append(error)
                continue
            completed += 1
            run_auc, run_losses = outcome(folder)
            auc_diff = max(auc_diff, abs(run_auc - auc))
            loss_diff = max([loss_diff] + [abs(a - b) for a, b in zip(run_losses, losses)] + ([float("inf")] if len(run_losses) != len(losses) else []))
        cases = bad_inputs(work, data, work / "reference")
        unclean = [" ".join(case[:1] + case[1:4]) for case in cases if not clean_refusal(run(*case))]
        print(json.dumps({
            "bad_input_cases": len(cases), "bad_input_clean": len(cases) - len(unclean), "bad_input_unclean": unclean,
            "kills": options.kills, "kills_landed": landed, "runs_completed": completed, "runs_lost": lost,
            "max_abs_diff_final_val_auc": auc_diff, "max_abs_diff_val_loss": loss_diff,
            "reference_seconds": round(seconds, 1), "reference_val_auc": auc, "errors": errors[:3],
        }))


if __name__ == "__main__":
    main()
