"""End to end from the command line: train on a tiny generated dataset, then predict and evaluate."""

from __future__ import annotations

import csv
import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from medtransfer.artifacts import load_model
from medtransfer.cli import main
from medtransfer.models.backbones import list_backbones
from tests.conftest import write_demo_data

FAST = ["--backbone", "resnet18", "--weights", "none", "--image-size", "48", "--set", "cache_size=56",
        "--batch-size", "8", "--bootstrap", "50", "--num-workers", "0", "--no-progress"]


def invoke(args: list) -> int:
    """Run the console script's entry point in-process; return its exit code."""
    saved_argv = sys.argv
    sys.argv = ["medtransfer", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as exit_:
        return exit_.code or 0
    finally:
        sys.argv = saved_argv


def run_cli(args: list, monkeypatch, capsys) -> tuple[int, str, str]:
    code = invoke(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    root = write_demo_data(tmp_path_factory.mktemp("tiny") / "chest_xray", patients_per_class=10, images_per_patient=(1, 2),
                           val_patients_per_class=2, test_patients_per_class=5, image_size=64)  # virus patients in every split
    (root / "train" / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    return root


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "freeze4"
    cache = tmp_path_factory.mktemp("cache")
    code = invoke(["train", "--data", tiny_data, "--out", run, "--cache-dir", cache, "--strategy", "freeze",
                   "--freeze-children", "4", "--epochs", "2", "--skip-bad-images", *FAST])
    assert code == 0
    return run, cache


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_train_writes_the_run_directory_contract(trained_run):
    run, _ = trained_run
    for name in ["config.yaml", "split.csv", "history.csv", "metrics.json", "predictions_test.csv", "report.html",
                 "model/weights.safetensors", "model/model.json", "plots/history.png", "plots/test_roc.png",
                 "plots/test_confusion.png"]:
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics)[:12] == ["backbone", "strategy", "weights", "params", "epochs_run", "best_epoch",
                                  "stopped_early", "train_seconds", "positive_class", "threshold", "val", "test"]
    assert metrics["params"] == {"total": 11_177_538, "trainable": 11_168_002, "head": 1_026}
    assert metrics["positive_class"] == "PNEUMONIA" and metrics["epochs_run"] == 2
    for key in ["n", "auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "confusion_matrix"]:
        assert key in metrics["test"] and key in metrics["val"]
    info = json.loads((run / "model" / "model.json").read_text())
    assert info["training_config"]["strategy"] == "freeze" and info["threshold_policy"] == info["training_config"]["threshold"]
    assert set(info["versions"]) >= {"medtransfer", "torch"} and info["frozen"] == ["conv1", "bn1", "relu", "maxpool"]
    history = read_csv(run / "history.csv")
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert list(history[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


def test_corrupt_image_was_skipped_and_is_not_in_the_split(trained_run):
    run, _ = trained_run
    assert not any("IM-9999" in r["path"] for r in read_csv(run / "split.csv"))


def test_metrics_json_auc_equals_scikit_learn_on_predictions_csv(trained_run):
    run, _ = trained_run
    metrics = json.loads((run / "metrics.json").read_text())
    rows = read_csv(run / "predictions_test.csv")
    labels = [r["label"] == "PNEUMONIA" for r in rows]
    probs = [float(r["prob_PNEUMONIA"]) for r in rows]
    assert metrics["test"]["n"] == len(rows)
    assert metrics["test"]["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-9)
    predicted = [r["pred"] == "PNEUMONIA" for r in rows]
    assert predicted == [p >= metrics["threshold"] for p in probs]


def test_split_is_patient_level_and_keeps_the_official_test(trained_run, tiny_data):
    run, _ = trained_run
    rows = read_csv(run / "split.csv")
    splits_of_patient: dict[str, set] = {}
    for r in rows:
        splits_of_patient.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of_patient.values())
    official_test = {str(p) for p in (tiny_data / "test").rglob("*.png")}
    assert {r["path"] for r in rows if r["split"] == "test"} == official_test
    assert sum(r["split"] == "val" for r in rows) > 4  # re-split, not the tiny official val folder


def test_predict_matches_evaluation_and_is_deterministic(trained_run, tmp_path, monkeypatch, capsys):
    run, _ = trained_run
    reference = {r["path"]: r for r in read_csv(run / "predictions_test.csv")}
    images = sorted(reference)[:6]
    outputs = []
    for attempt in range(2):
        out_csv = tmp_path / f"predictions{attempt}.csv"
        code, stdout, _ = run_cli(["predict", "--run", run, *images, "--csv", out_csv], monkeypatch, capsys)
        assert code == 0 and "PNEUMONIA" in stdout
        outputs.append(read_csv(out_csv))
    assert outputs[0] == outputs[1]
    for row in outputs[0]:
        assert float(row["prob_PNEUMONIA"]) == pytest.approx(float(reference[row["path"]]["prob_PNEUMONIA"]), abs=2e-3)
        assert abs(float(row["prob_NORMAL"]) + float(row["prob_PNEUMONIA"]) - 1) < 1e-5


def test_evaluate_on_an_external_folder_leaves_the_run_untouched(trained_run, tiny_data, tmp_path, monkeypatch, capsys):
    run, cache = trained_run
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    out = tmp_path / "external"
    code, stdout, err = run_cli(["evaluate", "--run", run, "--data", tiny_data, "--out", out, "--bootstrap", "50",
                                 "--cache-dir", cache], monkeypatch, capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    run_metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["auc"] == pytest.approx(run_metrics["test"]["auc"], abs=1e-3)
    assert (out / "report.html").is_file() and (out / "predictions.csv").is_file()
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


def test_interrupted_run_resumes_where_it_stopped(tiny_data, trained_run, tmp_path, monkeypatch, capsys):
    _, cache = trained_run
    from medtransfer.train.callbacks import HistoryWriter

    original = HistoryWriter.on_train_epoch_start

    def interrupt_after_first_epoch(self, trainer, pl_module):  # as Ctrl-C early in epoch 2
        original(self, trainer, pl_module)
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt

    run = tmp_path / "resumable"
    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(HistoryWriter, "on_train_epoch_start", interrupt_after_first_epoch)
    try:
        code, _, err = run_cli(["train", "--data", tiny_data, "--out", run, "--cache-dir", cache, "--epochs", "3",
                                "--skip-bad-images", *FAST], monkeypatch, capsys)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores Ctrl-C after a graceful shutdown
    assert code == 1
    assert f"medtransfer train --resume {run}" in err
    assert not (run / "metrics.json").exists() and (run / "checkpoints" / "last.ckpt").is_file()

    monkeypatch.setattr(HistoryWriter, "on_train_epoch_start", original)
    code, _, err = run_cli(["train", "--resume", run], monkeypatch, capsys)
    assert code == 0, err
    assert [int(r["epoch"]) for r in read_csv(run / "history.csv")] == [1, 2, 3]
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 3


def test_three_classes_from_kermany_names(tiny_data, trained_run, tmp_path, monkeypatch, capsys):
    _, cache = trained_run
    run = tmp_path / "three"
    code, _, err = run_cli(["train", "--data", tiny_data, "--out", run, "--cache-dir", cache, "--epochs", "1",
                            "--labels", "kermany-3class", "--positive-class", "BACTERIA", "--skip-bad-images", *FAST],
                           monkeypatch, capsys)
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    multiclass = metrics["test"]["multiclass"]
    assert set(multiclass["per_class"]) == {"BACTERIA", "NORMAL", "VIRUS"}
    assert np.array(multiclass["confusion_matrix"]).shape == (3, 3)
    rows = read_csv(run / "predictions_test.csv")
    labels = np.array([["BACTERIA", "NORMAL", "VIRUS"].index(r["label"]) for r in rows])
    probs = np.array([[float(r[f"prob_{c}"]) for c in ("BACTERIA", "NORMAL", "VIRUS")] for r in rows])
    assert multiclass["macro_auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"), abs=1e-6)
    assert metrics["test"]["auc"] == pytest.approx(roc_auc_score(labels == 0, probs[:, 0]), abs=1e-6)
    assert {r["pred"] for r in rows} <= {"BACTERIA", "NORMAL", "VIRUS"}


def test_report_renders_in_headless_chromium_without_console_errors(trained_run, tmp_path):
    """The report is one self-contained page: every section renders and nothing is fetched."""
    import shutil
    import subprocess

    from PIL import Image

    from medtransfer.evaluation.report import SECTION_IDS

    run, _ = trained_run
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "Chromium is needed for this test; `make test` installs it (apt-get install chromium)"
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", f"--user-data-dir={tmp_path / 'profile'}",
             "--enable-logging=stderr", "--v=0"]
    url = (run / "report.html").resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for section in ("summary", "configuration", "data", "training", "metrics", "curves", "calibration", "published"):
        assert section in SECTION_IDS and f'id="{section}"' in dom.stdout, section
    console_lines = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Failed to load" in line]
    assert console_lines == []
    screenshot = tmp_path / "report.png"
    shot = subprocess.run([*flags, f"--screenshot={screenshot}", "--window-size=1280,2400", url],
                          capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    pixels = np.asarray(Image.open(screenshot).convert("L"))
    assert pixels.shape == (2400, 1280) and pixels.std() > 10  # a rendered page, not a blank one


def test_linear_probe_without_augmentation_trains_on_cached_features(tiny_data, trained_run, tmp_path, monkeypatch, capsys):
    _, cache = trained_run
    run = tmp_path / "probe"
    code, out, err = run_cli(["train", "--data", tiny_data, "--out", run, "--cache-dir", cache, "--epochs", "5",
                              "--strategy", "linear-probe", "--set", "augment=false", "--set", "lr=0.01",
                              "--skip-bad-images", *FAST], monkeypatch, capsys)
    assert code == 0, err
    assert "Feature pass:" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["params"]["trainable"] == 1_026
    history = read_csv(run / "history.csv")
    assert [int(r["epoch"]) for r in history] == list(range(1, metrics["epochs_run"] + 1))
    assert 1 <= metrics["best_epoch"] <= metrics["epochs_run"]
    best_row = history[metrics["best_epoch"] - 1]
    assert float(best_row["val_loss"]) == min(float(r["val_loss"]) for r in history)


def test_grayscale_single_channel_model_trains_predicts_and_explains(tiny_data, trained_run, tmp_path, monkeypatch, capsys):
    _, cache = trained_run
    run = tmp_path / "gray"
    code, _, err = run_cli(["train", "--data", tiny_data, "--out", run, "--cache-dir", cache, "--epochs", "1",
                            "--set", "in_channels=1", "--skip-bad-images", *FAST], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((run / "model" / "model.json").read_text())["in_channels"] == 1
    image = sorted((tiny_data / "test" / "PNEUMONIA").glob("*.png"))[0]
    code, out, err = run_cli(["predict", "--run", run, image, "--cam", tmp_path / "cams"], monkeypatch, capsys)
    assert code == 0, err
    assert list((tmp_path / "cams").glob("*_gradcam.png")) and list((tmp_path / "cams").glob("*_gradcam.npy"))


def test_output_stride_16_trains_saves_and_explains_on_a_finer_map(tiny_data, trained_run, tmp_path, monkeypatch, capsys):
    _, cache = trained_run
    run = tmp_path / "os16"
    fast = [*FAST[:FAST.index("--image-size")], "--image-size", "64", "--set", "cache_size=72", *FAST[FAST.index("--batch-size"):]]
    code, _, err = run_cli(["train", "--data", tiny_data, "--out", run, "--cache-dir", cache, "--epochs", "1",
                            "--skip-bad-images", *fast, "--backbone", "efficientnet_lite0", "--output-stride", "16"],
                           monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((run / "model" / "model.json").read_text())["output_stride"] == 16
    assert yaml.safe_load((run / "config.yaml").read_text())["output_stride"] == 16
    image = sorted((tiny_data / "test" / "PNEUMONIA").glob("*.png"))[0]
    code, _, err = run_cli(["explain", "--run", run, image, "--out", tmp_path / "maps"], monkeypatch, capsys)
    assert code == 0, err
    assert np.load(next((tmp_path / "maps").glob("*_gradcam.npy"))).shape == (64, 64)
    # load_model rebuilt the dilated network: its last feature map of a 64 px input is 4 x 4, not 2 x 2.
    net = load_model(run).model.net
    sizes = []
    hook = net.get_submodule("bn2").register_forward_hook(lambda m, a, o: sizes.append(tuple(o.shape[-2:])))
    with torch.no_grad():
        net(torch.zeros(1, 3, 64, 64))
    hook.remove()
    assert sizes == [(4, 4)]


def test_export_command_writes_a_verified_onnx_file(trained_run, tmp_path, monkeypatch, capsys):
    run, _ = trained_run
    out = tmp_path / "model.onnx"
    code, stdout, err = run_cli(["export", "--run", run, "--out", out], monkeypatch, capsys)
    assert code == 0, err
    assert out.is_file() and "checked against PyTorch with onnxruntime" in stdout
    code, _, err = run_cli(["export", "--run", run, "--out", tmp_path / "model.txt"], monkeypatch, capsys)
    assert code == 1 and "name a .onnx file" in err


@pytest.mark.parametrize("backbone", list_backbones())
def test_explain_command_for_every_registered_backbone(backbone, tiny_data, tmp_path, monkeypatch, capsys):
    from medtransfer.artifacts import model_info, save_model
    from medtransfer.models.backbones import create_backbone
    from medtransfer.models.strategies import TransferModel

    torch.manual_seed(0)
    net, spec = create_backbone(backbone, num_classes=2, weights="none")
    model = TransferModel(net, spec)
    info = model_info(model, classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", threshold=0.5,
                      image_size=64, decode_size=72)
    save_model(model, info, tmp_path / "run")
    images = sorted((tiny_data / "test" / "PNEUMONIA").glob("*.png"))[:2]
    for method in ("gradcam", "cam"):
        code, out, err = run_cli(["explain", "--run", tmp_path / "run", *images, "--out", tmp_path / method,
                                  "--method", method], monkeypatch, capsys)
        assert code == 0, err
        for image in images:
            heat = np.load(tmp_path / method / f"{image.stem}_{method}.npy")
            assert heat.shape == (64, 64) and 0 <= heat.min() <= heat.max() <= 1
            assert (tmp_path / method / f"{image.stem}_{method}.png").is_file()


def test_predict_on_onnxruntime_gives_torchs_rows_and_evaluate_records_its_devices(trained_run, tmp_path, monkeypatch,
                                                                                   capsys):
    run, _ = trained_run
    images = sorted(r["path"] for r in read_csv(run / "predictions_test.csv"))[:5]
    onnx_path = tmp_path / "m.onnx"
    code, _, err = run_cli(["predict", "--run", run, *images, "--runtime", "onnxruntime", "--onnx", onnx_path],
                           monkeypatch, capsys)
    assert code == 1 and err.strip() == (f"error: --runtime onnxruntime: {onnx_path} does not exist; run "
                                         "`medtransfer export --run RUN` first (or pass --onnx FILE)")
    assert run_cli(["export", "--run", run, "--out", onnx_path], monkeypatch, capsys)[0] == 0
    tables = {}
    for runtime in ("torch", "onnxruntime"):
        out_csv = tmp_path / f"{runtime}.csv"
        extra = ["--onnx", onnx_path] if runtime == "onnxruntime" else []
        code, _, err = run_cli(["predict", "--run", run, *images, "--csv", out_csv, "--runtime", runtime,
                                "--devices", "auto", "--accelerator", "cpu", *extra], monkeypatch, capsys)
        assert code == 0, err
        tables[runtime] = read_csv(out_csv)
    assert [r["path"] for r in tables["torch"]] == [r["path"] for r in tables["onnxruntime"]] == images
    assert [r["pred"] for r in tables["torch"]] == [r["pred"] for r in tables["onnxruntime"]]
    code, _, err = run_cli(["predict", "--run", run, *images, "--accelerator", "cpu", "--devices", "3"], monkeypatch, capsys)
    assert code == 1 and err.startswith("error: --devices 3: on the CPU") and len(err.strip().splitlines()) == 1


def test_trivial_augment_with_mixup_and_cutmix_trains_and_records_its_policy(tiny_data, trained_run, tmp_path, monkeypatch, capsys):
    _, cache = trained_run
    run = tmp_path / "trivial"
    code, out, err = run_cli(["train", "--data", tiny_data, "--out", run, "--cache-dir", cache, "--epochs", "1",
                              "--augment", "trivial", "--mixup", "0.2", "--cutmix", "1.0", "--skip-bad-images", *FAST],
                             monkeypatch, capsys)
    assert code == 0, err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["augment"], saved["mixup"], saved["cutmix"], saved["augment_on"]) == ("trivial", 0.2, 1.0, "auto")
    assert np.isfinite(float(read_csv(run / "history.csv")[0]["train_loss"]))
    assert load_model(run).info.positive_class == "PNEUMONIA"
    code, _, err = run_cli(["train", "--data", tiny_data, "--out", tmp_path / "bad", "--augment", "flip"], monkeypatch, capsys)
    assert code == 1 and err.strip() == "error: --augment: got 'flip'; choose one of none, light, radiograph, trivial"
