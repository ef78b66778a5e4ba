"""`medtransfer predict`: class probabilities for new images from a saved model (no pickle).

One row per image. Single-label: ``path, prob_<class>..., pred``. Multi-label (the model's
task asks): ``path, prob_<finding>..., pred_<finding>... (0/1 at the finding's saved threshold),
findings`` (those called, ``|``-joined, most probable first). Both add ``ood_score, ood`` when the
model has an OOD detector.
"""

from __future__ import annotations

import copy
import csv
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader, Dataset

from medtransfer.artifacts import Decision, SavedModel, find_model_dir
from medtransfer.data.discover import IMAGE_SUFFIXES
from medtransfer.errors import ConfigError, DataError, missing_extra
from medtransfer.models.inference import override_warning
from medtransfer.ood import ScoredModel
from medtransfer.runtime import (
    autocast, default_num_workers, device_for, map_in_order, place_batch, place_model, resolve_accelerator,
    resolve_precision,
)
from medtransfer.task import join_findings


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders expanded to the images inside them (sorted, hidden files skipped)."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths.extend(
                sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            )
        elif item.is_file():
            paths.append(item)
        else:
            raise DataError(f"PATH {item}: no such file or folder; pass image files or folders of images")
    if not paths:
        raise DataError(f"PATH {', '.join(map(str, inputs))}: no images found (.jpg, .jpeg, .png, .bmp, .tif, .dcm)")
    return paths


Outputs = Callable[[torch.Tensor], tuple[np.ndarray, "np.ndarray | None"]]  # batch -> (logits, ood_score or None)


