"""`medtransfer train`: every training setting as a flag (defaults < --config YAML < flags)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from medtransfer.cli.app import DEFAULTS, _quiet_lightning, app, console
from medtransfer.config import parse_set_values, resolve_train_config


@app.command()
def train(
    data: Optional[str] = typer.Option(None, help="Dataset: DIR/{train,val,test}/CLASS/*, plain DIR/CLASS/*, a CSV manifest or a MedMNIST .npz."),
    out: Optional[Path] = typer.Option(None, help="New run folder to write."),
    config: Optional[Path] = typer.Option(None, help="YAML file of settings (flags override it)."),
    resume: Optional[Path] = typer.Option(None, help="Continue the interrupted run in this folder."),
    backbone: Optional[str] = typer.Option(None, help="resnet18 (default), resnet50, densenet121, efficientnet_lite0 or any timm name."),
    weights: Optional[str] = typer.Option(None, help="imagenet (default), none, or a .pth/.safetensors file."),
    strategy: Optional[str] = typer.Option(None, help="finetune (default), freeze, linear-probe, lp-ft or gradual (see docs: guide/training-options)."),
    freeze_children: Optional[int] = typer.Option(None, help=f"With --strategy freeze: how many first children to freeze (default {DEFAULTS.freeze_children})."),
    head: Optional[str] = typer.Option(None, help="linear (default), mlp (one hidden layer, dropout) or dwconv (depthwise-separable block on the last feature map)."),
    lp_epochs: Optional[int] = typer.Option(None, help=f"With --strategy lp-ft: epochs of the linear-probe phase (default {DEFAULTS.lp_epochs})."),
    lp_lr: Optional[float] = typer.Option(None, help=f"With --strategy lp-ft: learning rate of the linear-probe phase (default {DEFAULTS.lp_lr:g})."),
    unfreeze_every: Optional[int] = typer.Option(None, help=f"With --strategy gradual: epochs between two child groups thawing (default {DEFAULTS.unfreeze_every})."),
    lr_decay: Optional[float] = typer.Option(None, help="Learning rate factor per child group from the head down, e.g. 0.7 (default 1.0: off)."),
    weight_averaging: Optional[str] = typer.Option(None, help="none (default), ema (validated and saved: the average) or swa (last 20% of epochs)."),
    wise_ft: Optional[bool] = typer.Option(None, "--wise-ft", help="Interpolate start and fine-tuned weights; mixing chosen by validation loss."),
    epochs: Optional[int] = typer.Option(None, help=f"Maximum epochs (default {DEFAULTS.epochs})."),
    patience: Optional[int] = typer.Option(None, help=f"Early stopping patience on validation loss (default {DEFAULTS.patience})."),
    batch_size: Optional[int] = typer.Option(None, help=f"Batch size (default {DEFAULTS.batch_size})."),
    accumulate: Optional[int] = typer.Option(None, help="Gradient accumulation: batches per optimiser step (default 1); --resume may trade --batch-size for it at the same effective batch."),
    lr: Optional[float] = typer.Option(None, help=f"Peak learning rate for AdamW (default {DEFAULTS.lr:g})."),
    image_size: Optional[int] = typer.Option(None, help=f"Model input size in pixels (default {DEFAULTS.image_size})."),
    output_stride: Optional[int] = typer.Option(
        None, help="32 (default); 16 or 8 dilate the last stage for finer heatmaps (efficientnet_lite0, resnet50, timm)."
    ),
    border_crop: Optional[float] = typer.Option(
        None, help="Fraction of width and height cut off each side before resizing, in train, evaluation and the saved model (default 0)."
    ),
    val_fraction: Optional[float] = typer.Option(None, help=f"Patient-level validation fraction drawn from train+val (default {DEFAULTS.val_fraction})."),
    test_fraction: Optional[float] = typer.Option(None, help="Patient-level test fraction drawn when the data has no test split (default 0.2; 0: none)."),
    keep_official_val: Optional[bool] = typer.Option(None, "--keep-official-val", help="Use the data's own val split as is."),
    split_file: Optional[Path] = typer.Option(None, help="Use this split.csv (from `medtransfer split`) as is instead of drawing a split."),
    labels: Optional[str] = typer.Option(None, help="folder (default) or kermany-3class (NORMAL/BACTERIA/VIRUS from file names)."),
    patient_regex: Optional[str] = typer.Option(None, help="Regex whose first group of the file stem is the patient ID (default: Kermany, NIH, CheXpert, MIMIC-CXR names; DICOM PatientID)."),
    positive_class: Optional[str] = typer.Option(None, help="Positive class (default PNEUMONIA when present, else the last)."),
    class_map: Optional[List[str]] = typer.Option(None, help="Rename or merge a class, OLD=NEW (repeatable), e.g. BACTERIA=PNEUMONIA."),
    class_names: Optional[str] = typer.Option(None, help="Names of an .npz file's class indices 0,1,..., comma-separated."),
    labels_column: Optional[str] = typer.Option(None, help="Multi-label CSV: the column of |-separated findings (default: labels or Finding Labels)."),
    findings: Optional[str] = typer.Option(None, help="Multi-label: the findings to use, in output order, comma-separated (default: all found)."),
    uncertain: Optional[str] = typer.Option(None, help="Multi-label CSV: uncertain (-1) labels as ones, zeros or ignore (default: masked out)."),
    views: Optional[str] = typer.Option(None, help="Keep only these views: frontal, lateral (CSV column, CheXpert file names, DICOM tag)."),
    class_weights: Optional[str] = typer.Option(None, help="none (default) or balanced class-weighted loss."),
    sampler: Optional[str] = typer.Option(None, help="shuffle (default) or balanced (each class drawn equally often)."),
    loss: Optional[str] = typer.Option(None, help="cross-entropy (default) or focal."),
    threshold: Optional[str] = typer.Option(None, help="Threshold policy on val: youden (default), f1, sensitivity:0.95, specificity:0.90, fixed:0.5."),
    bootstrap: Optional[int] = typer.Option(None, help=f"Bootstrap resamples for 95% CIs (default {DEFAULTS.bootstrap}, 0 = off)."),
    calibrate: Optional[str] = typer.Option(None, help="temperature (default) or none."),
    tta: Optional[str] = typer.Option(None, help="Test-time augmentation, also saved with the model: none (default), crops (centre + 4 shifted crops) or flip (see docs: guide/training-options)."),
    cam_method: Optional[str] = typer.Option(None, help="Heatmaps of the report's gallery and border check, and the default of explain, predict --cam, shortcuts and serve: gradcam (default), layercam (finer: the stride-16 stage), gradcam++ or cam."),
    seed: Optional[int] = typer.Option(None, help=f"Random seed (default {DEFAULTS.seed})."),
    accelerator: Optional[str] = typer.Option(None, help="auto (default), cpu or gpu."),
    devices: Optional[str] = typer.Option(None, help="Devices per node: a count, GPU ids like 0,1, or auto (default: all GPUs, or 1 CPU process)."),
    num_nodes: Optional[int] = typer.Option(None, help="Machines to train on (default 1); launch with torchrun or srun, see docs: scaling."),
    distributed: Optional[str] = typer.Option(None, help="Lightning strategy for several devices: auto (default), ddp or ddp_spawn."),
    compile: Optional[bool] = typer.Option(None, "--compile", help="torch.compile the model (helps on GPUs; slow start)."),
    precision: Optional[str] = typer.Option(None, help="auto (default: bf16-mixed where supported), 32-true, bf16-mixed, 16-mixed."),
    num_workers: Optional[int] = typer.Option(None, help="DataLoader workers (default: chosen by device)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Decoded-image cache (default ~/.cache/medtransfer)."),
    skip_bad_images: Optional[bool] = typer.Option(None, "--skip-bad-images", help="Leave unreadable images out instead of stopping."),
    strict: Optional[bool] = typer.Option(
        None, "--strict", help="Fail when a patient, an identical image or a near-duplicate image is in two splits."
    ),
    horizontal_flip: Optional[bool] = typer.Option(None, "--hflip", help="Add random horizontal flips to augmentation (off: anatomy is lateralised)."),
    augment: Optional[str] = typer.Option(None, help="Training augmentation: light (default: crop, rotation, brightness/contrast), radiograph (+ translation, scale, gamma, blur/sharpen, noise), trivial (TrivialAugment: one radiograph-safe op per image) or none. See docs: guide/training-options."),
    augment_on: Optional[str] = typer.Option(None, help="Where augmentation runs: auto (default: on the GPU when training on one), workers or device."),
    mixup: Optional[float] = typer.Option(None, help="MixUp Beta alpha, e.g. 0.2 (default 0: off)."),
    cutmix: Optional[float] = typer.Option(None, help="CutMix Beta alpha, e.g. 1.0 (default 0: off; with --mixup, one of the two per batch)."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Show progress bars."),
    logger: Optional[str] = typer.Option(None, help="Tracking under RUN/logs/, offline: csv (default), tensorboard or mlflow (local file store)."),
    ensemble: Optional[int] = typer.Option(None, help="Train N members (seeds SEED, SEED+1, ...) on one split and save them as one seed-ensemble model; members in OUT/members (default 1)."),
    folds: Optional[int] = typer.Option(None, help="K-fold cross-validation by patient: K folds (OUT/folds/fold-k), out-of-fold figures, the K models saved as one (default 0: off). See docs: guide/cross-validation."),
    refit: Optional[bool] = typer.Option(None, "--refit", help="With --folds: also train one model on all folds for the median best epoch (OUT/refit)."),
    jobs: Optional[int] = typer.Option(None, help="With --folds: folds trained at once, each in its own process (default 1)."),
    keep_identifiers: Optional[bool] = typer.Option(None, "--keep-identifiers", help="Keep absolute paths and patient IDs in the report, metrics.json, model.json, gallery and logs (default: relative paths, hashed IDs; see docs: guide/run-folder)."),
    set_values: Optional[List[str]] = typer.Option(None, "--set", help="Any other setting as KEY=VALUE (repeatable)."),
):
    """Train a classifier with a patient-level validation split and evaluate the best-on-validation model."""
    flags = {k: v for k, v in locals().items() if k not in ("out", "config", "resume", "set_values")}
    flags["class_map"] = class_map or None  # not given: the YAML's map stays
    from medtransfer.train.seed_ensemble import train_run

    settings, run_dir = resolve_train_config(
        out=out, resume=resume, config_file=config, overrides={**flags, **parse_set_values(set_values)}
    )
    _quiet_lightning()
    result = train_run(settings, run_dir, resume=resume is not None, console=console)
    if result is None:  # a DDP process other than rank 0: rank 0 prints
        return
    print_result({k: result.get(k) for k in ("val", "oof", "test") if k in result}, result["threshold"])


def print_result(splits: dict[str, dict | None], threshold: float | None) -> None:
    for split, block in splits.items():
        if not block:
            continue
        ci = block.get("auc_ci")
        if block.get("task") == "multi-label":  # the headline is macro AUC; each finding has its own threshold
            _print_findings(split, block)
            continue
        auc = f"{block['auc']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        console.print(
            f"{split:4s}: AUC {auc}  accuracy {block['accuracy']:.3f}  sensitivity {block['sensitivity']:.3f}  "
            f"specificity {block['specificity']:.3f}  (threshold {threshold:.3f})"
        )




def _print_findings(split: str, block: dict) -> None:
    ci = block.get("macro_auc_ci")
    macro = f"{block['macro_auc']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") if "macro_auc" in block else "n/a"
    console.print(f"{split:4s}: macro AUC {macro}  micro AUC {block.get('micro_auc', float('nan')):.3f}  ({len(block['findings'])} findings)")
    for finding, entry in block["findings"].items():
        if "auc" not in entry:
            console.print(f"      {finding}: no AUC ({entry['n_positive']} positive of {entry['n_known']} known)")
            continue
        console.print(
            f"      {finding}: AUC {entry['auc']:.3f}  sensitivity {entry['sensitivity']:.3f}  "
            f"specificity {entry['specificity']:.3f}  (threshold {entry['threshold']:.3f}, prevalence {entry['prevalence']:.3f})"
        )


def flag_descriptions() -> dict[str, str]:
    """Each `train` flag's help text by setting name: the schema's descriptions (medtransfer.schema)."""
    import typer.main

    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    return {param.name: param.help for param in command.params if getattr(param, "help", None)}

