"""Request bodies received whole before a request may take a slot: size cap, deadline, minimum rate, spool.

:class:`BodySpool` is plain ASGI and sits outside the admission limit (:func:`medtransfer.serving.limits.guard`):
it reads the whole body first, so a client that uploads slowly holds a connection, never one of the
``--max-concurrent`` request slots. Each rule is answered before the app sees the request, with
``Connection: close``:

- **413** for a body over ``max_bytes``: by ``Content-Length`` before any of it is read, else as soon as the
  bytes received pass the cap. The status line and the message are sent at once; then up to ``drain_bytes``
  more are read and thrown away (never past the deadline, never for ``Expect: 100-continue``, whose client
  has not sent the body), so a client that writes its whole body before it reads still finds the answer
  instead of a reset connection. A body larger still is cut off (the connection closed).
- **408** when the body is not complete ``deadline`` seconds after the request started (``--body-timeout``),
  when after ``grace`` seconds it has arrived at under ``min_rate`` bytes/s on average
  (``--min-upload-rate``), or when nothing arrives for ``idle`` seconds.
- **503** with ``Retry-After`` when ``max_receiving`` bodies are already being received.

The body is spooled in memory up to ``memory_bytes``, beyond that in a temporary file (deleted when the
request ends), and replayed to the app in chunks as if it came from the client.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

Scope = MutableMapping[str, Any]  # as Starlette (FastAPI) types the ASGI interface
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_BODY_TIMEOUT = 60.0  # seconds for the whole body (--body-timeout): 50 MB needs about 0.9 MB/s
DEFAULT_MIN_RATE_KB = 16.0  # KB/s on average once the grace period is over (--min-upload-rate)
GRACE_SECONDS = 5.0  # the minimum rate is not enforced before this
IDLE_SECONDS = 30.0  # nothing received for this long: 408 whatever the average
SPOOL_MEMORY_BYTES = 1 << 20  # a body up to this stays in memory; a larger one goes to a temporary file
DRAIN_MIN_BYTES = 64 << 20  # after a 413, read and discard at most max(this, the cap) more bytes
DRAIN_IDLE_SECONDS = 2.0  # ... and stop as soon as the client pauses this long
REPLAY_CHUNK = 256 << 10
MIN_RECEIVING = 32  # bodies received at once: max(this, --max-concurrent + --queue)
RETRY_AFTER_SECONDS = 2


@dataclass(frozen=True)
class BodyRules:
    """What a request body must satisfy before the app sees it; times in seconds, sizes in bytes."""

    max_bytes: int
    deadline: float = DEFAULT_BODY_TIMEOUT
    min_rate: float = DEFAULT_MIN_RATE_KB * 1024  # bytes/s; 0: no minimum
    grace: float = GRACE_SECONDS
    idle: float = IDLE_SECONDS
    memory_bytes: int = SPOOL_MEMORY_BYTES

    @property
    def drain_bytes(self) -> int:
        return max(DRAIN_MIN_BYTES, self.max_bytes)

    def too_large(self, got: str) -> str:
        return f"upload too large ({got}); the limit is {self.max_bytes / 2**20:g} MB (the server's --max-upload-mb)"

    def too_slow(self, reason: str, seen: int, elapsed: float) -> str:
        if reason == "deadline":
            return (f"upload too slow: the body was not complete after {self.deadline:g} s ({seen} bytes received; "
                    "the server's --body-timeout)")
        if reason == "rate":
            return (f"upload too slow: {seen} bytes in {elapsed:.1f} s, under {self.min_rate / 1024:g} KB/s "
                    "(the server's --min-upload-rate)")
        return f"upload stalled: nothing received for {self.idle:g} s"


class Refused(Exception):
    """A body the rules refuse: ``status`` and ``detail`` for the client; ``drain``: bytes that may still be
    read and discarded before the connection is closed."""

    def __init__(self, status: int, detail: str, *, drain: int = 0) -> None:
        super().__init__(detail)
        self.status, self.detail, self.drain = status, detail, drain


class ClientGone(Exception):
    """The client disconnected before its body was complete: nobody to answer."""


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower-case bytes), or None."""
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def _start(status: int, body: bytes, headers: dict[str, str]) -> Message:
    extra = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]}


