"""Test helpers shared by the serving and page tests: a small saved model and a live uvicorn server."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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
