"""The commands other than `train`: each parses, forwards to one plain function and prints."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from medtransfer.cli.app import (
    DEFAULTS,
    TTA_OVERRIDE,
    _quiet_lightning,
    app,
    console,
    error_console,
)
from medtransfer.cli.train_command import print_result as _print_result
from medtransfer.config import TrainConfig, default_cache_dir
from medtransfer.errors import DataError, missing_extra


@app.command()
def predict(
    paths: List[Path] = typer.Argument(..., help="Image files or folders of images."),
    run: Path = typer.Option(..., help="Run folder (or its model/ folder) written by `medtransfer train`."),
    csv: Optional[Path] = typer.Option(None, help="Also write the predictions to this CSV file."),
    cam: Optional[Path] = typer.Option(None, help="Also write heatmap overlays into this folder (the run's --cam-method, gradcam unless set)."),
    batch_size: int = typer.Option(32, help="Images per batch."),
    accelerator: str = typer.Option("auto", help="auto, cpu or gpu."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Leave unreadable images out."),
    num_workers: int = typer.Option(-1, help="Decoding processes (default: chosen by device; 0 decodes in this process)."),
    runtime: str = typer.Option("torch", help="torch, or onnxruntime (CPU; runs the file `medtransfer export` wrote)."),
    onnx: Optional[Path] = typer.Option(None, help="With --runtime onnxruntime: the ONNX file (default RUN/model/model.onnx)."),
    devices: str = typer.Option("auto", help="auto (all local GPUs, or the CPU), a GPU count, or GPU ids like 0,1."),
    tta: Optional[str] = typer.Option(None, help=TTA_OVERRIDE),
):
    """Per-image class probabilities (calibrated) and the predicted class at the saved threshold.

    Streams: files are decoded in worker processes and rows written to --csv as they come, so
    memory stays flat for any number of images; the table is printed for up to 50 images."""
    from medtransfer.artifacts import load_model
    from medtransfer.predict import (
        expand_inputs,
        onnx_file,
        predict_with_progress,
        with_tta_override,
    )
    from medtransfer.runtime import resolve_devices

    onnx_path = onnx_file(runtime, run, onnx)
    targets = resolve_devices(devices, "cpu" if onnx_path else accelerator)
    saved = with_tta_override(load_model(run), tta, error_console)
    files = expand_inputs(paths)
    rows = predict_with_progress(
        saved, files, csv_path=csv, batch_size=batch_size, accelerator=accelerator, skip_bad=skip_bad_images,
        num_workers=num_workers, keep=TABLE_ROWS if cam is None else None, console=error_console, onnx_path=onnx_path,
        devices=targets,
    )
    scored = saved.ood is not None
    if len(files) <= TABLE_ROWS:
        table = Table()
        table.add_column("path", overflow="fold")
        for c in saved.classes:
            table.add_column(f"p({c})", justify="right")
        multilabel = saved.info.task == "multi-label"
        table.add_column("findings called" if multilabel else "predicted")
        if scored:
            table.add_column("ood_score", justify="right")
        for row in rows:
            ood = [f"{row['ood_score']:.3f}" + (" FOREIGN" if row["ood"] == "out" else "")] if scored else []
            called = (row["findings"] or "none") if multilabel else row["pred"]
            table.add_row(row["path"], *[f"{row[f'prob_{c}']:.4f}" for c in saved.classes], called, *ood)
        console.print(table)
    if saved.info.task == "multi-label":
        assert saved.info.thresholds is not None, "a saved multi-label model has thresholds (checked on load)"
        console.print("thresholds " + ", ".join(f"{c} {t:.3f}" for c, t in zip(saved.classes, saved.info.thresholds)))
    else:
        console.print(f"threshold {saved.threshold:.3f} on p({saved.info.positive_class})")
    if not scored:
        console.print("This model was saved without an OOD detector (train again to get ood_score and ood columns).")
    if csv is not None:
        console.print(f"Wrote {csv}")
    if cam is not None:
        from medtransfer.explain.files import explain_files

        explain_files(saved, [Path(r["path"]) for r in rows], cam)
        console.print(f"Wrote heatmaps to {cam}")


TABLE_ROWS = 50  # predict prints a table up to this many images; more go to --csv only


@app.command()
def evaluate(
    run: Path = typer.Option(..., help="Run folder written by `medtransfer train`."),
    data: Path = typer.Option(..., help="Labelled dataset: folder, CSV manifest or .npz (the run's class map applies)."),
    out: Path = typer.Option(..., help="New folder for metrics.json, predictions.csv, plots and report.html."),
    split: str = typer.Option("test", help="Which split of --data to evaluate (when it has splits)."),
    bootstrap: int = typer.Option(DEFAULTS.bootstrap, help="Bootstrap resamples for 95% CIs (0 = off)."),
    seed: int = typer.Option(DEFAULTS.seed, help="Bootstrap seed."),
    cache_dir: Optional[Path] = typer.Option(None, help="Decoded-image cache (default ~/.cache/medtransfer)."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Leave unreadable images out."),
    accelerator: str = typer.Option("auto", help="auto, cpu or gpu."),
    devices: str = typer.Option("auto", help="auto (all local GPUs, or the CPU), a GPU count, or GPU ids like 0,1."),
    tta: Optional[str] = typer.Option(None, help=TTA_OVERRIDE),
):
    """Evaluate a saved model on any labelled folder or CSV (an external test set) without touching the run."""
    from medtransfer.evaluation.external import evaluate_saved_model
    from medtransfer.runtime import resolve_devices

    result = evaluate_saved_model(
        run, data, out, split=split, cache_dir=cache_dir or default_cache_dir(), bootstrap=bootstrap, seed=seed,
        skip_bad=skip_bad_images, accelerator=accelerator, console=console, devices=resolve_devices(devices, accelerator),
        tta=tta,
    )
    _print_result({"test": result.get("test")}, result["threshold"])


@app.command()
def recalibrate(
    run: Path = typer.Option(..., help="Run folder written by `medtransfer train`."),
    data: Path = typer.Option(..., help="Small labelled local dataset (folder, CSV or .npz)."),
    out: Path = typer.Option(..., help="New folder for the recalibrated model, metrics.json and report.html."),
    fit_fraction: float = typer.Option(0.5, help="Share of the local patients that refits; the rest reports before/after."),
    seed: int = typer.Option(DEFAULTS.seed, help="Seed of the patient-level fit/report split and the bootstrap."),
    split: str = typer.Option("test", help="Which split of --data to use (when it has splits)."),
    bootstrap: int = typer.Option(DEFAULTS.bootstrap, help="Bootstrap resamples for 95% CIs (0 = off)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Decoded-image cache (default ~/.cache/medtransfer)."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Leave unreadable images out."),
    accelerator: str = typer.Option("auto", help="auto, cpu or gpu."),
):
    """Refit temperature and threshold (the run's policy) on part of a local labelled set; report before/after on the rest."""
    from medtransfer.evaluation.recalibrate import recalibrate_model

    recalibrate_model(
        run, data, out, fit_fraction=fit_fraction, seed=seed, split=split, cache_dir=cache_dir or default_cache_dir(),
        bootstrap=bootstrap, skip_bad=skip_bad_images, accelerator=accelerator, console=console,
    )
    console.print(f"Wrote {out / 'model'} and {out / 'report.html'}")


@app.command()
def compare(
    runs: List[Path] = typer.Argument(..., help="Two or more run or evaluation folders (the first is the reference)."),
    out: Optional[Path] = typer.Option(None, help="Also write comparison.md, comparison.html and comparison.json here."),
    bootstrap: int = typer.Option(DEFAULTS.bootstrap, help="Bootstrap resamples for the paired AUC test."),
    seed: int = typer.Option(DEFAULTS.seed, help="Bootstrap seed."),
):
    """Side-by-side metrics with CIs, and paired tests (bootstrap and DeLong) of AUC differences."""
    from medtransfer.evaluation.compare import compare_runs

    result = compare_runs(runs, out=out, n_resamples=bootstrap, seed=seed)
    print(result.markdown)
    if out is not None:
        console.print(f"Wrote {out / 'comparison.html'}")


@app.command()
def experiment(
    config: Path = typer.Option(..., help="EXPERIMENT.yaml: train settings plus grid: {SETTING: [VALUES]} (docs: guide/experiment)."),
    out: Path = typer.Option(..., help="Experiment folder: split.csv, cells/NAME run folders, summary.{md,html,json}."),
    data: Optional[str] = typer.Option(None, help="Dataset (else the YAML's data:); split once, into OUT/split.csv."),
    external: Optional[List[Path]] = typer.Option(None, help="Labelled external set every cell is evaluated on (repeatable)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Decoded-image cache shared by every cell (default ~/.cache/medtransfer)."),
    bootstrap: int = typer.Option(DEFAULTS.bootstrap, help="Resamples of the paired patient-level bootstrap between configurations."),
    jobs: int = typer.Option(1, help="Cells run at once, each in its own process (set num_workers in the YAML to share the cores)."),
):
    """Run a grid of training runs on one split: finished cells are skipped, interrupted ones resume; paired comparisons."""
    from medtransfer.experiment.runner import run_experiment

    _quiet_lightning()
    run_experiment(config, data=data, out=out, externals=external, cache_dir=str(cache_dir) if cache_dir else None,
                   bootstrap=bootstrap, console=console, jobs=jobs)
    console.print(f"Wrote {out / 'summary.html'}")


@app.command()
def split(
    data: Path = typer.Option(..., help="Dataset: DIR/{train,val,test}/CLASS/*, plain DIR/CLASS/*, a CSV manifest or a MedMNIST .npz."),
    out: Path = typer.Option(..., help="CSV file to write: path,label,patient_id,split."),
    val_fraction: float = typer.Option(DEFAULTS.val_fraction, help="Patient-level validation fraction drawn from train+val."),
    test_fraction: Optional[float] = typer.Option(
        None, help="Patient-level test fraction drawn when the data has no test split (default 0.2; 0: none)."
    ),
    keep_official_val: bool = typer.Option(
        DEFAULTS.keep_official_val, "--keep-official-val", help="Use the data's own val split as is."
    ),
    seed: int = typer.Option(DEFAULTS.seed, help="Random seed."),
    labels: str = typer.Option(DEFAULTS.labels, help="folder or kermany-3class."),
    patient_regex: Optional[str] = typer.Option(None, help="Regex whose first group of the file stem is the patient ID."),
    strict: bool = typer.Option(
        DEFAULTS.strict, "--strict", help="Fail when a patient, an identical image or a near-duplicate image is in two splits."
    ),
    class_map: Optional[List[str]] = typer.Option(None, help="Rename or merge a class, OLD=NEW (repeatable)."),
    class_names: Optional[str] = typer.Option(None, help="Names of an .npz file's class indices, comma-separated."),
    labels_column: Optional[str] = typer.Option(None, help="Multi-label CSV: the column of |-separated findings (default: labels or Finding Labels)."),
    findings: Optional[str] = typer.Option(None, help="Multi-label: the findings to use, in output order, comma-separated (default: all found)."),
    uncertain: Optional[str] = typer.Option(None, help="Multi-label CSV: uncertain (-1) labels as ones, zeros or ignore (default: masked out)."),
    views: Optional[str] = typer.Option(None, help="Keep only these views: frontal, lateral (CSV column, CheXpert file names, DICOM tag)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Where an .npz file's images are written (default ~/.cache/medtransfer)."),
):
    """Draw the patient-level split that `train` would use, check it for leakage, and save it."""
    flags = {k: v for k, v in locals().items() if k != "out" and v is not None}
    flags["class_map"] = class_map or {}
    flags["cache_dir"] = str(cache_dir or default_cache_dir())
    from medtransfer.train.pipeline import write_split

    write_split(TrainConfig.from_dict({**flags, "data": str(data)}, source="options"), out, console)


@app.command()
def cache(
    data: Path = typer.Option(..., help="Dataset folder, CSV manifest or .npz (its images are written under the cache)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache location (default ~/.cache/medtransfer)."),
    size: int = typer.Option(DEFAULTS.cache_size, help="Stored image side in pixels (use the training cache_size)."),
    workers: Optional[int] = typer.Option(None, help="Decoding processes (default: the available cores, up to 8)."),
    skip_bad_images: bool = typer.Option(
        DEFAULTS.skip_bad_images, "--skip-bad-images", help="Leave unreadable images out."
    ),
):
    """Prebuild the decode-once image cache for a dataset (training builds it too, on first use)."""
    from medtransfer.train.pipeline import prebuild_cache

    prebuild_cache(
        data, cache_dir=cache_dir or default_cache_dir(), size=size, workers=workers, skip_bad=skip_bad_images,
        console=console,
    )


@app.command()
def explain(
    paths: List[Path] = typer.Argument(..., help="Image files or folders of images."),
    run: Path = typer.Option(..., help="Run folder written by `medtransfer train`."),
    out: Path = typer.Option(..., help="Folder for overlay PNGs and raw .npy maps."),
    method: Optional[str] = typer.Option(
        None, help="cam, gradcam, gradcam++, layercam (finer: the stride-16 stage), or occlusion (model-agnostic, about 200 forward passes per image). Default: the run's --cam-method (gradcam unless set)."
    ),
    target_layer: Optional[str] = typer.Option(None, help="Layer to explain (default: the backbone's last feature map; layercam: the last stride-16 stage)."),
    finding: Optional[List[str]] = typer.Option(
        None, "--finding", help="Multi-label models: draw this finding for every image (repeatable). Default: each image's "
        "findings at or above their thresholds (none drawn for an image with none)."
    ),
):
    """Class Activation Maps (or occlusion sensitivity): heatmap overlays showing what drove each prediction.

    Multi-label models: one map per finding, targeting that finding's logit."""
    from medtransfer.artifacts import load_model
    from medtransfer.explain.files import explain_files
    from medtransfer.predict import expand_inputs

    saved = load_model(run)
    rows = explain_files(saved, expand_inputs(paths), out, method=method, target_layer=target_layer, findings=finding)
    for row in rows:
        if "heatmaps" not in row:  # single-label: the predicted class
            console.print(f"{row['path']}: {row['predicted']} p={row['probability']:.3f} -> {row['overlay']}")
            continue
        for heat in row["heatmaps"]:
            console.print(f"{row['path']}: {heat['caption']} -> {heat['overlay']}", markup=False, highlight=False, soft_wrap=True)
        if not row["heatmaps"]:
            probabilities, thresholds = row["probabilities"], row["thresholds"]
            closest = max(probabilities, key=lambda c: probabilities[c] - thresholds[c])
            console.print(f"{row['path']}: no finding at or above its threshold (closest: {closest} "
                          f"p={probabilities[closest]:.2f} < threshold {thresholds[closest]:.2f}); no heatmap drawn "
                          "(choose findings with --finding)", markup=False, highlight=False, soft_wrap=True)


@app.command()
def shortcuts(
    run: Path = typer.Option(..., help="Run folder written by `medtransfer train`."),
    split: str = typer.Option("test", help="Which predictions_<split>.csv to explain."),
    method: Optional[str] = typer.Option(None, help="cam, gradcam, gradcam++, layercam or occlusion (slow). Default: the run's --cam-method (gradcam unless set)."),
    limit: int = typer.Option(200, help="Images explained at most, spread evenly over the split."),
):
    """Shortcut check: the share of heatmap evidence in the image border (outer 10%), into metrics.json and report.html."""
    from medtransfer.artifacts import load_model
    from medtransfer.evaluation.report import write_report
    from medtransfer.explain.border import record_border_evidence
    from medtransfer.rundir import RunDir

    saved, metrics = load_model(run), RunDir(run).metrics().to_dict()
    block = record_border_evidence(run, saved, metrics, split=split, method=method or saved.cam_method, limit=limit)
    if block is None:
        raise DataError(f"--run {run}: no predictions_{split}.csv with readable images; pass a run that has a {split} split")
    console.print(f"Border evidence ({block['n_images']} {split} images): mean {100 * block['mean_band_share']:.1f}% in the "
                  f"outer {100 * block['band']:.0f}% band ({100 * block['band_area_share']:.0f}% of the area), "
                  f"{block['n_flagged']} flagged (above {100 * block['flag_above']:.0f}%)")
    write_report(run, console=console)


@app.command()
def export(
    run: Path = typer.Option(..., help="Run folder written by `medtransfer train`."),
    out: Optional[Path] = typer.Option(None, help="ONNX file to write (default RUN/model/model.onnx)."),
    opset: int = typer.Option(17, help="ONNX opset version."),
):
    """Export the saved model to ONNX (logits and calibrated probabilities), verified with onnxruntime."""
    from medtransfer.export import export_onnx

    path = export_onnx(run, out, opset=opset)
    console.print(f"Wrote {path} (checked against PyTorch with onnxruntime)")


@app.command()
def serve(
    run: Path = typer.Option(..., help="Run folder written by `medtransfer train`."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; beyond localhost needs --token or --insecure."),
    port: int = typer.Option(8000, help="Port to listen on."),
    accelerator: str = typer.Option("cpu", help="cpu or gpu."),
    max_concurrent: int = typer.Option(2, help="Requests processed at once (one model copy each)."),
    queue: int = typer.Option(64, help="Requests waiting beyond --max-concurrent; more get 503 with Retry-After."),
    max_upload_mb: float = typer.Option(50.0, help="Largest upload in MB; larger bodies get 413 while streaming."),
    token: Optional[str] = typer.Option(None, envvar="MEDTRANSFER_TOKEN", help="Require this token (env MEDTRANSFER_TOKEN)."),
    insecure: bool = typer.Option(False, help="Allow a host beyond localhost without a token."),
    runtime: str = typer.Option("torch", help="torch, or onnxruntime (CPU; Grad-CAM still runs in torch)."),
    onnx: Optional[Path] = typer.Option(None, help="With --runtime onnxruntime: the ONNX file (default RUN/model/model.onnx)."),
    body_timeout: float = typer.Option(60.0, help="Seconds a client has to send its whole upload; later: 408."),
    min_upload_rate: float = typer.Option(16.0, help="KB/s an upload must average after its first 5 s, else 408 (0: no minimum)."),
    allow_host: List[str] = typer.Option([], help="Without --token: another name the server is reached by (Host header); "
                                                  "repeatable. --host, localhost and IP addresses are always accepted."),
):
    """Serve the model: a web page at / and POST /predict (probabilities, class, optional Grad-CAM)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise missing_extra("medtransfer serve", "serve") from None

    from medtransfer.artifacts import load_model
    from medtransfer.predict import onnx_file
    from medtransfer.serving.app import check_bind, create_app
    from medtransfer.serving.limits import log_requests_to_stderr

    check_bind(host, token=token, insecure=insecure)
    onnx_path = onnx_file(runtime, run, onnx)
    app_ = create_app(load_model(run), accelerator=accelerator, run_dir=run, max_concurrent=max_concurrent,
                      queue=queue, max_upload_mb=max_upload_mb, token=token, onnx_path=onnx_path, host=host,
                      allow_hosts=allow_host, body_timeout=body_timeout, min_upload_rate=min_upload_rate)
    log_requests_to_stderr()
    console.print(f"Serving {run} on http://{host}:{port}/ ({runtime})")
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command()
def ensemble(
    runs: List[Path] = typer.Argument(..., help="Two or more run folders that differ only in their seed (same data, split and settings)."),
    out: Path = typer.Option(..., help="New folder: one model (every member's weights) and the run-folder files."),
    cache_dir: Optional[Path] = typer.Option(None, help="Decoded-image cache (default: the first run's)."),
    bootstrap: Optional[int] = typer.Option(None, help="Bootstrap resamples for 95% CIs (default: the runs' setting)."),
    accelerator: str = typer.Option("auto", help="auto, cpu or gpu."),
):
    """Average seed runs into ONE model folder: logits averaged, threshold and temperature re-chosen on the shared val split."""
    from medtransfer.train.ensemble import build_ensemble

    metrics = build_ensemble(runs, out, cache_dir=cache_dir, accelerator=accelerator, bootstrap=bootstrap, console=console)
    _print_result({"val": metrics["val"], "test": metrics["test"]}, metrics["threshold"])
    console.print(f"Wrote {out} ({len(runs)} members; predict, explain, serve, export and evaluate take it as --run)")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-run"), help="Folder for the synthetic data and both runs."),
    epochs: int = typer.Option(6, help="Maximum epochs per scenario."),
    cache_dir: Optional[Path] = typer.Option(None, help="Decoded-image cache (default: inside --out)."),
):
    """Generate synthetic chest radiographs and run both classic scenarios (fine-tune, freeze 4) offline."""
    from medtransfer.demo import run_demo

    _quiet_lightning()
    run_demo(out, epochs=epochs, cache_dir=cache_dir, console=console)




@app.command()
def adapt(
    run: Path = typer.Option(..., help="Run folder (or model folder) written by `medtransfer train` (or recalibrate/adapt)."),
    data: Path = typer.Option(..., help="Folder of the new site's images, searched recursively; labels and folder names are never read."),
    out: Path = typer.Option(..., help="New folder for the adapted model (OUT/model) and adaptation.json."),
    method: str = typer.Option("mixture", help="mixture (default, measured best: the operating point from the new scores' shifted two-class mixture), prior, bn, prior+bn or tent."),
    operating_point: str = typer.Option("keep", help="With prior and prior+bn: keep (the threshold policy's meaning) or bayes (the same probability threshold)."),
    min_images: int = typer.Option(64, help="Fewest images BatchNorm re-estimation accepts."),
    max_ood_share: float = typer.Option(0.25, help="Refuse when the OOD guard flags more than this share of the images."),
    bootstrap: int = typer.Option(500, help="Patient-level bootstrap resamples of the prevalence estimate and the mixture's cut."),
    permutations: int = typer.Option(500, help="Permutations of the MMD feature test."),
    seed: int = typer.Option(DEFAULTS.seed, help="Seed of the bootstrap, the permutations and the batch order."),
    cache_dir: Optional[Path] = typer.Option(None, help="Decoded-image cache (default ~/.cache/medtransfer)."),
    accelerator: str = typer.Option("auto", help="auto, cpu or gpu."),
):
    """Adapt a model to a new site from unlabelled images: shift tests, a verdict, and a new model folder."""
    from medtransfer.adapt.core import adapt_model

    adapt_model(run, data, out, method=method, operating_point=operating_point, cache_dir=cache_dir or default_cache_dir(),
                min_images=min_images, max_ood_share=max_ood_share, bootstrap=bootstrap, permutations=permutations,
                seed=seed, accelerator=accelerator, console=console)
    console.print(f"Wrote {out / 'model'} and {out / 'adaptation.json'} (predict, evaluate, serve and export take --run {out})")


@app.command()
def redact(
    run: Path = typer.Argument(..., help="Run (or evaluation) folder to clean in place; runs inside it (members, folds) too."),
    cache_dir: Optional[Path] = typer.Option(None, help="Folder of the patient salt (default: the run's cache folder)."),
):
    """Remove absolute paths, user names and patient IDs from a run's shareable outputs (report, metrics.json, model.json, gallery, logs)."""
    from medtransfer.train.redact import redact_run

    for done in redact_run(run, cache_dir=cache_dir):
        what = ", ".join(done.changed) if done.changed else "nothing to change"
        console.print(f"Redacted {done.run}: {what}", markup=False, highlight=False, soft_wrap=True)
    console.print("split.csv and predictions_*.csv keep paths and patient IDs: they are working files, not for sharing.")


@app.command("config")
def config_command(
    schema: bool = typer.Option(False, "--schema", help="Print the JSON Schema of the training settings (YAML and config.yaml)."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the training settings as a Markdown table (the docs' settings page)."),
):
    """The training settings: `--schema` prints them as a JSON Schema for editors (name, type, default, help)."""
    if schema == markdown:
        raise typer.BadParameter("say what to print: --schema or --markdown")
    from medtransfer.config.schema import schema_json, settings_markdown

    print(schema_json() if schema else settings_markdown(), end="" if markdown else "\n")

