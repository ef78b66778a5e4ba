"""The one web page `medtransfer serve` shows at /: self-contained, nothing fetched from outside.

It shows the model card (/model) and classifies one or several chosen images, one answer
block per file. A multi-label model's card lists each finding's threshold and temperature, and
its answers list every finding, most probable first, with its probability and threshold; the
findings called (probability >= threshold) are highlighted (class ``positive``). A token, when the server needs one, is typed into the page or given once
as ``/?token=...``; it is kept in localStorage and sent as ``Authorization: Bearer``.
"""

import json

from medtransfer.explain.cam import METHOD_NAMES

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medtransfer</title>
<link rel="icon" href="data:,">
<style>
body{font-family:system-ui,sans-serif;max-width:800px;margin:2rem auto;padding:0 1rem;color:#1d2433}
h1{font-size:1.4rem} h2{font-size:1.1rem} h3{font-size:1rem;margin:.2rem 0} .muted{color:#5a6478}
table{border-collapse:collapse;margin:.6rem 0} td,th{border:1px solid #d7dce5;padding:.3rem .6rem;text-align:left}
.answer{border-top:1px solid #d7dce5;padding:.6rem 0} .answer img{max-width:100%;margin-top:.4rem}
.error{color:#a4262c} button{padding:.4rem 1rem} #auth{margin:.5rem 0}
tr.positive td{background:#fde7e9;font-weight:600}
</style></head><body>
<h1>medtransfer</h1>
<div id="auth"><label>Token (if the server needs one) <input id="token" type="password" autocomplete="off"></label></div>
<section id="card"><p id="model" class="muted">Loading model information...</p></section>
<form id="form"><input id="file" type="file" accept="image/*,.dcm,.dicom" multiple required>
<label><input id="cam" type="checkbox" checked> heatmap</label> <button type="submit">Classify</button></form>
<div id="results"></div>
<script>
const KEY = "medtransfer-token";
const tokenInput = document.getElementById("token");
const params = new URLSearchParams(location.search);
if (params.has("token")) {  // read once, then kept out of the address bar and history
  localStorage.setItem(KEY, params.get("token"));
  history.replaceState(null, "", location.pathname);
}
tokenInput.value = localStorage.getItem(KEY) || "";
tokenInput.addEventListener("change", () => { localStorage.setItem(KEY, tokenInput.value); loadCard(); });
const auth = () => tokenInput.value ? {Authorization: "Bearer " + tokenInput.value} : {};
const el = (tag, text, cls) => { const e = document.createElement(tag); if (text !== undefined) e.textContent = String(text);
  if (cls) e.className = cls; return e; };
const fmt = (x) => (x === null || x === undefined) ? "-" : Number(x).toFixed(3);
const withCi = (v, ci) => fmt(v) + (ci ? ` (${fmt(ci[0])}-${fmt(ci[1])})` : "");
let card = null;

async function loadCard() {
  const target = document.getElementById("card");
  const response = await fetch("/model", {headers: auth()});
  const m = await response.json();
  if (!response.ok) { target.replaceChildren(el("p", m.detail, "error")); return; }
  card = m;
  const multi = m.task === "multi-label";
  const parts = [el("h2", "Model card"), multi
    ? el("p", `${m.backbone}: ${m.classes.length} finding(s), any number per image; one threshold per finding`, "muted")
    : el("p", `${m.backbone}: ${m.classes.join(" / ")}; positive class ${m.positive_class}, ` +
      `threshold ${m.threshold.toFixed(3)} (${m.threshold_policy})`, "muted")];
  parts[1].id = "model";
  if (multi) {
    parts.push(el("p", `Threshold policy: ${m.threshold_policy || "not recorded"}; each finding is called when its ` +
      `calibrated probability (its own temperature) reaches its own threshold, both chosen on the validation split.`));
    const points = el("table"); points.id = "operating-points";
    const head = points.insertRow();
    for (const h of ["finding", "threshold", "temperature"]) head.append(el("th", h));
    for (const f of m.findings) {
      const row = points.insertRow(); row.insertCell().append(f.finding);
      row.insertCell().append(fmt(f.threshold)); row.insertCell().append(fmt(f.temperature));
    }
    parts.push(points);
  } else {
    parts.push(el("p", `Threshold policy: ${m.threshold_policy || "not recorded"}; the threshold applies to the ` +
      `calibrated probability of ${m.positive_class} and was chosen on the validation split.`));
  }
  const splits = Object.entries(m.metrics || {});
  if (splits.length) {
    const table = el("table"); table.id = "metrics";
    const head = table.insertRow();
    for (const h of ["split", "n", "AUC (95% CI)", "sensitivity", "specificity", "accuracy"]) head.append(el("th", h));
    for (const [split, s] of splits) {
      const row = table.insertRow(); row.insertCell().append(split); row.insertCell().append(String(s.n));
      for (const k of ["auc", "sensitivity", "specificity", "accuracy"]) row.insertCell().append(withCi(s[k], s[k + "_ci"]));
    }
    parts.push(table);
  } else {
    parts.push(el("p", "No validation or test figures: the model folder is not inside a run.", "muted"));
  }
  const use = el("p", "Intended use: " + m.intended_use); use.id = "intended-use";
  parts.push(use);
  target.replaceChildren(...parts);
}

const METHOD_NAMES = __METHOD_NAMES__;
async function classify(file, cam, block) {
  if (card && file.size > card.max_upload_mb * 1048576) {
    block.append(el("p", `${file.name}: upload too large (${(file.size / 1048576).toFixed(1)} MB); ` +
      `the limit is ${card.max_upload_mb} MB`, "error"));
    return;
  }
  const body = new FormData(); body.append("file", file);
  let response, answer;
  try {
    response = await fetch(`/predict?cam=${cam}`, {method: "POST", body, headers: auth()});
    answer = await response.json();
  } catch (error) {
    block.append(el("p", `${file.name}: the upload failed (${error.message})`, "error")); return;
  }
  if (!response.ok) { block.append(el("p", answer.detail, "error")); return; }
  if (answer.findings) {  // multi-label: every finding, most probable first; the called ones highlighted
    block.append(el("h3", answer.predicted.length ? answer.predicted.join(", ") : "no finding above its threshold",
      "predicted"));
    const table = el("table", undefined, "findings");
    const head = table.insertRow();
    for (const h of ["finding", "probability", "threshold"]) head.append(el("th", h));
    for (const f of answer.findings) {
      const row = table.insertRow(); if (f.positive) row.className = "positive";
      row.insertCell().append(f.finding); row.insertCell().append(f.probability.toFixed(4));
      row.insertCell().append(f.threshold.toFixed(3));
    }
    block.append(table);
  } else {
    block.append(el("h3", answer.predicted, "predicted"));
    const table = el("table", undefined, "probabilities");
    for (const [name, p] of Object.entries(answer.probabilities)) {
      const row = table.insertRow(); row.insertCell().append(name); row.insertCell().append(p.toFixed(4));
    }
    block.append(table);
  }
  if (answer.ood) {
    block.prepend(el("p", `${answer.ood_message} (OOD score ${answer.ood_score.toFixed(3)} > ${answer.ood_threshold.toFixed(3)})`, "error ood"));
  }
  if (answer.gradcam_png) {
    const img = el("img"); img.alt = `${METHOD_NAMES[answer.cam_method] || "Grad-CAM"} heatmap of ${file.name}` +
      (answer.cam_finding ? ` (${answer.cam_finding})` : "");
    img.src = "data:image/png;base64," + answer.gradcam_png; block.append(img);
  }
}

document.getElementById("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const results = document.getElementById("results");
  const cam = document.getElementById("cam").checked;
  const files = Array.from(document.getElementById("file").files);
  const blocks = files.map((file) => { const b = el("section", undefined, "answer"); b.dataset.file = file.name;
    b.append(el("p", file.name, "muted")); return b; });
  delete results.dataset.done;
  results.replaceChildren(...blocks);
  for (let i = 0; i < files.length; i++) await classify(files[i], cam, blocks[i]);  // one at a time: kind to the server
  results.dataset.done = String(files.length);
});
loadCard();
</script>
<p class="muted">Research software: not a medical device.</p>
</body></html>
"""
PAGE = PAGE.replace("__METHOD_NAMES__", json.dumps(METHOD_NAMES))  # the one mapping, explain.cam's
