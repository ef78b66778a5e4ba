"""`medtransfer serve`: a FastAPI app and one self-contained web page over a saved model.

POST /predict takes an uploaded image and answers with the calibrated probabilities, the
class at the saved threshold (a multi-label model: every finding with its probability, its
threshold and whether it is called, most probable first; :mod:`medtransfer.serving.replicas`)
and, on request, a Grad-CAM overlay; the upload goes through
the code path of `medtransfer predict` (SavedModel.decode, crop, normalise, then
predict.Classifier: torch, or with ``onnx_path`` the exported model in onnxruntime, the
same answers within 1e-4; Grad-CAM always runs in torch), decoded once per request.
Requests are guarded before they reach FastAPI (:mod:`medtransfer.serving.limits`:
token or, without one, Host/Origin; the body received whole within its size cap, deadline and minimum
rate before the request may take a slot; admission) and run on their own model copy
(:mod:`medtransfer.serving.replicas`). Bad uploads get a 4xx whose detail
is the decoder's own message: 413 for an image over the pixel limit, 415 for a format
other than JPEG/PNG/BMP/TIFF/DICOM, 400 for unreadable data. The page at / uses nothing
outside this server.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse

from medtransfer.artifacts import SavedModel
from medtransfer.data.decode import ACCEPTED_FORMATS
from medtransfer.data.limits import ImageTooLargeError
from medtransfer.errors import ConfigError, DataError, MedtransferError
from medtransfer.rundir import RunDir
from medtransfer.serving.limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_MIN_RATE_KB,
    BodyRules,
    guard,
)
from medtransfer.serving.page import PAGE
from medtransfer.serving.replicas import Replicas

MODEL_KEYS = ("backbone", "classes", "positive_class", "threshold", "threshold_policy", "temperature", "image_size")
CARD_METRICS = ("auc", "sensitivity", "specificity", "accuracy")
INTENDED_USE = (
    "Research software, not a medical device: for images like those the model was trained on "
    "(same modality, view and population); not for diagnosis or triage."
)
TOKEN_ENV = "MEDTRANSFER_TOKEN"
_CLI_HINT = re.compile(r"; fix or remove the file.*$")


def create_app(
    saved: SavedModel,
    *,
    accelerator: str = "cpu",
    run_dir: str | Path | None = None,
    max_concurrent: int = 2,
    queue: int = 64,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    token: str | None = None,
    onnx_path: Path | None = None,
    host: str | None = None,
    allow_hosts: Sequence[str] = (),
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    min_upload_rate: float = DEFAULT_MIN_RATE_KB,
) -> Any:
    """The ASGI app: FastAPI routes behind the guards. ``run_dir``: the run folder, for the model card.
    ``onnx_path``: answer predictions with onnxruntime on the CPU (Grad-CAM still runs in torch).

    Without a ``token``, a request whose Origin is another web origin gets 403, and with ``host`` (the
    address the server listens on) so does one whose Host is not ``host``, one of ``allow_hosts``, localhost
    or an IP address (DNS rebinding); ``host=None`` (an app not bound to an address, e.g. under TestClient)
    checks the Origin only. ``body_timeout``: seconds for a whole body; ``min_upload_rate``: KB/s a body must
    average after the grace period (0: no minimum); both answered with 408."""
    for name, value, least in (("--max-concurrent", max_concurrent, 1), ("--queue", queue, 0)):
        if value < least:
            raise ConfigError(f"{name}: got {value}; use {least} or more")
    for name, amount, unit in (("--max-upload-mb", max_upload_mb, "megabytes"), ("--body-timeout", body_timeout, "seconds")):
        if not amount > 0:
            raise ConfigError(f"{name}: got {amount}; use a positive number of {unit}")
    if not min_upload_rate >= 0:
        raise ConfigError(f"--min-upload-rate: got {min_upload_rate}; use 0 (no minimum) or a positive number of KB/s")
    body = BodyRules(max_bytes=int(max_upload_mb * 2**20), deadline=body_timeout, min_rate=min_upload_rate * 1024)
    api = FastAPI(title="medtransfer", description=f"{saved.info.backbone} classifier: {', '.join(saved.classes)}")
    if onnx_path is not None and accelerator not in ("cpu", "auto"):
        raise ConfigError(f"--accelerator {accelerator}: --runtime onnxruntime runs on the CPU; use --accelerator cpu")
    replicas = Replicas(saved, count=max_concurrent, accelerator=accelerator, onnx_path=onnx_path)
    card = model_card(saved, run_dir, max_upload_mb=max_upload_mb, token=bool(token))
    card["runtime"] = replicas.runtime

    @api.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @api.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @api.get("/model")
    def model() -> dict:
        return card

    # A plain (not async) handler: FastAPI runs it in a worker thread, so /health stays responsive.
    @api.post("/predict")
    def predict(
        file: UploadFile = File(...),
        cam: bool = Query(False, description="Add a heatmap overlay (PNG, base64): the run's --cam-method, Grad-CAM by default"),
        cam_values: bool = Query(False, description="Add the heatmap itself (float32, base64)"),
    ) -> dict:
        name = str(file.filename or "upload")
        payload = file.file.read()
        if not payload:
            raise HTTPException(400, f"{name}: the file is empty; upload an image ({', '.join(ACCEPTED_FORMATS)})")
        decoded = decode_upload(saved, payload, name)
        try:
            return replicas.answer(decoded, name, cam=cam, cam_values=cam_values)
        except MedtransferError as exc:
            raise HTTPException(400, f"{name}: {exc}") from None

    hosts = None if host is None else [host, *allow_hosts]
    return guard(api, body=body, max_concurrent=max_concurrent, queue=queue, token=token, hosts=hosts)


def decode_upload(saved: SavedModel, payload: bytes, name: str) -> torch.Tensor:
    """The upload decoded once; the decoder's message becomes the HTTP detail with its status."""
    try:
        return saved.decode(payload)
    except DataError as exc:
        detail = _CLI_HINT.sub("", str(exc).replace("<image bytes>", name, 1))
        if isinstance(exc, ImageTooLargeError):
            raise HTTPException(413, detail) from None
        unsupported = "medtransfer reads" in detail  # data.decode names the accepted formats only for those
        raise HTTPException(415 if unsupported else 400, detail) from None


