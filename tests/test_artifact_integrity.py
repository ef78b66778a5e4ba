"""A damaged or crafted model folder is refused with one line naming the file and the fix, before anything big is
built: truncated and garbage weight, OOD and ensemble-member files (load_model and `predict`), weights whose
tensors do not fit the declared backbone (checked from the header, on the meta device), and model.json values
past their bounds (image_size 200000, 1001 classes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medtransfer.artifacts import load_model, model_info, save_model
from medtransfer.cli import main
from medtransfer.errors import WeightsError
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import TransferModel
from medtransfer.ood import fit_detector, save_detector

RESTORE = "restore the model folder from a backup"


def _model(seed: int) -> TransferModel:
    torch.manual_seed(seed)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    return TransferModel(net, spec).eval()


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    """A two-member resnet18 ensemble with an OOD detector on its penultimate features, and one image."""
    run = tmp_path_factory.mktemp("integrity") / "run"
    model = _model(0)
    info = model_info(model, classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", threshold=0.5, image_size=48,
                      decode_size=56)
    model_dir = save_model(model, info, run, extra=(_model(1),))
    rng = np.random.default_rng(0)
    save_detector(fit_detector(rng.normal(size=(40, 512)), np.arange(40) % 2, rng.normal(size=(20, 512))), model_dir)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(run / "image.png")
    return run


def _copy(run: Path, to: Path) -> Path:
    to.mkdir(parents=True)
    (to / "model").mkdir()
    for item in (run / "model").iterdir():
        (to / "model" / item.name).write_bytes(item.read_bytes())
    return to


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else os.urandom(4096))


def _predict(args: list) -> tuple[int, str]:
    saved = sys.argv
    sys.argv = ["medtransfer", *map(str, args)]
    try:
        main()
        return 0, ""
    except SystemExit as exit_:
        return exit_.code or 0, ""
    finally:
        sys.argv = saved


@pytest.mark.parametrize("name", ["weights.safetensors", "member_2.safetensors", "ood.safetensors"])
@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_damaged_file_is_one_line_naming_it_and_the_fix(good_run, tmp_path, capsys, name, how):
    run = _copy(good_run, tmp_path / "run")
    _damage(run / "model" / name, how)
    with pytest.raises(WeightsError) as caught:
        load_model(run)
    message = str(caught.value)
    assert str(run / "model" / name) in message and "truncated or corrupt" in message and "\n" not in message
    assert RESTORE in message.lower() and "medtransfer train" in message

    code, _ = _predict(["predict", good_run / "image.png", "--run", run, "--num-workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: ") and len(err.splitlines()) == 1 and name in err


def test_weights_of_another_backbone_are_refused_from_the_header(good_run, tmp_path):
    run = _copy(good_run, tmp_path / "run")
    info = json.loads((run / "model" / "model.json").read_text())
    (run / "model" / "model.json").write_text(json.dumps({**info, "backbone": "resnet50"}))
    with pytest.raises(WeightsError, match=r"weights.safetensors does not fit backbone resnet50 as model.json "
                                           r"describes it: \d+ wrong shapes .*missing tensors"):
        load_model(run)


@pytest.mark.parametrize("field,value,expected", [
    ("image_size", 200_000, "field 'image_size' must be a whole number of pixels in [1, 4096]; got 200000"),
    ("decode_size", 10**9, "field 'decode_size' must be a whole number of pixels in [1, 4096]"),
    ("classes", [f"c{i}" for i in range(1001)], "field 'classes' must be a list of at most 1000 class"),
    ("classes", ["NORMAL", "P" * 201], "class (or finding) names of at most 200 characters"),
    ("eval_crop_fraction", 0.005, "field 'eval_crop_fraction' must leave image_size / eval_crop_fraction (9600) at most 8192"),
])
def test_values_past_their_bounds_are_refused_before_anything_is_built(good_run, tmp_path, field, value, expected):
    run = _copy(good_run, tmp_path / "run")
    info = json.loads((run / "model" / "model.json").read_text())
    (run / "model" / "model.json").write_text(json.dumps({**info, field: value}))
    started = time.perf_counter()
    with pytest.raises(WeightsError) as caught:
        load_model(run)
    assert expected in str(caught.value) and len(str(caught.value)) < 400
    assert time.perf_counter() - started < 2.0


def test_a_huge_declared_backbone_or_image_size_allocates_nothing(good_run, tmp_path):
    """convnext_xxlarge has 846M parameters (3.4 GB); its shapes come from the meta device, so refusing its
    model.json beside resnet18 weights costs seconds and no memory. Measured in a fresh process (peak RSS)."""
    giant = _copy(good_run, tmp_path / "giant")
    info = json.loads((giant / "model" / "model.json").read_text())
    (giant / "model" / "model.json").write_text(json.dumps({**info, "backbone": "convnext_xxlarge"}))
    wide = _copy(good_run, tmp_path / "wide")
    (wide / "model" / "model.json").write_text(json.dumps({**info, "image_size": 200_000}))
    script = (
        "import resource, sys, time\n"
        "from medtransfer.artifacts import load_model\n"
        "from medtransfer.errors import WeightsError\n"
        "for run in sys.argv[1:]:\n"
        "    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()\n"
        "    try:\n"
        "        load_model(run)\n"
        "    except WeightsError as exc:\n"
        "        print('refused', round(time.perf_counter() - started, 2),\n"
        "              (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, str(exc)[:80], flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(giant), str(wide)], capture_output=True, text=True, timeout=300)
    lines = [line.split(maxsplit=3) for line in result.stdout.splitlines() if line.startswith("refused")]
    assert len(lines) == 2, result.stdout + result.stderr
    for _, seconds, grown_mb, _message in lines:
        assert float(seconds) < 30 and int(grown_mb) < 300  # the real network would be 3.4 GB
