"""serving.limits: bodies refused by length and while streaming, a full queue answered 503, one JSON log line per
request, Host and Origin checked without a token (DNS rebinding, cross-site posts); and serving as a whole under 32
concurrent requests answers exactly as it does one at a time."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from medtransfer.artifacts import load_model
from medtransfer.serving.app import create_app
from medtransfer.serving.body import BodyRules
from medtransfer.serving.limits import guard, split_host
from tests.serving.live import live_server, save_random_model


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("limits") / "run", ["NORMAL", "PNEUMONIA"], threshold=0.5,
                             image_size=64, decode_size=72, threshold_policy="youden")


def test_oversized_bodies_are_refused_by_length_and_while_streaming(run, tmp_path, make_image):
    def stream(total: int, piece: int = 64 * 1024):
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
        for start in range(0, total, piece):
            yield b"\0" * min(piece, total - start)

    with live_server(run, max_upload_mb=1) as url:
        declared = httpx.post(f"{url}/predict", content=b"\0" * (3 * 2**20),
                              headers={"content-type": "multipart/form-data; boundary=x"})
        assert declared.status_code == 413
        assert declared.json()["detail"] == "upload too large (3.0 MB declared); the limit is 1 MB (the server's --max-upload-mb)"
        # no Content-Length: the bytes are counted as they arrive; the rest is drained (bounded: test_body.py)
        streamed = httpx.post(f"{url}/predict", content=stream(8 * 2**20),
                              headers={"content-type": "multipart/form-data; boundary=x"})
        assert streamed.status_code == 413 and "more than 1048576 bytes received" in streamed.json()["detail"]
        small = make_image(tmp_path / "small.png", size=(50, 50))
        assert httpx.post(f"{url}/predict", files={"file": ("small.png", small.read_bytes())}).status_code == 200


def test_a_full_queue_answers_503_with_retry_after():
    """One slot, no queue: while a request runs, the next POST gets 503 at once; reads are never queued."""
    release = asyncio.Event()

    async def app(scope, receive, send):
        if scope["method"] == "POST":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def main():
        guarded = guard(app, body=BodyRules(max_bytes=1000), max_concurrent=1, queue=0, token=None)
        answers: list[tuple[int, dict]] = []

        def request(method: str):
            async def receive():
                return {"type": "http.request", "body": b"x", "more_body": False}

            async def send(message):
                if message["type"] == "http.response.start":
                    answers.append((message["status"], dict(message["headers"])))

            scope = {"type": "http", "method": method, "path": "/predict", "headers": [(b"content-length", b"1")]}
            return guarded(scope, receive, send)

        running = asyncio.ensure_future(request("POST"))
        await asyncio.sleep(0.05)
        await request("POST")
        await request("GET")
        release.set()
        await running
        return answers

    (busy, headers), (read, _), (served, _) = asyncio.run(main())
    assert (busy, read, served) == (503, 200, 200) and headers[b"retry-after"] == b"2"


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


@pytest.mark.parametrize(("value", "scheme", "expected"), [
    ("localhost:8000", "http", ("localhost", 8000)), ("LocalHost.", "http", ("localhost", 80)),
    ("[::1]:8000", "http", ("::1", 8000)), ("[::1]", "https", ("::1", 443)), ("127.0.0.1", "http", ("127.0.0.1", 80)),
    ("evil.example:x", "http", ("evil.example", None)), ("::1", "http", ("::1", 80)),
])
def test_split_host(value, scheme, expected):
    assert split_host(value, scheme) == expected


@pytest.fixture(scope="module")
def bound(run):
    """No token, bound to 127.0.0.1, also reached as gpu-box."""
    return create_app(load_model(run), host="127.0.0.1", allow_hosts=["gpu-box"])


@pytest.mark.parametrize(("base", "headers", "status"), [
    ("http://127.0.0.1:8000", {}, 200),
    ("http://localhost:8000", {"Origin": "http://localhost:8000"}, 200),
    ("http://[::1]:8000", {}, 200),
    ("http://10.1.2.3:8000", {}, 200),  # an IP address cannot be rebound: --host 0.0.0.0 --insecure works
    ("http://gpu-box:8000", {}, 200),  # --allow-host
    ("http://evil.example:8000", {}, 403),  # DNS rebinding: the page's name now points here
    ("http://evil.example:8000", {"Origin": "http://evil.example:8000"}, 403),
    ("http://127.0.0.1:8000", {"Origin": "http://evil.example"}, 403),  # a page elsewhere posting here
    ("http://127.0.0.1:8000", {"Origin": "http://127.0.0.1:9999"}, 403),  # another port is another origin
    ("http://127.0.0.1:8000", {"Origin": "null"}, 403),  # sandboxed frame, file:// page
    ("http://127.0.0.1:8000", {"Sec-Fetch-Site": "cross-site"}, 403),
])
def test_without_a_token_only_this_servers_host_and_origin_may_post(bound, base, headers, status, tmp_path, make_image):
    image = make_image(tmp_path / "o.png", size=(40, 40)).read_bytes()
    response = TestClient(bound, base_url=base).post("/predict", files={"file": ("o.png", image)}, headers=headers)
    assert response.status_code == status, response.text
    if status == 403:
        assert "--token" in response.json()["detail"]


def test_host_and_origin_checks_leave_reads_and_token_users_alone(bound, run):
    navigation = TestClient(bound, base_url="http://127.0.0.1:8000").get("/", headers={"Sec-Fetch-Site": "cross-site"})
    assert navigation.status_code == 200  # a link from another site still opens the page
    assert TestClient(bound, base_url="http://evil.example").get("/model").status_code == 403
    assert TestClient(create_app(load_model(run))).get("/model").status_code == 200  # not bound: Origin only
    with_token = TestClient(create_app(load_model(run), host="127.0.0.1", token="s3cret"), base_url="http://evil.example")
    answer = with_token.get("/model", headers={"Authorization": "Bearer s3cret", "Origin": "http://elsewhere"})
    assert answer.status_code == 200  # token users keep today's behaviour
