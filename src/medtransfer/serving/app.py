"""`medtransfer serve`: a FastAPI app and one self-contained web page over a saved model.

POST /predict takes an uploaded image and answers with the calibrated probabilities, the
class at the saved threshold and, on request, a Grad-CAM overlay; the upload goes through
exactly the code path of `medtransfer predict` (SavedModel.preprocess, then predict.Classifier).
Bad uploads get a 4xx with a one-line reason (domain errors become HTTP errors here and only here). The page at / uses nothing outside
this server.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse

from medtransfer.artifacts import SavedModel
from medtransfer.errors import DataError, MedtransferError
from medtransfer.predict import Classifier, decision_row

MAX_UPLOAD_BYTES = 50 * 1024 * 1024
OOD_MESSAGE = "This image does not look like the training data: the prediction may be meaningless."
MODEL_KEYS = ("backbone", "classes", "positive_class", "threshold", "threshold_policy", "temperature", "image_size")


def create_app(saved: SavedModel, *, accelerator: str = "cpu") -> FastAPI:
    app = FastAPI(title="medtransfer", description=f"{saved.info.backbone} classifier: {', '.join(saved.classes)}")
    stored = saved.info.to_json()
    model_info = {key: stored.get(key) for key in MODEL_KEYS}
    classify = Classifier.on(saved, accelerator=accelerator)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/model")
    def model() -> dict:
        return model_info

    # A plain (not async) handler: FastAPI runs it in a worker thread, so /health stays responsive.
    @app.post("/predict")
    def predict(file: UploadFile = File(...), cam: bool = Query(False, description="Add a Grad-CAM overlay")) -> dict:
        payload = file.file.read(MAX_UPLOAD_BYTES + 1)
        if not payload:
            raise HTTPException(400, f"file {file.filename!r} is empty; upload a PNG or JPEG image")
        if len(payload) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"file {file.filename!r} is larger than {MAX_UPLOAD_BYTES // 2**20} MB")
        try:
            image = saved.preprocess(payload)
        except DataError:
            raise HTTPException(415, f"file {file.filename!r} is not a readable image; upload a PNG or JPEG") from None
        try:
            decision, scores = classify.scored(image[None])
            row = decision_row(saved, str(file.filename), decision, 0, scores)
            overlay = _gradcam_png(saved, payload, file.filename) if cam else None
        except MedtransferError as exc:
            raise HTTPException(400, str(exc)) from None
        answer = {
            "filename": file.filename,
            "predicted": row["pred"],
            "probabilities": {c: row[f"prob_{c}"] for c in saved.classes},
            "positive_class": saved.info.positive_class,
            "threshold": saved.threshold,
        }
        if "ood_score" in row:  # absent for a model saved without an OOD detector
            answer.update(ood_score=row["ood_score"], ood=row["ood"] == "out", ood_threshold=saved.ood.threshold)
            if answer["ood"]:
                answer["ood_message"] = OOD_MESSAGE
        if overlay is not None:
            answer["gradcam_png"] = overlay
        return answer

    return app


def _gradcam_png(saved: SavedModel, payload: bytes, filename: str | None) -> str:
    """The Grad-CAM overlay PNG, base64; explain_files reads files, so the upload goes to a temp folder."""
    from medtransfer.explain.files import explain_files

    suffix = Path(filename or "upload.png").suffix.lower() or ".png"
    with tempfile.TemporaryDirectory(prefix="medtransfer-serve-") as folder:
        image = Path(folder) / f"upload{suffix}"
        image.write_bytes(payload)
        row = explain_files(saved, [image], Path(folder) / "cam")[0]
        return base64.b64encode(Path(row["overlay"]).read_bytes()).decode("ascii")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medtransfer</title>
<link rel="icon" href="data:,">
<style>
body{font-family:system-ui,sans-serif;max-width:760px;margin:2rem auto;padding:0 1rem;color:#1d2433}
h1{font-size:1.4rem} .muted{color:#5a6478} table{border-collapse:collapse;margin:1rem 0}
td,th{border:1px solid #d7dce5;padding:.3rem .6rem;text-align:left} #result img{max-width:100%;margin-top:1rem}
.error{color:#a4262c} button{padding:.4rem 1rem}
</style></head><body>
<h1>medtransfer</h1>
<p id="model" class="muted">Loading model information...</p>
<form id="form"><input id="file" type="file" accept="image/*" required>
<label><input id="cam" type="checkbox" checked> heatmap</label> <button type="submit">Classify</button></form>
<div id="result"></div>
<p class="muted">Research software: not a medical device. The threshold was chosen on the validation split.</p>
<script>
const text = (s) => document.createTextNode(String(s));
fetch("/model").then(r => r.json()).then(m => {
  const el = document.getElementById("model");
  el.textContent = `${m.backbone}: ${m.classes.join(" / ")}; positive class ${m.positive_class}, ` +
    `threshold ${m.threshold.toFixed(3)} (${m.threshold_policy})`;
});
document.getElementById("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const result = document.getElementById("result");
  result.replaceChildren(text("Classifying..."));
  const body = new FormData();
  body.append("file", document.getElementById("file").files[0]);
  const cam = document.getElementById("cam").checked;
  const response = await fetch(`/predict?cam=${cam}`, {method: "POST", body});
  const answer = await response.json();
  result.replaceChildren();
  if (!response.ok) {
    const p = document.createElement("p"); p.className = "error"; p.append(text(answer.detail)); result.append(p); return;
  }
  const heading = document.createElement("h2"); heading.id = "predicted"; heading.append(text(answer.predicted));
  const table = document.createElement("table");
  for (const [name, p] of Object.entries(answer.probabilities)) {
    const row = table.insertRow(); row.insertCell().append(text(name)); row.insertCell().append(text(p.toFixed(4)));
  }
  result.append(heading, table);
  if (answer.ood) {
    const warn = document.createElement("p"); warn.id = "ood"; warn.className = "error";
    warn.append(text(`${answer.ood_message} (OOD score ${answer.ood_score.toFixed(3)} > ${answer.ood_threshold.toFixed(3)})`));
    result.prepend(warn);
  }
  if (answer.gradcam_png) {
    const img = document.createElement("img"); img.alt = "Grad-CAM heatmap";
    img.src = "data:image/png;base64," + answer.gradcam_png; result.append(img);
  }
});
</script></body></html>
"""