def model_card(saved: SavedModel, run_dir: str | Path | None, *, max_upload_mb: float, token: bool) -> dict:
    """What /model shows: model.json's operating point, the run's figures with CIs, intended use.
    ``task``; a multi-label model adds ``findings``: [{finding, threshold, temperature}] in output order
    (its positive_class, threshold and temperature are null)."""
    stored = saved.info.to_json()
    card: dict[str, Any] = {key: stored.get(key) for key in MODEL_KEYS}
    card["task"] = saved.info.task
    if saved.task.multilabel:
        assert saved.info.thresholds is not None and saved.info.temperatures is not None, "checked on load"
        card["findings"] = [{"finding": f, "threshold": t, "temperature": temperature} for f, t, temperature
                            in zip(saved.info.classes, saved.info.thresholds, saved.info.temperatures)]
    card["metrics"] = _run_figures(run_dir)
    card["intended_use"] = INTENDED_USE
    card["max_upload_mb"] = max_upload_mb
    card["token_required"] = token
    return card


def _run_figures(run_dir: str | Path | None) -> dict[str, dict]:
    """{split: {n, n_positive, metric: value, metric_ci: [lo, hi]}} from metrics.json, {} outside a run."""
    if run_dir is None:
        return {}
    root = Path(run_dir)
    for candidate in (root, root.parent):
        run = RunDir(candidate)
        if run.has_metrics():
            break
    else:
        return {}
    figures = {}
    for split, block in run.metrics().splits.items():
        entry: dict[str, Any] = {"n": block.n, "n_positive": block.n_positive}
        for key in CARD_METRICS:
            entry[key] = block.value(key)
            interval = block.interval(key)
            entry[f"{key}_ci"] = list(interval) if interval else None
        figures[split] = entry
    return figures


def check_bind(host: str, *, token: str | None, insecure: bool) -> None:
    """Refuse to listen beyond this machine without a token, unless --insecure says so."""
    if token or insecure or host == "localhost":
        return
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local:
        raise ConfigError(
            f"--host {host}: the server would be reachable from other machines without a token; "
            f"set --token (or {TOKEN_ENV}), or pass --insecure to serve without one"
        )
