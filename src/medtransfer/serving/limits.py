"""Pure ASGI middleware that guards the server before a request reaches FastAPI.

Order, outermost first (see :func:`guard`): the access log (one JSON line per request); the token check,
or without a token the Host/Origin check (:class:`SameOrigin`: 403 for a foreign Host, DNS rebinding, or a
foreign Origin, a web page elsewhere posting here); the body, received whole before the request may take a
slot (:class:`~medtransfer.serving.body.BodySpool`: 413 over the size cap, 408 past the body deadline or
under the minimum rate, spooled to memory or a temporary file); and the admission limit (at most
``max_concurrent`` requests run and ``queue`` wait; one more gets 503 with ``Retry-After``). They are plain
ASGI, not Starlette's BaseHTTPMiddleware, so the body streams through untouched.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from medtransfer.serving.body import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MIN_RATE_KB,
    MIN_RECEIVING,
    RETRY_AFTER_SECONDS,
    BodyRules,
    BodySpool,
    header,
    reply,
)

Scope = MutableMapping[str, Any]  # as Starlette (FastAPI) types the ASGI interface
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOGGER = logging.getLogger("medtransfer.serve")
DEFAULT_MAX_UPLOAD_MB = 50
OPEN_PATHS = ("/", "/health")  # the page must load before the user has typed the token
LOCAL_NAMES = ("localhost",)  # with *.localhost: names that only ever mean this machine
DEFAULT_PORTS = {"http": 80, "https": 443}
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
__all__ = ["DEFAULT_BODY_TIMEOUT", "DEFAULT_MAX_UPLOAD_MB", "DEFAULT_MIN_RATE_KB", "AccessLog", "Admission",
           "BodyRules", "SameOrigin", "TokenCheck", "guard", "log_requests_to_stderr"]


def split_host(value: str, scheme: str = "http") -> tuple[str, int | None]:
    """``(name, port)`` of a Host header or an Origin's authority: lower case, IPv6 brackets and a trailing dot
    removed, the scheme's default port when none is given; port None when it is not a number."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port_text = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    port = int(port_text) if port_text.isdigit() else (DEFAULT_PORTS.get(scheme) if not port_text else None)
    return name.rstrip("."), port


def is_local_name(name: str, hosts: Iterable[str]) -> bool:
    """A Host that no outside web page can take over: one of ``hosts`` (the bound host, --allow-host), localhost
    and ``*.localhost``, or an IP address (DNS rebinding needs a name the attacker's DNS answers for)."""
    if name in hosts or name in LOCAL_NAMES or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class SameOrigin:
    """For a server without a token: 403 unless the request is for this server, from this server's page.

    - ``Host`` (when ``hosts`` is given; None for an app not bound to an address, e.g. under TestClient)
      must be one of ``hosts``, localhost, ``*.localhost`` or an IP address: a page on ``evil.example`` whose
      DNS answer is switched to 127.0.0.1 (DNS rebinding) sends ``Host: evil.example``.
    - ``Origin``, when sent, must be this server's own (scheme, host and port of the request); ``null``
      (sandboxed frames, files) is foreign. Without an Origin, a ``POST`` (or another unsafe method)
      marked ``Sec-Fetch-Site: cross-site`` by the browser is refused too; a GET so marked (a link followed from
      another site) is not. Clients that are not browsers send neither.
    """

    def __init__(self, app: ASGIApp, *, hosts: Iterable[str] | None) -> None:
        self.app = app
        self.hosts = None if hosts is None else {split_host(h)[0] for h in hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self.problem(scope)
        if problem:
            return await reply(send, 403, problem, {"Vary": "Origin, Host"})
        await self.app(scope, receive, send)

    def problem(self, scope: Scope) -> str | None:
        """Why the request is refused, or None."""
        scheme = scope.get("scheme", "http")
        host = header(scope, b"host")
        if host is not None and self.hosts is not None and not is_local_name(split_host(host, scheme)[0], self.hosts):
            names = ", ".join(sorted({*self.hosts, *LOCAL_NAMES}))
            return (f"Host {host!r} is not a name of this server ({names} or an IP address): refused against DNS "
                    "rebinding; open the server by one of those, start it with --allow-host NAME, or set --token")
        origin = header(scope, b"origin")
        if origin is not None:
            parts = urlsplit(origin.strip())
            own = (host is not None and parts.scheme == scheme
                   and split_host(parts.netloc, parts.scheme) == split_host(host, scheme))
            if not own:
                return (f"request from another web origin ({origin}) refused: without --token this server answers "
                        "only its own page and clients that send no Origin")
        elif scope["method"] in UNSAFE_METHODS and (header(scope, b"sec-fetch-site") or "") == "cross-site":
            return "cross-site request refused: without --token this server answers only its own page"
        return None


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
            return await reply(send, 503, f"server busy: {self.capacity} requests running or queued; retry shortly",
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
        given = header(scope, b"x-token") or ""
        bearer = header(scope, b"authorization") or ""
        if bearer.lower().startswith("bearer "):
            given = bearer[7:].strip()
        if not hmac.compare_digest(given.encode(), self.token):
            return await reply(send, 401, "missing or wrong token: enter the server's token on the page "
                                "(or send it as 'Authorization: Bearer TOKEN')", {"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


class AccessLog:
    """One JSON line per request on the ``medtransfer.serve`` logger: time, path, size, status, latency.
    Status 499: the client went away before any answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, size, status, gone = time.perf_counter(), 0, None, False

        async def counted() -> Message:
            nonlocal size, gone
            message = await receive()
            size += len(message.get("body", b""))
            gone = gone or message["type"] == "http.disconnect"
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
                "size": size, "status": status or (499 if gone else 500), "latency_ms": round((time.perf_counter() - start) * 1000, 1),
            }))


def log_requests_to_stderr() -> None:
    """Send the access log's JSON lines, and only those, to stderr (``serve`` calls this once)."""
    if not LOGGER.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False


def guard(app: ASGIApp, *, body: BodyRules, max_concurrent: int, queue: int, token: str | None,
          hosts: Iterable[str] | None = None) -> ASGIApp:
    """``app`` behind the admission limit, the body rules, the token check (or without a token the Host/Origin
    check; ``hosts``: the names the server is reached by, None to skip the Host part) and the access log.
    At most max(MIN_RECEIVING, max_concurrent + queue) bodies are received at once."""
    wrapped: ASGIApp = BodySpool(Admission(app, max_concurrent=max_concurrent, queue=queue), rules=body,
                                 max_receiving=max(MIN_RECEIVING, max_concurrent + queue))
    wrapped = TokenCheck(wrapped, token=token) if token else SameOrigin(wrapped, hosts=hosts)
    return AccessLog(wrapped)
