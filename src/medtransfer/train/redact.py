"""`medtransfer redact RUN`: a run folder written before privacy by default (or with --keep-identifiers) made
shareable in place, as a new run writes it (privacy.py).

What changes: metrics.json (leakage examples and near-duplicate pairs, border captions: paths relative to the
data folder, patient IDs hashed), near-duplicate thumbnails copied into ``plots/leakage/`` from the run's own
images (those split.csv lists; nothing else is read), the gallery's file names (no image stems) and
gallery.json, model.json's ``training_config`` (no cache folder, data by its last part), the settings under
``logs/`` (CSV and MLflow), ``keep_identifiers: false`` in config.yaml, and report.html written again. Member
and fold runs inside the folder (``members/*``, ``folds/*``, ``refit``) are redacted too.

Working files stay as they are: config.yaml and split.csv (absolute paths), predictions_*.csv (paths and
patient IDs). Every file is replaced atomically (temporary file, rename) under the run's lock, in an order
that keeps the folder consistent; a redaction cut short is finished by running it again (it is idempotent).
"""

from __future__ import annotations

import html
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from medtransfer.artifacts import MODEL_DIR, MODEL_JSON, read_model_info, replace_fields
from medtransfer.errors import DataError
from medtransfer.evaluation.report import write_report
from medtransfer.evaluation.report_findings import write_pair_thumbnails
from medtransfer.privacy import Identities, deidentify_metrics, run_identities, shareable_settings
from medtransfer.rundir import CONFIG_FILE, GALLERY_FILE, METRICS_FILE, RunDir, write_metrics
from medtransfer.safeio import FolderLock, atomic_path, write_text_atomic, write_yaml_atomic

__all__ = ["Redacted", "redact_run"]

NESTED = ("members/*", "folds/*", "refit")  # run folders a run folder may hold


@dataclass(frozen=True)
class Redacted:
    """One run folder and the files rewritten in it (empty: it was clean already)."""

    run: Path
    changed: tuple[str, ...]


def redact_run(run_dir: str | Path, *, cache_dir: str | Path | None = None, lock: bool = True) -> list[Redacted]:
    """Redact `run_dir` and the runs inside it; `cache_dir`: where the patient salt lives (default: the run's).
    `lock`: take the run's lock (False for a caller that holds it, e.g. a pipeline finishing its own folder).

    Raises:
        DataError: `run_dir` holds no metrics.json (not a run or evaluation folder).
        ConfigError: the run is in use (its lock is held, e.g. still training).
    """
    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise DataError(f"redact {run_dir}: no {METRICS_FILE}; pass a folder written by `medtransfer train` or `evaluate`")
    if lock:
        with FolderLock(run_dir, what="redact"):
            done = [Redacted(run_dir, tuple(_redact(run_dir, cache_dir)))]
    else:
        done = [Redacted(run_dir, tuple(_redact(run_dir, cache_dir)))]
    for pattern in NESTED:
        for inner in sorted(run_dir.glob(pattern)):
            if (inner / METRICS_FILE).is_file():
                done += redact_run(inner, cache_dir=cache_dir)
    return done


def _redact(run_dir: Path, cache_dir: str | Path | None) -> list[str]:
    folder = RunDir(run_dir)
    ids = run_identities(run_dir, cache_dir=cache_dir)
    changed = []
    metrics = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
    pairs = (metrics.get("leakage") or {}).get("near_duplicate_pairs") if isinstance(metrics.get("leakage"), dict) else None
    if pairs and any(isinstance(p, dict) and "thumbnails" not in p for p in pairs):
        write_pair_thumbnails(run_dir, metrics["leakage"], readable={r.path for r in folder.split() or []})
    if _gallery(run_dir, ids):
        changed.append(GALLERY_FILE)
    clean = deidentify_metrics(metrics, ids)
    if clean != json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8")):
        write_metrics(run_dir, clean)
        changed.append(METRICS_FILE)
    model_dir = run_dir / MODEL_DIR
    if (model_dir / MODEL_JSON).is_file():
        info = read_model_info(model_dir)  # settings without local folders; provenance (ensembles, recalibrate) names runs
        fields = {"training_config": _not_kept(shareable_settings(info.training_config)) if info.training_config else None,
                  "provenance": _shareable(info.provenance, ids) if info.provenance else None}
        if replace_fields(model_dir, **{k: v for k, v in fields.items() if v is not None}):
            changed.append(f"{MODEL_DIR}/{MODEL_JSON}")
    config = folder.config()
    if config and config.get("keep_identifiers"):
        write_yaml_atomic(run_dir / CONFIG_FILE, _not_kept(config))
        changed.append(f"{CONFIG_FILE} (keep_identifiers: false)")
    changed += _logs(run_dir)
    report = run_dir / "report.html"
    title = re.search(r"<title>(.*?)</title>", report.read_text(encoding="utf-8", errors="replace")) if report.is_file() else None
    write_report(run_dir, title=html.unescape(title[1]) if title else None)  # the page's own title (ensemble, folds)
    return [*changed, "report.html"]


