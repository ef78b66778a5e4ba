"""serving.app: the API answers as `medtransfer predict` does, refuses bad uploads with a 4xx, and the page renders."""

from __future__ import annotations

import base64
import io
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from medtransfer.artifacts import load_model, model_info, save_model
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import TransferModel
from medtransfer.predict import predict_files
from medtransfer.serving import app as serving
from medtransfer.serving.app import create_app


def save_random_model(folder: Path, classes: list[str], **settings) -> Path:
    """A random-weight resnet18 saved as `medtransfer train` saves it."""
    torch.manual_seed(3)
    net, spec = create_backbone("resnet18", num_classes=len(classes), weights="none")
    model = TransferModel(net, spec)
    save_model(model, model_info(model, classes=classes, positive_class=classes[-1], **settings), folder)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("serve") / "run", ["NORMAL", "PNEUMONIA"], threshold=0.44,
                             temperature=1.2, image_size=48, decode_size=56, threshold_policy="youden")


def test_server_predicts_like_the_cli_and_refuses_bad_uploads(run, tmp_path, make_image):
    saved = load_model(run)
    client = TestClient(create_app(saved))
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/model").json() == {
        "backbone": "resnet18", "classes": ["NORMAL", "PNEUMONIA"], "positive_class": "PNEUMONIA", "threshold": 0.44,
        "threshold_policy": "youden", "temperature": 1.2, "image_size": 48,
    }
    image = make_image(tmp_path / "upload.png", size=(90, 70))
    response = client.post("/predict?cam=true", files={"file": (image.name, image.read_bytes(), "image/png")})
    assert response.status_code == 200, response.text
    answer = response.json()
    expected = predict_files(saved, [image], accelerator="cpu")[0]
    assert answer["probabilities"]["PNEUMONIA"] == pytest.approx(expected["prob_PNEUMONIA"], abs=1e-6)
    assert answer["predicted"] == expected["pred"] and answer["threshold"] == saved.threshold
    assert answer["filename"] == "upload.png" and answer["positive_class"] == "PNEUMONIA"
    assert Image.open(io.BytesIO(base64.b64decode(answer["gradcam_png"]))).size[0] > 0
    assert "gradcam_png" not in client.post("/predict", files={"file": ("a.png", image.read_bytes(), "image/png")}).json()
    bad = client.post("/predict", files={"file": ("notes.png", b"not an image", "image/png")})
    assert bad.status_code == 415 and "notes.png" in bad.json()["detail"]
    assert client.post("/predict", files={"file": ("empty.png", b"", "image/png")}).status_code == 400


def test_an_upload_over_the_size_limit_is_refused(run, tmp_path, make_image, monkeypatch):
    monkeypatch.setattr(serving, "MAX_UPLOAD_BYTES", 64)
    image = make_image(tmp_path / "big.png", size=(90, 70))
    response = TestClient(create_app(load_model(run))).post("/predict", files={"file": ("big.png", image.read_bytes())})
    assert response.status_code == 413 and "big.png" in response.json()["detail"]


def test_model_endpoint_shows_null_for_a_policy_the_model_json_lacks(tmp_path):
    plain = save_random_model(tmp_path / "plain", ["A", "B"], threshold=0.5, image_size=32, decode_size=40)
    assert TestClient(create_app(load_model(plain))).get("/model").json()["threshold_policy"] is None


def test_web_page_renders_model_information_in_headless_chromium(run, tmp_path):
    """The page's script runs in a real browser, calls the API and shows the model; nothing outside is fetched."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(load_model(run)), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        assert browser, "Chromium is needed for this test; `make test` installs it (apt-get install chromium)"
        dom = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", f"--user-data-dir={tmp_path / 'profile'}",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", f"http://127.0.0.1:{port}/"],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "resnet18: NORMAL / PNEUMONIA; positive class PNEUMONIA, threshold 0.440 (youden)" in dom.stdout
    assert [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Failed to load" in line] == []