@dataclass
class Classifier:
    """The saved model on a device at a precision, or an onnxruntime session: preprocessed images in, decisions out."""

    saved: SavedModel
    device: torch.device
    precision: str
    session_outputs: Outputs | None = None  # onnxruntime's (the CPU); None: the torch model

    @classmethod
    def on(cls, saved: SavedModel, *, accelerator: str = "auto", precision: str = "auto",
           device: torch.device | None = None, onnx_path: Path | None = None, threads: int = 0) -> Classifier:
        """On ``device`` (default: the accelerator's); with ``onnx_path`` the batches run in onnxruntime
        (``threads`` intra-op threads, 0: its default) while the torch model stays on the CPU for heatmaps."""
        if onnx_path is not None:
            return cls(saved, torch.device("cpu"), "32-true", onnx_outputs(onnx_path, saved, threads=threads))
        device = device or device_for(accelerator)
        precision = resolve_precision(precision, "gpu" if device.type == "cuda" else "cpu")
        place_model(saved.network.eval(), device)  # members x TTA views
        return cls(saved, device, precision)

    @property
    def runtime(self) -> str:
        return "torch" if self.session_outputs is None else "onnxruntime"

    def outputs(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 logits and, when the model has an OOD detector, each image's ood_score (one forward pass)."""
        if self.session_outputs is not None:
            return self.session_outputs(images)
        network = self.saved.network if self.saved.ood is None else ScoredModel(self.saved.network, self.saved.ood)
        with torch.inference_mode(), autocast(self.device, self.precision):
            out = network(place_batch(images, self.device))
        logits, scores = out if self.saved.ood is not None else (out, None)
        return logits.float().cpu().numpy(), None if scores is None else scores.float().cpu().numpy()

    def __call__(self, images: torch.Tensor) -> Decision:
        return self.scored(images)[0]

    def scored(self, images: torch.Tensor) -> tuple[Decision, np.ndarray | None]:
        """The decision and, with an OOD detector, each image's ood_score (else None)."""
        logits, scores = self.outputs(images)
        return self.saved.decide(logits), scores


def with_tta_override(saved: SavedModel, tta: str | None, console: Console) -> SavedModel:
    """`saved` with another test-time augmentation (None: as saved), warning that the operating point differs."""
    changed = saved.with_tta(tta)
    if changed is not saved:
        console.print(override_warning(saved.info.tta, changed.info.tta), markup=False, highlight=False)
    return changed


def decision_row(saved: SavedModel, path: str | None, decision: Decision, i: int,
                 scores: np.ndarray | None = None) -> dict[str, Any]:
    """path, prob_<class> per class, pred (and ood_score, ood = in/out with a detector): one image's row.
    Multi-label: path, prob_<finding>..., pred_<finding>... (0/1), findings (called, most probable first)."""
    row: dict[str, Any] = {"path": path}
    row.update({f"prob_{c}": float(decision.probabilities[i, k]) for k, c in enumerate(saved.classes)})
    if saved.task.multilabel:
        row.update({f"pred_{c}": int(decision.predicted[i, k]) for k, c in enumerate(saved.classes)})
        row["findings"] = join_findings(called_findings(saved.classes, decision.probabilities[i], decision.predicted[i]))
    else:
        row["pred"] = saved.classes[int(decision.predicted[i])]
    if scores is not None:
        assert saved.ood is not None, "ood scores come only from a model with a detector"
        row["ood_score"] = float(scores[i])
        row["ood"] = "out" if saved.ood.flags(scores[i]) else "in"
    return row


def called_findings(findings: list[str], probabilities, predicted) -> list[str]:
    """The findings called (predicted 1), most probable first (ties in the model's order)."""
    order = sorted(range(len(findings)), key=lambda k: -float(probabilities[k]))
    return [findings[k] for k in order if predicted[k]]


def predict_files(saved: SavedModel, paths: list[Path], **options) -> list[dict]:
    """One row per image: path, calibrated probability per class, predicted class (saved threshold),
    and with an OOD detector ood_score (higher = more foreign) and ood ("out" above its threshold).

    `options` are :func:`stream_predictions`' (batch_size, accelerator, precision, skip_bad, ...).
    """
    return list(stream_predictions(saved, paths, **options))


# --------------------------------------------------------------------------- streaming


class _DecodedFiles(Dataset):
    """Decodes one file per item in a DataLoader worker; a bad file yields its reason instead of pixels."""

    def __init__(self, paths: list[Path], saved: SavedModel):
        self.paths, self.saved = paths, saved

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.saved.preprocess(self.paths[index]), None  # exactly as evaluation prepares images
        except DataError as exc:
            return index, None, str(exc).split("; fix or remove")[0]  # "<path>: not a readable image (reason)"


def _collate(items: list) -> tuple[list[int], torch.Tensor | None, list[str]]:
    kept = [(i, t) for i, t, _ in items if t is not None]
    bad = [reason for _, t, reason in items if t is None]
    return [i for i, _ in kept], (torch.stack([t for _, t in kept]) if kept else None), bad


def stream_predictions(
    saved: SavedModel,
    paths: list[Path],
    *,
    batch_size: int = 32,
    accelerator: str = "auto",
    precision: str = "auto",
    skip_bad: bool = False,
    num_workers: int = 0,
    progress: Callable[[int], None] | None = None,
    onnx_path: Path | None = None,
    devices: list[torch.device] | None = None,
) -> Iterator[dict]:
    """predict_files' rows, in input order, as each batch is done: memory stays bounded for any number of files.

    Files are decoded in `num_workers` DataLoader processes while the model runs;
    `progress(n)` is called with the number of files each batch consumed. A bad file
    stops the stream with a DataError naming the bad files of its batch, unless `skip_bad`.
    With `onnx_path` (the exported model) the batches run in onnxruntime instead of torch.
    With several `devices` (GPUs) each runs a copy of the model on every n-th batch.
    """
    if onnx_path is not None:
        classifiers = [Classifier.on(saved, onnx_path=onnx_path)]
    else:
        targets = devices or [device_for(accelerator)]
        copies = [saved, *(copy.deepcopy(saved) for _ in targets[1:])]  # every member and the detector
        classifiers = [Classifier.on(own, precision=precision, device=d) for own, d in zip(copies, targets)]
    loader = DataLoader(
        _DecodedFiles(paths, saved), batch_size=batch_size,
        num_workers=num_workers, collate_fn=_collate, pin_memory=classifiers[0].device.type == "cuda",
    )

    def run(slot: int, batch: tuple) -> tuple:
        indices, images, bad = batch
        return indices, bad, (classifiers[slot].outputs(images) if indices else None)

    for indices, bad, outputs in map_in_order(run, loader, len(classifiers)):
        if bad and not skip_bad:
            raise DataError(f"{len(bad)} unreadable image(s): {'; '.join(bad[:5])}. Use --skip-bad-images to leave them out")
        if progress is not None:
            progress(len(indices) + len(bad))
        if not indices:
            continue
        decision = saved.decide(outputs[0])
        for row, index in enumerate(indices):
            yield decision_row(saved, str(paths[index]), decision, row, outputs[1])


def write_rows(rows: Iterable[dict], path: Path) -> int:
    """Write rows to a CSV as they come (a stream is never held in memory); returns how many.
    UTF-8; a file name that is not UTF-8 is kept byte for byte (surrogateescape), as split.csv keeps it."""
    count = 0
    with path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = None
        for row in rows:
            if writer is None:
                writer = csv.DictWriter(handle, fieldnames=list(row))
                writer.writeheader()
            writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
            count += 1
    return count


def prediction_table(saved: SavedModel, rows: list[dict]):
    """The console table of `medtransfer predict` (rich): single-label, p(class) per class and the
    predicted class; multi-label, the findings called with their probabilities. ood_score when scored."""
    from rich.table import Table

    scored = saved.ood is not None
    table = Table()
    table.add_column("path", overflow="fold")
    multilabel = saved.task.multilabel
    if multilabel:
        table.add_column("findings (p >= the finding's threshold)", overflow="fold")
    else:
        for c in saved.classes:
            table.add_column(f"p({c})", justify="right")
        table.add_column("predicted")
    if scored:
        table.add_column("ood_score", justify="right")
    for row in rows:
        ood = [f"{row['ood_score']:.3f}" + (" FOREIGN" if row["ood"] == "out" else "")] if scored else []
        if multilabel:
            called = called_findings(saved.classes, [row[f"prob_{f}"] for f in saved.classes],
                                     [row[f"pred_{f}"] for f in saved.classes])
            table.add_row(row["path"], ", ".join(f"{f} {row[f'prob_{f}']:.3f}" for f in called) or "none", *ood)
        else:
            table.add_row(row["path"], *[f"{row[f'prob_{c}']:.4f}" for c in saved.classes], row["pred"], *ood)
    return table


def operating_point_text(saved: SavedModel) -> str:
    """One line naming the saved operating point (printed under the table)."""
    info = saved.info
    if saved.task.multilabel:
        assert info.thresholds is not None, "a saved multi-label model has thresholds (checked on save and load)"
        pairs = ", ".join(f"{f} {t:.3f}" for f, t in zip(info.classes, info.thresholds))
        return f"thresholds per finding on p(finding): {pairs}"
    return f"threshold {info.threshold:.3f} on p({info.positive_class})"


RUNTIMES = ("torch", "onnxruntime")
ONNX_TOLERANCE = 1e-4  # largest probability difference from torch that a runtime may have


def onnx_file(runtime: str, run: str | Path, onnx: Path | None = None) -> Path | None:
    """The ONNX file `--runtime onnxruntime` runs (--onnx, else RUN/model/model.onnx); None for torch."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime: got {runtime!r}; choose torch or onnxruntime")
    if runtime == "torch":
        if onnx is not None:
            raise ConfigError(f"--onnx {onnx}: only used with --runtime onnxruntime; add it or leave --onnx out")
        return None
    return onnx or find_model_dir(run) / "model.onnx"


def _onnx_session(path: Path, threads: int = 0):
    if not path.is_file():
        raise ConfigError(f"--runtime onnxruntime: {path} does not exist; run `medtransfer export --run RUN` first "
                          "(or pass --onnx FILE)")
    try:
        import onnxruntime
    except ImportError:
        raise missing_extra("--runtime onnxruntime", "onnx") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for a corrupt or foreign file
        reason = str(exc).strip().splitlines()[0][:200]
        raise ConfigError(f"--onnx {path}: onnxruntime cannot load it ({reason}); "
                          "write it again with `medtransfer export --run RUN`") from None


def onnx_outputs(path: Path, saved: SavedModel, *, threads: int = 0) -> Outputs:
    """batch -> (logits, ood_score or None) in onnxruntime (CPU), from the file `medtransfer export` writes.

    Checked once against the torch model on a random batch: a file exported from another
    model (or before a retraining) is refused instead of answering with other probabilities."""
    session = _onnx_session(path, threads)
    names = {output.name for output in session.get_outputs()}
    if saved.ood is not None and "ood_score" not in names:  # exported before the detector existed
        raise ConfigError(f"--runtime onnxruntime: {path} has no ood_score output; run `medtransfer export --run RUN` again")
    wanted = ["logits"] + (["ood_score"] if saved.ood is not None else [])

    def outputs(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        result = session.run(wanted, {"image": images.float().cpu().numpy()})
        return result[0], (result[1] if len(result) > 1 else None)

    _check_against_torch(saved, outputs, path)
    return outputs


def _check_against_torch(saved: SavedModel, outputs: Outputs, path: Path) -> None:
    size, channels = saved.info.image_size, saved.info.in_channels
    batch = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    try:
        logits = outputs(batch)[0]
    except Exception as exc:  # a graph for another input size or channel count
        raise ConfigError(f"--onnx {path}: does not take this model's {channels} x {size} x {size} images "
                          f"({str(exc).splitlines()[0][:120]}); export it again from this run") from None
    reference = Classifier(saved, next(saved.model.parameters()).device, "32-true")
    gap = float(np.abs(saved.decide(logits).probabilities - reference(batch).probabilities).max())
    if gap > ONNX_TOLERANCE:
        raise ConfigError(f"--onnx {path}: its probabilities differ from the saved model's by {gap:.1e} "
                          "(exported from another model or before retraining); export it again from this run")


def predict_with_progress(
    saved: SavedModel,
    paths: list[Path],
    *,
    csv_path: Path | None,
    batch_size: int = 32,
    accelerator: str = "auto",
    skip_bad: bool = False,
    num_workers: int = -1,
    keep: int | None = None,
    console=None,
    onnx_path: Path | None = None,
    devices: list[torch.device] | None = None,
) -> list[dict]:
    """`medtransfer predict`: stream rows into `csv_path` under a progress bar (images/s); return the first `keep` rows (all when None)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    workers = num_workers if num_workers >= 0 else default_num_workers(resolve_accelerator(accelerator))
    columns = (TextColumn("predict"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn())
    kept: list[dict] = []
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("predict", total=len(paths), rate="-")

        def advance(n: int) -> None:
            bar.update(task, advance=n)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:.1f}" if speed else "-")

        def rows() -> Iterator[dict]:
            for row in stream_predictions(saved, paths, batch_size=batch_size, accelerator=accelerator,
                                          skip_bad=skip_bad, num_workers=workers, progress=advance,
                                          onnx_path=onnx_path, devices=devices):
                if keep is None or len(kept) < keep:
                    kept.append(row)
                yield row

        if csv_path is not None:
            write_rows(rows(), csv_path)
        else:
            for _ in rows():
                pass
    return kept