async def reply(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """A complete JSON ``{"detail": ...}`` response."""
    body = json.dumps({"detail": detail}).encode()
    await send(_start(status, body, headers or {}))
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive, rules: BodyRules, write: Callable[[bytes], Any]) -> int:
    """Receive the whole body, passing each chunk to ``write``; its size in bytes.

    Raises:
        Refused: 413 past the cap, 408 past the deadline, under the minimum rate or idle too long.
        ClientGone: the client disconnected first.
    """
    start = last = time.monotonic()
    seen = 0
    while True:
        limits = [(start + rules.deadline, "deadline"), (last + rules.idle, "idle")]
        if rules.min_rate > 0:  # the average falls under min_rate when the clock passes seen / min_rate
            limits.append((start + max(rules.grace, seen / rules.min_rate), "rate"))
        until, reason = min(limits)
        wait = until - time.monotonic()
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            message = await asyncio.wait_for(receive(), wait)
        except asyncio.TimeoutError:
            raise Refused(408, rules.too_slow(reason, seen, time.monotonic() - start)) from None
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            last = time.monotonic()
            seen += len(chunk)
            if seen > rules.max_bytes:
                raise Refused(413, rules.too_large(f"more than {rules.max_bytes} bytes received"), drain=rules.drain_bytes)
            write(chunk)
        if not message.get("more_body", False):
            return seen


async def discard(receive: Receive, budget: int, until: float) -> bool:
    """Read and drop the rest of a body: at most ``budget`` bytes, until ``until`` (monotonic), while the client
    keeps sending; True when the body ended (the connection can then close without a reset)."""
    while budget >= 0:
        wait = min(until - time.monotonic(), DRAIN_IDLE_SECONDS)
        if wait <= 0:
            return False
        try:
            message = await asyncio.wait_for(receive(), wait)
        except asyncio.TimeoutError:
            return False
        if message["type"] == "http.disconnect":
            return True
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return budget >= 0
    return False


class BodySpool:
    """The body received whole under ``rules`` (413 / 408 / 503, module docstring), spooled, then replayed to
    ``app``; requests that declare no body pass straight through."""

    def __init__(self, app: ASGIApp, *, rules: BodyRules, max_receiving: int = MIN_RECEIVING) -> None:
        self.app, self.rules, self.max_receiving = app, rules, max_receiving
        self.receiving = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = header(scope, b"content-length")
        length = int(declared) if declared is not None and declared.strip().isdigit() else None
        if length == 0 or (length is None and header(scope, b"transfer-encoding") is None):
            return await self.app(scope, receive, send)  # no body: nothing to wait for
        started = time.monotonic()
        if length is not None and length > self.rules.max_bytes:
            refusal = Refused(413, self.rules.too_large(f"{length / 2**20:.1f} MB declared"),
                              drain=length if length <= self.rules.drain_bytes else 0)
            return await self._refuse(scope, receive, send, refusal, started)
        if self.receiving >= self.max_receiving:
            return await reply(send, 503, f"server busy: {self.receiving} uploads arriving; retry shortly",
                               {"Retry-After": str(RETRY_AFTER_SECONDS)})
        with tempfile.SpooledTemporaryFile(max_size=self.rules.memory_bytes) as spool:
            self.receiving += 1  # one event loop: no lock needed between the check and the increment
            try:
                size = await read_body(receive, self.rules, spool.write)
            except ClientGone:
                return
            except Refused as refusal:
                return await self._refuse(scope, receive, send, refusal, started)
            finally:
                self.receiving -= 1
            spool.seek(0)
            await self.app(scope, _replay(spool, size, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, refusal: Refused, started: float) -> None:
        """The refusal, then (413) the rest of the body drained within bounds, then the connection closed."""
        body = json.dumps({"detail": refusal.detail}).encode()
        await send(_start(refusal.status, body, {"Connection": "close"}))
        await send({"type": "http.response.body", "body": body, "more_body": True})
        expects = (header(scope, b"expect") or "").lower() == "100-continue"
        if refusal.drain > 0 and not expects:  # that client waits for 100 Continue: it has sent no body
            await discard(receive, refusal.drain, started + self.rules.deadline)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _replay(spool: Any, size: int, receive: Receive) -> Receive:
    """``receive`` for the app: the spooled body in chunks, then the client's own messages (disconnect)."""
    done = False

    async def replayed() -> Message:
        nonlocal done
        if done:
            return await receive()
        chunk = spool.read(REPLAY_CHUNK)
        done = not chunk or spool.tell() >= size
        return {"type": "http.request", "body": chunk, "more_body": not done}

    return replayed
