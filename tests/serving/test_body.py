"""serving.body: a body is received whole (size cap, deadline, minimum rate, idle) before the request may take a
slot, spooled and replayed unchanged; an oversized body is answered 413 before the rest is drained, so that a
client that writes its whole body before reading still gets the status line (checked with a raw socket)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from medtransfer.serving import body as body_module
from medtransfer.serving.body import BodyRules, BodySpool, Refused, read_body
from medtransfer.serving.limits import Admission
from tests.serving.live import live_server, raw_post, save_random_model

SCOPE = {"type": "http", "method": "POST", "path": "/predict", "headers": [(b"transfer-encoding", b"chunked")]}


def trickle(pieces: list[bytes], gap: float):
    """A fake ASGI receive: each piece ``gap`` seconds after the previous one, the last closing the body."""
    queue = list(pieces)

    async def receive() -> dict:
        await asyncio.sleep(gap)
        piece = queue.pop(0) if queue else b""
        return {"type": "http.request", "body": piece, "more_body": bool(queue)}

    return receive


@pytest.mark.parametrize(("rules", "pieces", "gap", "status", "detail"), [
    (BodyRules(max_bytes=10**6, deadline=0.3, min_rate=0), [b"x" * 100] * 50, 0.05, 408,
     "upload too slow: the body was not complete after 0.3 s"),
    (BodyRules(max_bytes=10**6, min_rate=10_000, grace=0.2), [b"x"] * 50, 0.05, 408, "under 9.76562 KB/s"),
    (BodyRules(max_bytes=10**6, min_rate=0, idle=0.1), [b"x", b"y"], 0.5, 408, "upload stalled: nothing received for 0.1 s"),
    (BodyRules(max_bytes=250, min_rate=0), [b"x" * 100] * 5, 0.0, 413, "more than 250 bytes received"),
])
def test_bodies_that_break_a_rule_are_refused_in_time(rules, pieces, gap, status, detail):
    started = time.perf_counter()
    with pytest.raises(Refused) as refused:
        asyncio.run(read_body(trickle(pieces, gap), rules, lambda chunk: None))
    assert refused.value.status == status and detail in refused.value.detail
    assert time.perf_counter() - started < 2.0


def test_a_body_that_keeps_the_rules_is_written_whole():
    written: list[bytes] = []
    pieces = [b"a" * 1000, b"b" * 1000, b"c"]
    rules = BodyRules(max_bytes=2001, deadline=5, min_rate=1000, grace=0.5)
    assert asyncio.run(read_body(trickle(pieces, 0.01), rules, written.append)) == 2001
    assert b"".join(written) == b"".join(pieces)


def run_spool(spool, scope, receive) -> list[dict]:
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    asyncio.run(spool(scope, receive, send))
    return sent


@pytest.mark.parametrize("memory_bytes", [1 << 20, 10])  # in memory, and rolled over to a temporary file
def test_the_app_gets_the_spooled_body_unchanged(memory_bytes):
    got: list[bytes] = []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            got.append(message["body"])
            if not message["more_body"]:
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    pieces = [bytes([k]) * 70_000 for k in range(5)]
    spool = BodySpool(app, rules=BodyRules(max_bytes=10**6, memory_bytes=memory_bytes))
    sent = run_spool(spool, SCOPE, trickle(pieces, 0))
    assert sent[0]["status"] == 200 and b"".join(got) == b"".join(pieces)
    assert spool.receiving == 0


def test_a_refused_body_is_answered_before_it_is_drained_and_never_after_expect_100():
    log: list[str] = []

    async def app(scope, receive, send):  # never reached
        raise AssertionError("the app saw an oversized body")

    def receive_logged(count: int):
        async def receive():
            count_left = count - sum(1 for x in log if x == "read")
            log.append("read")
            return {"type": "http.request", "body": b"x" * 1000, "more_body": count_left > 1}
        return receive

    async def run(headers):
        sent = []

        async def send(message):
            log.append(message["type"])
            sent.append(message)

        scope = {**SCOPE, "headers": [(b"content-length", str(5 * 2**20).encode()), *headers]}
        await BodySpool(app, rules=BodyRules(max_bytes=2**20))(scope, receive_logged(5), send)
        return sent

    sent = asyncio.run(run([]))
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["detail"] == "upload too large (5.0 MB declared); the limit is 1 MB (the server's --max-upload-mb)"
    assert log == ["http.response.start", "http.response.body"] + ["read"] * 5 + ["http.response.body"]
    log.clear()
    asyncio.run(run([(b"expect", b"100-continue")]))
    assert "read" not in log  # that client has sent no body: nothing to drain


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("body") / "run", ["NORMAL", "PNEUMONIA"], threshold=0.5,
                             image_size=32, decode_size=36)


FORM_HEAD = b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'


def test_a_60_mb_body_gets_a_readable_413_even_from_a_client_that_sends_everything_first(run):
    """The whole body is read and dropped after the answer, so the connection ends with a FIN, not a reset that
    (on a real network) discards the answer still in flight: the client's writes all succeed."""
    total = 60 * 2**20
    pieces = [FORM_HEAD] + [b"\0" * 2**20] * 60
    with live_server(run) as url:  # the default 50 MB cap
        declared, seconds, sent_all = raw_post(url, pieces, length=len(FORM_HEAD) + total)
        assert (declared, sent_all) == ("HTTP/1.1 413 Request Entity Too Large", True)
        streamed, _, sent_all = raw_post(url, pieces)  # chunked: counted as it arrives, refused at 50 MB, the rest drained
        assert (streamed, sent_all) == ("HTTP/1.1 413 Request Entity Too Large", True)
        assert httpx.get(f"{url}/health").status_code == 200
    assert seconds < 30


