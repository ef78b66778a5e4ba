"""Test helpers shared by the serving and page tests: a small saved model, a live uvicorn server and a raw socket client."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from medtransfer.artifacts import load_model, model_info, save_model
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import TransferModel
from medtransfer.rundir import write_metrics
from medtransfer.serving.app import create_app

SPLIT = {"n": 40, "n_positive": 20, "auc": 0.91, "auc_ci": [0.82, 0.97], "sensitivity": 0.85,
         "sensitivity_ci": [0.64, 0.95], "specificity": 0.8, "specificity_ci": [0.58, 0.92], "accuracy": 0.825}


def save_random_model(folder: Path, classes: list[str], *, metrics: bool = False, **settings) -> Path:
    """A random-weight resnet18 saved as `medtransfer train` saves it; `metrics` adds a run's metrics.json."""
    torch.manual_seed(3)
    net, spec = create_backbone("resnet18", num_classes=len(classes), weights="none")
    model = TransferModel(net, spec)
    save_model(model, model_info(model, classes=classes, positive_class=classes[-1], **settings), folder)
    if metrics:
        write_metrics(folder, {"backbone": "resnet18", "classes": classes, "positive_class": classes[-1],
                               "threshold": settings.get("threshold"), "val": dict(SPLIT),
                               "test": {**SPLIT, "n": 60, "auc": 0.88, "auc_ci": [0.79, 0.95]}})
    return folder


@contextmanager
def live_server(run: Path, **options) -> Iterator[str]:
    """create_app over the model in `run`, served by uvicorn in a thread on a free port; yields its URL."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(load_model(run), run_dir=run, **options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def raw_post(url: str, body: Iterable[bytes], *, length: int | None = None, headers: dict[str, str] | None = None,
             pause: float = 0.0, timeout: float = 60.0) -> tuple[str, float, bool]:
    """POST /predict over a plain socket, as a client that writes before it reads: the head (Content-Length
    ``length``, or chunked when None), then each piece of ``body``, ``pause`` seconds apart, stopping early only
    when an answer is already waiting. Returns (the status line, or '' when the connection was reset or closed
    without one; seconds from the first byte to the answer; whether every byte was sent without an error:
    False when the server reset the connection while the client was still writing)."""
    host, port = url.removeprefix("http://").split(":")
    fields = {"Host": f"{host}:{port}", "Content-Type": "multipart/form-data; boundary=x", **(headers or {})}
    fields["Content-Length" if length is not None else "Transfer-Encoding"] = str(length) if length is not None else "chunked"
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    started, complete = time.monotonic(), False
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(f"POST /predict HTTP/1.1\r\n{head}\r\n".encode())
            for piece in body:
                if pause and select.select([sock], [], [], pause)[0]:
                    break  # the server answered while we were still sending
                sock.sendall(piece if length is not None else b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                if length is None:
                    sock.sendall(b"0\r\n\r\n")
                complete = True
        except OSError:
            pass  # the server stopped reading: its answer, if any, is already in our receive buffer
        answer = b""
        try:
            while b"\r\n" not in answer:
                piece = sock.recv(4096)
                if not piece:
                    break
                answer += piece
        except OSError:
            pass
    return answer.split(b"\r\n")[0].decode("latin-1"), time.monotonic() - started, complete
