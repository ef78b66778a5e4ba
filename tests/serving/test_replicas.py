"""serving.replicas: `serve --runtime onnxruntime` answers as torch does (probabilities, class, ood_score and
flag within 1e-4), Grad-CAM still works (in torch), and a wrong runtime or ONNX file is refused in one line."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from medtransfer.artifacts import load_model, save_model
from medtransfer.errors import ConfigError
from medtransfer.ood import fit_detector, save_detector
from medtransfer.predict import predict_files
from medtransfer.serving.app import create_app
from tests.serving.live import save_random_model

pytest.importorskip("onnxruntime")
from medtransfer.export import export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A random-weight model with an OOD detector fitted on random features, exported to RUN/model/model.onnx."""
    run = save_random_model(tmp_path_factory.mktemp("replicas") / "run", ["NORMAL", "PNEUMONIA"], threshold=0.44,
                            temperature=1.2, image_size=48, decode_size=56)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 512)).astype(np.float32)
    save_detector(fit_detector(features[:30], np.arange(30) % 2, features[30:], k=3), run / "model")
    export_onnx(run)
    return run


def post(client: TestClient, path: Path, query: str = "") -> dict:
    response = client.post(f"/predict{query}", files={"file": (path.name, path.read_bytes(), "image/png")})
    assert response.status_code == 200, response.text
    return response.json()


def test_onnxruntime_answers_as_torch_and_still_draws_heatmaps(run, tmp_path, make_image):
    torch_client = TestClient(create_app(load_model(run), run_dir=run, max_concurrent=2))
    onnx_client = TestClient(create_app(load_model(run), run_dir=run, max_concurrent=2,
                                        onnx_path=run / "model" / "model.onnx"))
    assert onnx_client.get("/model").json()["runtime"] == "onnxruntime"
    assert torch_client.get("/model").json()["runtime"] == "torch"
    assert "classify(" in onnx_client.get("/").text  # the page is served as with torch
    for i, mode in enumerate(["L", "RGB", "L"]):  # three requests: both replicas of each server answer
        image = make_image(tmp_path / f"{i}.png", mode, size=(70 + i, 64))
        a, b = post(torch_client, image), post(onnx_client, image, "?cam=true")
        assert set(a) | {"gradcam_png", "cam_method"} == set(b) and a["predicted"] == b["predicted"] and a["ood"] == b["ood"]
        fp32 = predict_files(load_model(run), [image], accelerator="cpu", precision="32-true")[0]  # torch, no autocast
        assert max(abs(fp32[f"prob_{c}"] - b["probabilities"][c]) for c in b["probabilities"]) < 1e-4
        assert b["ood_score"] == pytest.approx(fp32["ood_score"], rel=1e-4, abs=1e-4)
        assert len(b["gradcam_png"]) > 100  # Grad-CAM came from the torch copy of the same weights


def test_a_missing_foreign_or_corrupt_onnx_file_is_refused_naming_it(run, tmp_path):
    saved = load_model(run)
    with pytest.raises(ConfigError, match=r"missing.onnx does not exist; run `medtransfer export --run RUN` first"):
        create_app(saved, onnx_path=tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a protobuf at all")
    with pytest.raises(ConfigError, match=r"--onnx .*corrupt.onnx: onnxruntime cannot load it \(.*\); write it again"):
        create_app(saved, onnx_path=corrupt)
    torch.manual_seed(10)  # same architecture and detector, other weights: as if exported before retraining
    for p in saved.model.parameters():
        p.data += 0.05 * torch.randn_like(p)
    save_detector(saved.ood, save_model(saved.model, saved.info, tmp_path / "other"))
    other = tmp_path / "other"
    with pytest.raises(ConfigError, match=r"probabilities differ from the saved model's by .*export it again"):
        create_app(load_model(run), onnx_path=export_onnx(other, tmp_path / "other.onnx"))
    with pytest.raises(ConfigError, match="--runtime onnxruntime runs on the CPU; use --accelerator cpu"):
        create_app(load_model(run), accelerator="gpu", onnx_path=run / "model" / "model.onnx")


def test_missing_onnxruntime_is_one_clear_line(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as when it is not installed
    with pytest.raises(ConfigError, match=r"--runtime onnxruntime needs the \[onnx\] extra: pip install 'medtransfer\[onnx\]'"):
        create_app(load_model(run), onnx_path=run / "model" / "model.onnx")


@pytest.mark.parametrize("args,message", [
    (["--runtime", "tensorrt"], "error: --runtime: got 'tensorrt'; choose torch or onnxruntime"),
    (["--onnx", "m.onnx"], "error: --onnx m.onnx: only used with --runtime onnxruntime"),
    (["--runtime", "onnxruntime", "--onnx", "nowhere.onnx"], "error: --runtime onnxruntime: nowhere.onnx does not exist"),
])
def test_serve_refuses_a_bad_runtime_in_one_line(run, capsys, monkeypatch, args, message):
    from medtransfer.cli import main

    monkeypatch.setattr(sys, "argv", ["medtransfer", "serve", "--run", str(run), *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 1 and len(lines) == 1 and lines[0].startswith(message), lines