def _shareable(value, ids: Identities):
    """Every text in a JSON value with paths replaced (privacy.Identities.text)."""
    if isinstance(value, str):
        return ids.text(value)
    if isinstance(value, list):
        return [_shareable(v, ids) for v in value]
    return {k: _shareable(v, ids) for k, v in value.items()} if isinstance(value, dict) else value


def _not_kept(settings: dict) -> dict:
    return {**settings, "keep_identifiers": False} if "keep_identifiers" in settings else settings


def _gallery(run_dir: Path, ids: Identities) -> bool:
    """Gallery PNGs renamed without image stems (new names written first, gallery.json next, old files last)."""
    gallery = RunDir(run_dir).gallery()
    if not isinstance(gallery, dict) or not isinstance(gallery.get("sections"), list):
        return False
    method, root, renamed, edited = str(gallery.get("method") or "gradcam"), run_dir.resolve(), [], False
    for section in gallery["sections"]:
        items = section.get("items") if isinstance(section, dict) else None
        for rank, item in enumerate(items if isinstance(items, list) else [], start=1):
            old = (root / str(item.get("image", ""))).resolve() if isinstance(item, dict) else None
            if old is None or not old.is_relative_to(root) or not old.is_file():
                continue
            match = re.match(rf"^(.*?)_{rank:02d}_.+_{re.escape(method)}\.png$", old.name)
            name = f"{match[1]}_{rank:02d}_{method}.png" if match else old.name
            if name == old.name and ids.text(name, patients=True) != name:
                name = f"image_{rank:02d}_{method}.png"
            if name != old.name:
                with atomic_path(old.with_name(name)) as temporary:
                    shutil.copyfile(old, temporary)
                item["image"] = old.with_name(name).relative_to(root).as_posix()
                renamed.append(old)
            caption = item.get("caption")
            if isinstance(caption, str) and ids.text(caption, patients=True) != caption:
                item["caption"], edited = ids.text(caption, patients=True), True
    if not renamed and not edited:
        return False
    write_text_atomic(run_dir / GALLERY_FILE, json.dumps(gallery, indent=2))
    for old in renamed:
        old.unlink(missing_ok=True)
    return True


def _logs(run_dir: Path) -> list[str]:
    """The settings the loggers recorded: logs/csv/hparams.yaml, and MLflow's params (one file per setting)."""
    changed = []
    hparams = run_dir / "logs" / "csv" / "hparams.yaml"
    if hparams.is_file():
        settings = yaml.safe_load(hparams.read_text(encoding="utf-8")) or {}
        if isinstance(settings, dict) and shareable_settings(settings) != settings:
            write_yaml_atomic(hparams, shareable_settings(settings))
            changed.append("logs/csv/hparams.yaml")
    for params in sorted((run_dir / "logs" / "mlruns").glob("*/*/params")):
        values = {p.name: p.read_text(encoding="utf-8") for p in params.iterdir() if p.is_file()}
        clean = shareable_settings(values)
        for name, value in values.items():
            if name not in clean:
                (params / name).unlink()
            elif clean[name] != value:
                write_text_atomic(params / name, clean[name])
        if clean != values:
            changed.append(params.relative_to(run_dir).as_posix())
    return changed
