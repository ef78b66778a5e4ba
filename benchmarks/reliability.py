"""Kill training with SIGKILL at points drawn over the whole run and resume it each time; print one JSON line.

An uninterrupted run of a small demo dataset is the reference. Then, ``--kills`` times, a
run is started and killed with SIGKILL at a point drawn uniformly from :data:`KILL_POINTS`
(each in a random epoch): inside a training batch, inside validation, after the epoch's
history row is computed but before its checkpoint, half-way through writing the checkpoint,
right after the checkpoint's rename (before the best weights and history.csv), between the
best weights and history.csv, between two epochs, during evaluation, while writing the
outputs, or at a moment drawn uniformly over the reference's duration with a fresh image
cache (``time``: cache build included). The points inside an epoch are hooks installed in
the killed process (:func:`install_kill`, also used by the tests), so the narrow windows of
the epoch's commit are hit as often as the wide ones. Then ``train --resume`` runs until the
run finishes, and its per-epoch validation losses are compared with the reference's.

    python benchmarks/reliability.py --kills 30      # every point about three times (~30 min on 2 CPU cores)
    python benchmarks/reliability.py --kills 8       # a quick run

A resumed run is ``exact`` when every epoch's validation loss equals the reference's to 1e-6
(and it has as many epochs), ``refused`` when the resume ends with exit code 1 and one line
on stderr (a clean refusal), a ``mismatch`` otherwise (a different loss, a crash or a
traceback). A kill whose run finished before its point came (``landed`` false) is not counted.

It also runs every bad-input case of the CLI below (``BAD_INPUTS``) and counts those that
end as the project promises: exit code 1 and one line on stderr, no traceback.

Output: kills, kills_landed, resumed_exact, refused, mismatches, max_abs_diff_val_loss,
max_abs_diff_final_val_auc, per point [landed, exact, refused, mismatch], the first
mismatches and refusals, the reference's seconds and val losses; bad_input_cases,
bad_input_clean and the commands of any case that was not clean.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medtransfer.data.synthetic import generate_demo_dataset  # noqa: E402

EPOCHS = 3
ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--set", "cache_size=40",
        "--batch-size", "8", "--bootstrap", "20", "--num-workers", "0", "--no-progress", "--epochs", str(EPOCHS),
        "--patience", "5", "--precision", "32-true", "--accelerator", "cpu", "--lr", "0.003"]
KILL_ENV = "MEDTRANSFER_RELIABILITY_KILL"  # POINT:EPOCH:INDEX, read by the killed process (killed_cli)
TOLERANCE = 1e-6

# Where a kill lands. Epoch points take the 1-based epoch; "train-batch" and "validation" an index too.
KILL_POINTS = (
    "train-batch", "validation", "before-checkpoint", "checkpoint-write", "after-checkpoint", "after-best",
    "after-epoch", "evaluation", "outputs", "time",
)


def sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(
    point: str, epoch: int = 1, index: int = 0, die: Callable[[], None] = sigkill, patch: Callable = setattr
) -> None:
    """Patch the training code in this process so that `die` runs at `point` of 1-based `epoch`.

    `patch(owner, name, value)` replaces a method or module attribute: ``setattr`` in a process
    about to train and die, ``monkeypatch.setattr`` in a test (undone after it)."""
    from medtransfer.safeio import atomic_path
    from medtransfer.train import outputs, pipeline
    from medtransfer.train.callbacks import HistoryWriter
    from medtransfer.train.checkpointing import AtomicCheckpointIO, EpochSeeding
    from medtransfer.train.tracking import EpochAUC

    def at(trainer) -> bool:
        return trainer.current_epoch == epoch - 1

    if point == "train-batch":
        original = EpochSeeding.on_train_batch_start

        def hook(self, trainer, pl_module, batch, batch_idx):
            if at(trainer) and batch_idx == index:
                die()
            original(self, trainer, pl_module, batch, batch_idx)

        patch(EpochSeeding, "on_train_batch_start", hook)
    elif point == "validation":
        original = EpochAUC.on_validation_batch_end

        def hook(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            original(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
            if at(trainer) and not trainer.sanity_checking and batch_idx == index:
                die()

        patch(EpochAUC, "on_validation_batch_end", hook)
    elif point == "before-checkpoint":  # the row is computed (history.csv was written here before the fix)
        original = HistoryWriter.on_train_epoch_end

        def hook(self, trainer, pl_module):
            original(self, trainer, pl_module)
            if at(trainer):
                die()

        patch(HistoryWriter, "on_train_epoch_end", hook)
    elif point in ("checkpoint-write", "after-checkpoint"):
        original = AtomicCheckpointIO.save_checkpoint

        def hook(self, checkpoint, path, storage_options=None):
            if int(checkpoint.get("epoch", -1)) == epoch - 1 and point == "checkpoint-write":
                with atomic_path(Path(path)) as temporary:  # half a checkpoint on disk, under its temporary name
                    temporary.write_bytes(b"PK\x03\x04" + os.urandom(4096))
                    die()
            original(self, checkpoint, path, storage_options)
            if int(checkpoint.get("epoch", -1)) == epoch - 1:
                die()

        patch(AtomicCheckpointIO, "save_checkpoint", hook)
    elif point == "after-best":  # best weights written (when the epoch improved), history.csv not yet
        original = HistoryWriter.write_files

        def hook(self):
            if self.rows and int(self.rows[-1]["epoch"]) == epoch:
                die()
            original(self)

        patch(HistoryWriter, "write_files", hook)
    elif point == "after-epoch":
        original = HistoryWriter.on_train_epoch_start

        def hook(self, trainer, pl_module):
            if trainer.current_epoch == epoch:  # the next epoch begins
                die()
            original(self, trainer, pl_module)

        patch(HistoryWriter, "on_train_epoch_start", hook)
    elif point == "evaluation":
        patch(pipeline, "evaluate_model", lambda *args, **kwargs: die())
    elif point == "outputs":  # metrics.json written, the report (the mark of a finished run) not yet
        original = outputs.write_metrics

        def hook(*args, **kwargs):
            original(*args, **kwargs)
            die()

        patch(outputs, "write_metrics", hook)
    else:
        raise ValueError(f"unknown kill point {point!r}; one of {', '.join(KILL_POINTS)}")


def killed_cli() -> None:
    """`medtransfer` with the kill of $MEDTRANSFER_RELIABILITY_KILL installed (a subprocess's entry point)."""
    point, epoch, index = os.environ[KILL_ENV].split(":")
    install_kill(point, int(epoch), int(index))
    from medtransfer.cli import main

    sys.argv = ["medtransfer", *sys.argv[1:]]
    main()


KILLED_SCRIPT = "from benchmarks.reliability import killed_cli; killed_cli()"


def command(*args, killed: bool = False) -> list[str]:
    if killed:
        return [sys.executable, "-c", KILLED_SCRIPT, *map(str, args)]
    return [sys.executable, "-m", "medtransfer.cli", *map(str, args)]


def environment(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]), **extra}