def test_draining_after_a_413_is_bounded(run, monkeypatch):
    monkeypatch.setattr(body_module, "DRAIN_MIN_BYTES", 2 * 2**20)
    sent: list[int] = []

    def endless():
        yield FORM_HEAD
        for _ in range(256):  # 256 MB offered; the server reads 1 MB + 2 MB drained (+ socket buffers)
            sent.append(1)
            yield b"\0" * 2**20

    with live_server(run, max_upload_mb=1) as url:
        status, _, sent_all = raw_post(url, endless())
    assert len(sent) < 32 and not sent_all, "the server read on past its drain budget"
    assert status in ("", "HTTP/1.1 413 Request Entity Too Large")  # the rest is cut off: maybe a reset


def test_slow_bodies_get_408_and_never_hold_the_request_slot(run, tmp_path, make_image):
    """Two clients that send a byte every 0.2 s, one slot and no queue: a valid request is answered meanwhile,
    and each slow one gets 408 at its deadline."""
    image = make_image(tmp_path / "ok.png", size=(40, 40)).read_bytes()
    started = threading.Barrier(3)

    def slow() -> tuple[str, float]:
        started.wait()
        return raw_post(url, [FORM_HEAD[:1]] * 100, length=10_000, pause=0.2, timeout=20)[:2]

    with live_server(run, max_concurrent=1, queue=0, body_timeout=2.0) as url, ThreadPoolExecutor(2) as pool:
        slow_ones = [pool.submit(slow) for _ in range(2)]
        started.wait()
        time.sleep(0.5)
        answer = httpx.post(f"{url}/predict", files={"file": ("ok.png", image)}, timeout=30)
        assert answer.status_code == 200, answer.text
        for future in slow_ones:
            status, seconds = future.result()
            assert status == "HTTP/1.1 408 Request Timeout" and seconds < 10
        assert httpx.post(f"{url}/predict", files={"file": ("ok.png", image)}, timeout=30).status_code == 200


def test_a_slow_body_answers_with_its_reason(run):
    with live_server(run, body_timeout=1.0) as url:
        response = httpx.post(f"{url}/predict", content=(time.sleep(0.4) or b"x" for _ in range(10)),
                              headers={"content-type": "multipart/form-data; boundary=x"}, timeout=20)
    assert response.status_code == 408
    assert response.json()["detail"].startswith("upload too slow: the body was not complete after 1 s")


def test_too_many_bodies_arriving_at_once_get_503():
    async def app(scope, receive, send):
        raise AssertionError("not reached")

    async def main():
        spool = BodySpool(app, rules=BodyRules(max_bytes=100, min_rate=0, deadline=0.5), max_receiving=1)
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        async def never():
            await asyncio.sleep(10)

        first = asyncio.ensure_future(spool(SCOPE, never, send))
        await asyncio.sleep(0.05)
        await spool(SCOPE, never, send)  # refused at once
        await first  # 408 at the deadline
        return sent

    sent = asyncio.run(main())
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [503, 408]


def test_admission_is_taken_only_after_the_body_is_in():
    """Behind the spool, one slot, no queue: a trickling upload does not hold the slot while it arrives."""
    order: list[str] = []

    async def app(scope, receive, send):
        message = await receive()
        order.append(message["body"].decode())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def main():
        guarded = BodySpool(Admission(app, max_concurrent=1, queue=0), rules=BodyRules(max_bytes=100, min_rate=0))
        statuses: list[int] = []

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        slow = asyncio.ensure_future(guarded(SCOPE, trickle([b"slow"], 0.3), send))
        await asyncio.sleep(0.05)
        await guarded(SCOPE, trickle([b"fast"], 0), send)
        await slow
        return statuses

    assert asyncio.run(main()) == [200, 200]
    assert order == ["fast", "slow"]
