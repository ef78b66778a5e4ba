"""serving.app: the API answers as `medtransfer predict` does, refuses bad uploads with the decoder's message
and the right status, shows the model card, and refuses to listen beyond localhost without a token."""

from __future__ import annotations

import base64
import io
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from medtransfer.artifacts import load_model
from medtransfer.data.decode import ACCEPTED_FORMATS
from medtransfer.errors import ConfigError
from medtransfer.predict import predict_files
from medtransfer.serving.app import INTENDED_USE, check_bind, create_app
from tests.serving.live import save_random_model


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("serve") / "run", ["NORMAL", "PNEUMONIA"], threshold=0.44,
                             temperature=1.2, image_size=48, decode_size=56, threshold_policy="youden", metrics=True)


@pytest.fixture(scope="module")
def client(run) -> TestClient:
    return TestClient(create_app(load_model(run), run_dir=run))


def png_bomb(width: int, height: int) -> bytes:
    """A valid 16-bit grayscale PNG header declaring width x height, with a tiny (truncated) IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([16, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


def post(client: TestClient, name: str, payload: bytes, query: str = "") -> tuple[int, dict]:
    response = client.post(f"/predict{query}", files={"file": (name, payload, "image/png")})
    return response.status_code, response.json()


def test_server_predicts_like_the_cli_with_a_heatmap(client, run, tmp_path, make_image):
    saved = load_model(run)
    image = make_image(tmp_path / "upload.png", size=(90, 70))
    status, answer = post(client, image.name, image.read_bytes(), "?cam=true&cam_values=true")
    assert status == 200, answer
    expected = predict_files(saved, [image], accelerator="cpu")[0]
    assert answer["probabilities"]["PNEUMONIA"] == pytest.approx(expected["prob_PNEUMONIA"], abs=1e-6)
    assert answer["predicted"] == expected["pred"] and answer["threshold"] == saved.threshold
    assert answer["filename"] == "upload.png" and answer["positive_class"] == "PNEUMONIA"
    overlay = Image.open(io.BytesIO(base64.b64decode(answer["gradcam_png"])))
    assert overlay.width >= 48 and overlay.height > 48  # the model's 48 x 48 crop plus the caption strip
    heat = np.frombuffer(base64.b64decode(answer["gradcam_map"]["float32_base64"]), "<f4").reshape(answer["gradcam_map"]["shape"])
    assert heat.shape == (48, 48) and 0 <= heat.min() and heat.max() <= 1
    assert answer["cam_method"] == "gradcam"  # a run trained without --cam-method
    status, plain = post(client, "a.png", image.read_bytes())
    assert status == 200 and "gradcam_png" not in plain and plain["probabilities"] == answer["probabilities"]


def test_bad_uploads_get_the_decoders_message_and_status(client, tmp_path, make_image):
    status, answer = post(client, "notes.png", b"not an image at all")
    assert status == 415 and answer["detail"].startswith("notes.png: not a readable image (unrecognised format")
    assert all(fmt in answer["detail"] for fmt in ACCEPTED_FORMATS) and "--skip-bad-images" not in answer["detail"]
    status, answer = post(client, "anim.gif", b"GIF89a" + b"\0" * 64)
    assert status == 415 and "GIF files are not accepted" in answer["detail"]
    whole = make_image(tmp_path / "whole.png", size=(90, 70)).read_bytes()
    status, answer = post(client, "cut.png", whole[: len(whole) // 2])
    assert status == 400 and answer["detail"].startswith("cut.png: not a readable image")
    status, answer = post(client, "bomb.png", png_bomb(13000, 13000))
    assert status == 413 and "13000 x 13000" in answer["detail"] and "checked before decoding" in answer["detail"]
    status, answer = post(client, "empty.png", b"")
    assert status == 400 and "empty" in answer["detail"]


def test_model_card_has_the_operating_point_and_the_runs_figures(client):
    card = client.get("/model").json()
    assert {k: card[k] for k in ("backbone", "classes", "positive_class", "threshold", "threshold_policy")} == {
        "backbone": "resnet18", "classes": ["NORMAL", "PNEUMONIA"], "positive_class": "PNEUMONIA",
        "threshold": 0.44, "threshold_policy": "youden"}
    assert card["metrics"]["val"]["auc"] == 0.91 and card["metrics"]["val"]["auc_ci"] == [0.82, 0.97]
    assert card["metrics"]["test"]["n"] == 60 and card["metrics"]["test"]["sensitivity_ci"] == [0.64, 0.95]
    assert card["intended_use"] == INTENDED_USE and card["max_upload_mb"] == 50


def test_a_model_outside_a_run_has_no_figures_and_null_policy(tmp_path):
    plain = save_random_model(tmp_path / "plain", ["A", "B"], threshold=0.5, image_size=32, decode_size=40)
    card = TestClient(create_app(load_model(plain), run_dir=plain / "model")).get("/model").json()
    assert card["threshold_policy"] is None and card["metrics"] == {}


def test_token_is_required_for_the_api_but_not_for_the_page(run, tmp_path, make_image):
    client = TestClient(create_app(load_model(run), token="s3cret"))
    image = make_image(tmp_path / "t.png", size=(40, 40)).read_bytes()
    assert client.get("/").status_code == 200 and client.get("/health").status_code == 200
    refused = client.get("/model")
    assert refused.status_code == 401 and "token" in refused.json()["detail"]
    assert client.get("/model", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/model", headers={"Authorization": "Bearer s3cret"}).json()["token_required"] is True
    ok = client.post("/predict", files={"file": ("t.png", image)}, headers={"X-Token": "s3cret"})
    assert ok.status_code == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.org"])
def test_binding_beyond_localhost_needs_a_token_or_insecure(host):
    with pytest.raises(ConfigError, match=rf"--host {host}: .*--token .*--insecure"):
        check_bind(host, token=None, insecure=False)
    check_bind(host, token="t", insecure=False)
    check_bind(host, token=None, insecure=True)
    for local in ("127.0.0.1", "localhost", "::1"):
        check_bind(local, token=None, insecure=False)


def test_bad_limits_are_refused_naming_the_option(run):
    with pytest.raises(ConfigError, match="--max-concurrent: got 0"):
        create_app(load_model(run), max_concurrent=0)
    with pytest.raises(ConfigError, match="--max-upload-mb: got -1"):
        create_app(load_model(run), max_upload_mb=-1)


def test_serve_refuses_a_public_host_without_a_token_in_one_line(run, capsys, monkeypatch):
    import sys

    from medtransfer.cli import main

    monkeypatch.delenv("MEDTRANSFER_TOKEN", raising=False)
    monkeypatch.setattr(sys, "argv", ["medtransfer", "serve", "--run", str(run), "--host", "0.0.0.0"])
    with pytest.raises(SystemExit) as exit_:
        main()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 1 and len(lines) == 1
    assert lines[0].startswith("error: --host 0.0.0.0: ") and "--insecure" in lines[0]


@pytest.mark.parametrize(("flags", "evil_status"), [([], 403), (["--allow-host", "evil.example"], 200)])
def test_serve_guards_the_host_it_listens_on(run, monkeypatch, flags, evil_status):
    import uvicorn
    from typer.testing import CliRunner

    from medtransfer.cli import app as cli

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    result = CliRunner().invoke(cli, ["serve", "--run", str(run), "--body-timeout", "5", "--min-upload-rate", "0", *flags])
    assert result.exit_code == 0, result.output
    assert (served["host"], served["port"]) == ("127.0.0.1", 8000)
    assert TestClient(served["app"], base_url="http://127.0.0.1:8000").get("/health").status_code == 200
    assert TestClient(served["app"], base_url="http://evil.example").get("/health").status_code == evil_status


def test_serve_refuses_bad_body_rules(run):
    with pytest.raises(ConfigError, match="--body-timeout: got 0"):
        create_app(load_model(run), body_timeout=0)
    with pytest.raises(ConfigError, match="--min-upload-rate: got -1"):
        create_app(load_model(run), min_upload_rate=-1)
