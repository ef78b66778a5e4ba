"""serving.limits against a live server: bodies refused while streaming, a full queue answered 503, one JSON log line
per request; and serving as a whole under 32 concurrent requests answers exactly as it does one at a time."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serving.live import live_server, save_random_model


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("limits") / "run", ["NORMAL", "PNEUMONIA"], threshold=0.5,
                             image_size=64, decode_size=72, threshold_policy="youden")


def test_oversized_bodies_are_refused_by_length_and_while_streaming(run, tmp_path, make_image):
    received: list[int] = []

    def stream(total: int, piece: int = 64 * 1024):
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
        for start in range(0, total, piece):
            received.append(start)
            yield b"\0" * min(piece, total - start)

    with live_server(run, max_upload_mb=1) as url:
        declared = httpx.post(f"{url}/predict", content=b"\0" * (3 * 2**20),
                              headers={"content-type": "multipart/form-data; boundary=x"})
        assert declared.status_code == 413
        assert declared.json()["detail"] == "upload too large (3.0 MB declared); the limit is 1 MB (the server's --max-upload-mb)"
        try:  # no Content-Length: the bytes are counted as they arrive
            streamed = httpx.post(f"{url}/predict", content=stream(64 * 2**20),
                                  headers={"content-type": "multipart/form-data; boundary=x"})
            assert streamed.status_code == 413 and "more than 1048576 bytes received" in streamed.json()["detail"]
        except httpx.TransportError:
            pass  # the server may close the connection while the client still writes: also a refusal
        small = make_image(tmp_path / "small.png", size=(50, 50))
        assert httpx.post(f"{url}/predict", files={"file": ("small.png", small.read_bytes())}).status_code == 200
    assert len(received) < 256, "the server read on past the limit"  # 1 MB is 16 pieces (+ socket buffers); 64 MB 1024


def test_a_full_queue_answers_503_with_retry_after(run, make_image, tmp_path):
    started = threading.Event()
    image = make_image(tmp_path / "slow.png", size=(40, 40)).read_bytes()

    def slow_body():
        started.set()
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="slow.png"\r\n\r\n'
        time.sleep(3)  # a slow client holds the only slot while the second request arrives
        yield image + b"\r\n--x--\r\n"

    with live_server(run, max_concurrent=1, queue=0) as url:
        with ThreadPoolExecutor(1) as pool:
            holder = pool.submit(httpx.post, f"{url}/predict", content=slow_body(),
                                 headers={"content-type": "multipart/form-data; boundary=x"}, timeout=30)
            started.wait(10)
            time.sleep(0.5)
            busy = httpx.post(f"{url}/predict", files={"file": ("a.png", b"x")})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "2" and "busy" in busy.json()["detail"]
            assert httpx.get(f"{url}/health").status_code == 200  # reads are never queued
            assert holder.result().status_code == 200  # the slow one itself was served
        assert httpx.post(f"{url}/predict", files={"file": ("after.png", image)}).status_code == 200


def test_one_json_log_line_per_request(run, caplog, tmp_path, make_image):
    image = make_image(tmp_path / "log.png", size=(40, 40)).read_bytes()
    with caplog.at_level(logging.INFO, logger="medtransfer.serve"), live_server(run) as url:
        httpx.get(f"{url}/health")
        httpx.post(f"{url}/predict", files={"file": ("log.png", image)})
        httpx.post(f"{url}/predict", files={"file": ("junk.png", b"junk")})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "medtransfer.serve"]
    assert [(x["path"], x["status"]) for x in lines] == [("/health", 200), ("/predict", 200), ("/predict", 415)]
    assert set(lines[1]) == {"time", "method", "path", "size", "status", "latency_ms"}
    assert lines[1]["size"] > len(image) and lines[1]["latency_ms"] > 0


def test_32_concurrent_requests_answer_as_serial_ones(run, tmp_path, make_image):
    """Half with heatmaps, on 4 model copies: every answer equals the one-at-a-time answer for its image."""
    images = [make_image(tmp_path / f"c{i}.png", size=(60 + 7 * i, 50 + 5 * i)).read_bytes() for i in range(8)]
    jobs = [(i % 8, i % 2 == 0) for i in range(32)]

    def ask(url: str, job: tuple[int, bool]) -> httpx.Response:
        k, cam = job
        return httpx.post(f"{url}/predict?cam_values={str(cam).lower()}", files={"file": (f"c{k}.png", images[k])},
                          timeout=120)

    with live_server(run, max_concurrent=4, queue=64) as url:
        serial = {job: ask(url, job).json() for job in set(jobs)}
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda job: ask(url, job), jobs))
    assert [a.status_code for a in answers] == [200] * 32
    for job, answer in zip(jobs, answers):
        got, want = answer.json(), serial[job]
        assert got["predicted"] == want["predicted"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
        if job[1]:
            maps = [np.frombuffer(base64.b64decode(a["gradcam_map"]["float32_base64"]), "<f4") for a in (got, want)]
            np.testing.assert_allclose(maps[0], maps[1], atol=1e-5)


def test_a_stalled_upload_gets_408_and_frees_its_slot():
    from medtransfer.serving.limits import BodyLimit

    async def app(scope, receive, send):
        await receive()

    async def silent():
        await asyncio.sleep(30)

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    limit = BodyLimit(app, max_bytes=1000, read_timeout=0.1)
    started = time.perf_counter()
    asyncio.run(limit({"type": "http", "method": "POST", "path": "/predict", "headers": []}, silent, send))
    assert time.perf_counter() - started < 5
    assert sent[0]["status"] == 408 and b"upload stalled: nothing received for 0.1 s" in sent[1]["body"]
