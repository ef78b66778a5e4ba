"""`medtransfer predict`: class probabilities for new images from a saved model (no pickle)."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medtransfer.artifacts import Decision, SavedModel
from medtransfer.data.discover import IMAGE_SUFFIXES
from medtransfer.errors import ConfigError, DataError
from medtransfer.ood import ScoredModel
from medtransfer.runtime import autocast, default_num_workers, device_for, resolve_accelerator, resolve_precision


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
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


@dataclass
class Classifier:
    """The saved model on a device at a precision: preprocessed images in, decisions out."""

    saved: SavedModel
    device: torch.device
    precision: str

    @classmethod
    def on(cls, saved: SavedModel, *, accelerator: str = "auto", precision: str = "auto") -> Classifier:
        device = device_for(accelerator)
        precision = resolve_precision(precision, resolve_accelerator(accelerator))
        saved.network.eval().to(device).to(memory_format=torch.channels_last)  # members x TTA views
        return cls(saved, device, precision)

    def __call__(self, images: torch.Tensor) -> Decision:
        with torch.inference_mode(), autocast(self.device, self.precision):
            logits = self.saved.network(images.to(self.device).contiguous(memory_format=torch.channels_last))
        return self.saved.decide(logits)

    def scored(self, images: torch.Tensor) -> tuple[Decision, np.ndarray | None]:
        """The decision and, when the model has an OOD detector, each image's ood_score (one forward pass)."""
        if self.saved.ood is None:
            return self(images), None
        with torch.inference_mode(), autocast(self.device, self.precision):
            logits, scores = ScoredModel(self.saved.network, self.saved.ood)(
                images.to(self.device).contiguous(memory_format=torch.channels_last)
            )
        return self.saved.decide(logits), scores.float().cpu().numpy()


def decision_row(saved: SavedModel, path: str, decision: Decision, i: int, scores: np.ndarray | None = None) -> dict:
    """path, prob_<class> per class, pred (and ood_score, ood = in/out with a detector): one image's row."""
    row = {"path": path}
    row.update({f"prob_{c}": float(decision.probabilities[i, k]) for k, c in enumerate(saved.classes)})
    row["pred"] = saved.classes[int(decision.predicted[i])]
    if scores is not None:
        row["ood_score"] = float(scores[i])
        row["ood"] = "out" if saved.ood.flags(scores[i]) else "in"
    return row


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
) -> Iterator[dict]:
    """predict_files' rows, in input order, as each batch is done: memory stays bounded for any number of files.

    Files are decoded in `num_workers` DataLoader processes while the model runs;
    `progress(n)` is called with the number of files each batch consumed. A bad file
    stops the stream with a DataError naming the bad files of its batch, unless `skip_bad`.
    With `onnx_path` (the exported model) the batches run in onnxruntime instead of torch.
    """
    device = device_for(accelerator)
    precision = resolve_precision(precision, resolve_accelerator(accelerator))
    outputs_of = onnx_outputs(onnx_path, saved) if onnx_path is not None else None
    model = saved.network.eval().to(device).to(memory_format=torch.channels_last)  # members x TTA views
    scored = ScoredModel(model, saved.ood) if saved.ood is not None else None  # logits and ood_score in one pass
    loader = DataLoader(
        _DecodedFiles(paths, saved), batch_size=batch_size,
        num_workers=num_workers, collate_fn=_collate, pin_memory=device.type == "cuda",
    )
    for indices, images, bad in loader:
        if bad and not skip_bad:
            raise DataError(f"{len(bad)} unreadable image(s): {'; '.join(bad[:5])}. Use --skip-bad-images to leave them out")
        if progress is not None:
            progress(len(indices) + len(bad))
        if not indices:
            continue
        if outputs_of is not None:
            logits, scores = outputs_of(images)
        else:
            with torch.inference_mode(), autocast(device, precision):
                batch = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                logits, scores = scored(batch) if scored is not None else (model(batch), None)
                logits = logits.float().cpu().numpy()
                scores = None if scores is None else scores.float().cpu().numpy()
        decision = saved.decide(logits)
        for row, index in enumerate(indices):
            yield decision_row(saved, str(paths[index]), decision, row, scores)


def write_rows(rows: Iterable[dict], path: Path) -> int:
    """Write rows to a CSV as they come (a stream is never held in memory); returns how many."""
    count = 0
    with path.open("w", newline="") as handle:
        writer = None
        for row in rows:
            if writer is None:
                writer = csv.DictWriter(handle, fieldnames=list(row))
                writer.writeheader()
            writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
            count += 1
    return count



def _onnx_session(path: Path):
    if not path.is_file():
        raise ConfigError(f"--runtime onnxruntime: {path} does not exist; run `medtransfer export --run RUN` first")
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("--runtime onnxruntime needs onnxruntime: pip install onnxruntime") from None
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_logits(path: Path) -> Callable[[torch.Tensor], np.ndarray]:
    """A function batch -> logits running the model exported by `medtransfer export` in onnxruntime (CPU)."""
    session = _onnx_session(path)
    return lambda images: session.run(["logits"], {"image": images.float().numpy()})[0]


def onnx_outputs(path: Path, saved: SavedModel) -> Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray | None]]:
    """Like :func:`onnx_logits`, plus the graph's ood_score when the model has an OOD detector."""
    session = _onnx_session(path)
    if saved.ood is None:
        return lambda images: (session.run(["logits"], {"image": images.float().numpy()})[0], None)
    if "ood_score" not in {output.name for output in session.get_outputs()}:  # exported before the detector existed
        raise ConfigError(f"--runtime onnxruntime: {path} has no ood_score output; run `medtransfer export --run RUN` again")
    return lambda images: tuple(session.run(["logits", "ood_score"], {"image": images.float().numpy()}))


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
                                          onnx_path=onnx_path):
                if keep is None or len(kept) < keep:
                    kept.append(row)
                yield row

        if csv_path is not None:
            write_rows(rows(), csv_path)
        else:
            for _ in rows():
                pass
    return kept
