"""Pure ASGI middleware that guards the server before a request reaches FastAPI.

Order, outermost first (see :func:`guard`): the access log (one JSON line per request),
the token check, the body limit (``Content-Length`` first, then the bytes as they arrive;
413 before the body fills memory or disk; 408 for an upload that stalls), and the admission limit (at most
``max_concurrent`` requests run and ``queue`` wait; one more gets 503 with ``Retry-After``). They are
plain ASGI, not Starlette's BaseHTTPMiddleware, so the body streams through untouched.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import sys
import time
from typing import Any, Awaitable, Callable

from starlette.exceptions import HTTPException

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOGGER = logging.getLogger("medtransfer.serve")
DEFAULT_MAX_UPLOAD_MB = 50
READ_TIMEOUT_SECONDS = 30.0  # a client that sends nothing for this long loses its slot (408)
RETRY_AFTER_SECONDS = 2
OPEN_PATHS = ("/", "/health")  # the page must load before the user has typed the token


class BodyTooLarge(HTTPException):
    """Raised from inside receive() (413, or 408 for a stalled upload): FastAPI passes HTTPExceptions from
    body parsing through unchanged, so the client gets this status and message."""


async def _reply(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


class BodyLimit:
    """413 for a body over ``max_bytes``: by Content-Length before reading, else by counting chunks."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, read_timeout: float = READ_TIMEOUT_SECONDS) -> None:
        self.app, self.max_bytes, self.read_timeout = app, max_bytes, read_timeout

    def _message(self, got: str) -> str:
        return (f"upload too large ({got}); the limit is {self.max_bytes / 2**20:g} MB "
                "(the server's --max-upload-mb)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _reply(send, 413, self._message(f"{int(declared) / 2**20:.1f} MB declared"), {"Connection": "close"})
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except asyncio.TimeoutError:
                raise BodyTooLarge(408, f"upload stalled: nothing received for {self.read_timeout:g} s",
                                   {"Connection": "close"}) from None
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # Connection: close makes uvicorn drop the connection instead of reading the rest.
                raise BodyTooLarge(413, self._message(f"more than {self.max_bytes} bytes received"), {"Connection": "close"})
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge as exc:
            if started:
                raise
            await _reply(send, exc.status_code, exc.detail, {"Connection": "close"})


class Admission:
    """At most ``max_concurrent`` POST requests run; ``queue`` more wait; the next gets 503 at once."""

    def __init__(self, app: ASGIApp, *, max_concurrent: int, queue: int) -> None:
        self.app, self.capacity = app, max_concurrent + queue
        self.slots = asyncio.Semaphore(max_concurrent)
        self.admitted = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.admitted >= self.capacity:
            return await _reply(send, 503, f"server busy: {self.capacity} requests running or queued; retry shortly",
                                {"Retry-After": str(RETRY_AFTER_SECONDS)})
        self.admitted += 1  # one event loop: no lock needed between the check and the increment
        try:
            async with self.slots:
                await self.app(scope, receive, send)
        finally:
            self.admitted -= 1


class TokenCheck:
    """401 unless the request carries the token (``Authorization: Bearer`` or ``X-Token``); / and /health are open."""

    def __init__(self, app: ASGIApp, *, token: str) -> None:
        self.app, self.token = app, token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = _header(scope, b"x-token") or ""
        bearer = _header(scope, b"authorization") or ""
        if bearer.lower().startswith("bearer "):
            given = bearer[7:].strip()
        if not hmac.compare_digest(given.encode(), self.token):
            return await _reply(send, 401, "missing or wrong token: enter the server's token on the page "
                                "(or send it as 'Authorization: Bearer TOKEN')", {"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


class AccessLog:
    """One JSON line per request on the ``medtransfer.serve`` logger: time, path, size, status, latency."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, size, status = time.perf_counter(), 0, 500

        async def counted() -> Message:
            nonlocal size
            message = await receive()
            size += len(message.get("body", b""))
            return message

        async def noted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, counted, noted)
        finally:
            LOGGER.info(json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "method": scope["method"], "path": scope["path"],
                "size": size, "status": status, "latency_ms": round((time.perf_counter() - start) * 1000, 1),
            }))


def log_requests_to_stderr() -> None:
    """Send the access log's JSON lines, and only those, to stderr (``serve`` calls this once)."""
    if not LOGGER.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False


def guard(app: ASGIApp, *, max_upload_bytes: int, max_concurrent: int, queue: int, token: str | None) -> ASGIApp:
    """``app`` behind the body limit, the admission limit, the token check and the access log."""
    wrapped: ASGIApp = BodyLimit(Admission(app, max_concurrent=max_concurrent, queue=queue), max_bytes=max_upload_bytes)
    if token:
        wrapped = TokenCheck(wrapped, token=token)
    return AccessLog(wrapped)