def run(*args, killed: str | None = None, cwd: Path | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = environment(**({KILL_ENV: killed} if killed else {}))
    return subprocess.run(command(*args, killed=bool(killed)), env=env, capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def val_losses(folder: Path) -> list[float]:
    path = folder / "history.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [float(row["val_loss"]) for row in csv.DictReader(handle)]


def final_auc(folder: Path) -> float:
    return json.loads((folder / "metrics.json").read_text())["val"]["auc"]


def clean_refusal(result: subprocess.CompletedProcess) -> bool:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return result.returncode == 1 and "Traceback" not in result.stderr and len(lines) == 1


def killed_at_time(data: Path, folder: Path, cache: Path, delay: float) -> bool:
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


def resume(data: Path, folder: Path, cache: Path) -> subprocess.CompletedProcess | None:
    """Resume (or restart, when the kill came before the run's marker config.yaml); None when it had finished."""
    if (folder / "metrics.json").is_file() and (folder / "report.html").is_file():
        return None
    if not (folder / "config.yaml").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        return run("train", "--data", data, "--out", folder, "--cache-dir", cache, *ARGS)
    return run("train", "--resume", folder)


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
        ["train", "--resume", str(run_dir), "--batch-size", "3"],  # changes the effective batch
        ["predict", "--run", str(work / "missing-run"), str(junk)],
        ["predict", "--run", str(run_dir), str(work / "missing.png")],
        ["predict", "--run", str(run_dir), str(junk)],
        ["evaluate", "--run", str(run_dir), "--data", str(work / "missing"), "--out", out("h")],
        ["explain", "--run", str(run_dir), str(junk), "--out", out("j"), "--method", "lime"],
        ["export", "--run", str(work / "missing-run")],
        ["recalibrate", "--run", str(run_dir), "--data", str(data), "--out", out("i"), "--fit-fraction", "1.5"],
    ]


def draw_kills(rng: random.Random, kills: int) -> list[tuple[str, int, int]]:
    """(point, epoch, index) per kill: the points in turn (shuffled), the epoch and index drawn."""
    points = [KILL_POINTS[i % len(KILL_POINTS)] for i in range(kills)]
    rng.shuffle(points)
    return [(point, rng.randint(1, EPOCHS), rng.randint(0, 1)) for point in points]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    rng = random.Random(options.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "chest_xray"
        generate_demo_dataset(data, patients_per_class=8, images_per_patient=(1, 2), val_patients_per_class=2,
                              test_patients_per_class=3, image_size=48, seed=0)
        cache = work / "cache"
        started = time.perf_counter()
        reference = run("train", "--data", data, "--out", work / "reference", "--cache-dir", cache, *ARGS)
        seconds = time.perf_counter() - started
        if reference.returncode != 0:
            raise SystemExit(f"the uninterrupted run failed: {reference.stderr.strip()}")
        expected, auc = val_losses(work / "reference"), final_auc(work / "reference")
        per_point = {point: [0, 0, 0, 0] for point in KILL_POINTS}  # landed, exact, refused, mismatch
        landed = exact = refused = mismatched = 0
        loss_diff = auc_diff = 0.0
        mismatches, refusals = [], []
        for i, (point, epoch, index) in enumerate(draw_kills(rng, options.kills)):
            folder = work / f"run{i}"
            where = f"{point}:{epoch}:{index}"
            if point == "time":
                run_cache = work / f"cache{i}"  # fresh: the kill may land in the cache build too
                hit = killed_at_time(data, folder, run_cache, rng.uniform(0.5, 0.95 * seconds))
                where = "time"
            else:
                run_cache = cache
                killed = run("train", "--data", data, "--out", folder, "--cache-dir", cache, *ARGS, killed=where)
                hit = killed.returncode == -signal.SIGKILL
            if not hit:
                continue
            landed += 1
            per_point[point][0] += 1
            resumed = resume(data, folder, run_cache)
            if resumed is not None and resumed.returncode != 0:
                if clean_refusal(resumed):
                    refused += 1
                    per_point[point][2] += 1
                    refusals.append(f"{where}: {resumed.stderr.strip()}")
                else:
                    mismatched += 1
                    per_point[point][3] += 1
                    mismatches.append(f"{where}: exit {resumed.returncode}: {resumed.stderr.strip().splitlines()[-1:]}")
                continue
            losses = val_losses(folder)
            diff = max([abs(a - b) for a, b in zip(losses, expected)] or [0.0])
            diff = diff if len(losses) == len(expected) else float("inf")
            loss_diff = max(loss_diff, diff)
            auc_diff = max(auc_diff, abs(final_auc(folder) - auc))
            if diff <= TOLERANCE:
                exact += 1
                per_point[point][1] += 1
            else:
                mismatched += 1
                per_point[point][3] += 1
                mismatches.append(f"{where}: val losses {[round(v, 6) for v in losses]}")
        cases = bad_inputs(work, data, work / "reference")
        unclean = [" ".join(case[:1] + case[1:4]) for case in cases if not clean_refusal(run(*case))]
        print(json.dumps({
            "kills": options.kills, "kills_landed": landed, "resumed_exact": exact, "refused": refused,
            "mismatches": mismatched, "max_abs_diff_val_loss": loss_diff, "max_abs_diff_final_val_auc": auc_diff,
            "per_point_landed_exact_refused_mismatch": per_point, "mismatch_examples": mismatches[:3],
            "refusal_examples": refusals[:3], "reference_seconds": round(seconds, 1),
            "reference_val_losses": [round(v, 6) for v in expected], "reference_val_auc": auc,
            "bad_input_cases": len(cases), "bad_input_clean": len(cases) - len(unclean), "bad_input_unclean": unclean,
        }))


if __name__ == "__main__":
    main()
