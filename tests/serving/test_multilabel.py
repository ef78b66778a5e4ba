"""serving with a multi-label model: the answer lists every finding (probability, threshold, called or not),
most probable first, as `medtransfer predict` decides; the model card lists each finding's operating point;
onnxruntime answers as torch does; the page renders the findings (run in node with a minimal DOM)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from medtransfer.artifacts import load_model
from medtransfer.ood import fit_detector, save_detector
from medtransfer.predict import predict_files
from medtransfer.serving.app import create_app
from medtransfer.serving.page import PAGE
from tests.saved_multilabel import (
    FINDINGS,
    TEMPERATURES,
    THRESHOLDS,
    save_multilabel_model,
)
from tests.serving.live import save_random_model


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A random-weight multi-label model with an OOD detector fitted on random features."""
    run = save_multilabel_model(tmp_path_factory.mktemp("serve-multilabel") / "run", threshold_policy="youden")
    features = np.random.default_rng(0).normal(size=(40, 512)).astype(np.float32)
    save_detector(fit_detector(features[:30], np.arange(30) % 2, features[30:], k=3), run / "model")
    return run


@pytest.fixture(scope="module")
def client(run) -> TestClient:
    return TestClient(create_app(load_model(run), run_dir=run))


def post(client: TestClient, path: Path, query: str = "") -> dict:
    response = client.post(f"/predict{query}", files={"file": (path.name, path.read_bytes(), "image/png")})
    assert response.status_code == 200, response.text
    return response.json()


def test_the_answer_lists_every_finding_most_probable_first_as_predict_decides(client, run, tmp_path, make_image):
    images = [make_image(tmp_path / f"x{i}.png", size=(64, 56)) for i in range(3)]
    rows = predict_files(load_model(run), images, accelerator="cpu")  # the server's precision
    for image, row in zip(images, rows):
        answer = post(client, image)
        assert answer["filename"] == image.name and answer["task"] == "multi-label"
        findings = answer["findings"]
        assert [set(entry) for entry in findings] == [{"finding", "probability", "threshold", "positive"}] * len(FINDINGS)
        assert sorted(entry["finding"] for entry in findings) == sorted(FINDINGS)
        probabilities = [entry["probability"] for entry in findings]
        assert probabilities == sorted(probabilities, reverse=True)
        for entry in findings:
            k = FINDINGS.index(entry["finding"])
            assert entry["threshold"] == THRESHOLDS[k]
            assert entry["probability"] == pytest.approx(row[f"prob_{entry['finding']}"], abs=1e-5)
            assert entry["positive"] is (entry["probability"] >= THRESHOLDS[k]) and entry["positive"] == bool(
                row[f"pred_{entry['finding']}"])
        assert answer["predicted"] == [e["finding"] for e in findings if e["positive"]] == row["findings"].split("|")
        assert answer["probabilities"] == {e["finding"]: e["probability"] for e in findings}
        assert {"ood_score", "ood", "ood_threshold"} <= set(answer)  # the OOD guard still answers
        assert not {"positive_class", "threshold"} & set(answer)


def test_the_heatmap_is_drawn_for_the_most_probable_finding(client, tmp_path, make_image):
    answer = post(client, make_image(tmp_path / "h.png", size=(64, 56)), "?cam=true&cam_values=true")
    assert answer["cam_finding"] == answer["findings"][0]["finding"] and answer["gradcam_png"]
    assert answer["gradcam_map"]["shape"] == [40, 40] and answer["cam_method"] == "gradcam"


def test_the_model_card_shows_each_findings_threshold_and_temperature(client):
    card = client.get("/model").json()
    assert card["task"] == "multi-label" and card["classes"] == FINDINGS
    assert card["findings"] == [{"finding": f, "threshold": t, "temperature": T}
                                for f, t, T in zip(FINDINGS, THRESHOLDS, TEMPERATURES)]
    assert (card["positive_class"], card["threshold"], card["temperature"]) == (None, None, None)
    assert card["threshold_policy"] == "youden"


def test_onnxruntime_answers_as_torch_fp32_does(run, tmp_path, make_image):
    pytest.importorskip("onnxruntime")
    from medtransfer.export import export_onnx

    onnx_path = export_onnx(run, tmp_path / "model.onnx")
    image = make_image(tmp_path / "o.png", size=(64, 56))
    fp32 = predict_files(load_model(run), [image], accelerator="cpu", precision="32-true")[0]  # torch, no autocast
    answer = post(TestClient(create_app(load_model(run), onnx_path=onnx_path)), image)
    assert max(abs(e["probability"] - fp32[f"prob_{e['finding']}"]) for e in answer["findings"]) < 1e-5
    assert answer["predicted"] == fp32["findings"].split("|")
    assert answer["ood_score"] == pytest.approx(fp32["ood_score"], rel=1e-4, abs=1e-4)


# ------------------------------------------------------------------ the page, in node with a minimal DOM

NODE = shutil.which("node")
HARNESS = """
class Node {
  constructor(tag) { this.tag = tag; this.children = []; this.className = ""; this.id = ""; this.dataset = {}; this._text = ""; }
  set textContent(v) { this._text = String(v); this.children = []; }
  get textContent() { return this._text + this.children.map((c) => typeof c === "string" ? c : c.textContent).join(""); }
  append(...xs) { this.children.push(...xs); } prepend(...xs) { this.children.unshift(...xs); }
  replaceChildren(...xs) { this.children = xs; } addEventListener() {}
  insertRow() { const r = new Node("tr"); this.children.push(r); return r; }
  insertCell() { const c = new Node("td"); this.children.push(c); return c; }
}
const nodes = {};
globalThis.document = {createElement: (t) => new Node(t),
  getElementById: (id) => nodes[id] || (nodes[id] = Object.assign(new Node("div"), {id}))};
globalThis.localStorage = {getItem: () => null, setItem: () => {}};
globalThis.location = {search: "", pathname: "/"}; globalThis.history = {replaceState() {}};
globalThis.fetch = async (url) => ({ok: true, json: async () => url.startsWith("/model") ? CARD : ANSWER});
"""
EPILOGUE = """
(async () => {
  await loadCard();
  const block = new Node("section");
  await classify({name: "x.png", size: 10}, false, block);
  const dump = (n) => typeof n === "string" ? n : {tag: n.tag, cls: n.className, id: n.id, text: n._text,
                                                   children: n.children.map(dump)};
  console.log(JSON.stringify({card: dump(nodes["card"]), block: dump(block)}));
})();
"""


def render(card: dict, answer: dict, tmp_path: Path) -> dict:
    """The model card and one answer block as the page's own script builds them."""
    script = re.search(r"<script>(.*)</script>", PAGE, re.S).group(1)
    program = tmp_path / "page.js"
    program.write_text(f"const CARD = {json.dumps(card)};\nconst ANSWER = {json.dumps(answer)};\n"
                       + HARNESS + script + EPILOGUE)
    done = subprocess.run([NODE, str(program)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def find(node: dict, test) -> list[dict]:
    found = [node] if isinstance(node, dict) and test(node) else []
    for child in node.get("children", []) if isinstance(node, dict) else []:
        found += find(child, test)
    return found


def text(node) -> str:
    return node if isinstance(node, str) else node["text"] + "".join(text(c) for c in node["children"])


@pytest.mark.skipif(NODE is None, reason="node is absent: the page's script is not run")
def test_the_page_lists_the_findings_and_highlights_the_called_ones(client, tmp_path, make_image):
    answer = post(client, make_image(tmp_path / "p.png", size=(64, 56)))
    page = render(client.get("/model").json(), answer, tmp_path)
    table = find(page["block"], lambda n: n["cls"] == "findings")[0]
    rows = [[text(cell) for cell in row["children"]] for row in table["children"][1:]]
    assert rows == [[e["finding"], f"{e['probability']:.4f}", f"{e['threshold']:.3f}"] for e in answer["findings"]]
    highlighted = [text(row["children"][0]) for row in table["children"][1:] if row["cls"] == "positive"]
    assert highlighted == answer["predicted"] and highlighted  # the called findings, in the same order
    assert text(find(page["block"], lambda n: n["cls"] == "predicted")[0]) == ", ".join(answer["predicted"])
    points = find(page["card"], lambda n: n["id"] == "operating-points")[0]
    assert [[text(c) for c in row["children"]] for row in points["children"][1:]] == [
        [f, f"{t:.3f}", f"{T:.3f}"] for f, t, T in zip(FINDINGS, THRESHOLDS, TEMPERATURES)]


@pytest.mark.skipif(NODE is None, reason="node is absent: the page's script is not run")
def test_the_single_label_page_still_shows_the_class_and_its_probabilities(tmp_path, make_image):
    run = save_random_model(tmp_path / "single", ["NORMAL", "PNEUMONIA"], threshold=0.44, temperature=1.2,
                            image_size=48, decode_size=56, threshold_policy="youden")
    single = TestClient(create_app(load_model(run)))
    answer = post(single, make_image(tmp_path / "s.png", size=(64, 56)))
    page = render(single.get("/model").json(), answer, tmp_path)
    assert text(find(page["block"], lambda n: n["cls"] == "predicted")[0]) == answer["predicted"]
    table = find(page["block"], lambda n: n["cls"] == "probabilities")[0]
    assert [text(row["children"][0]) for row in table["children"]] == ["NORMAL", "PNEUMONIA"]
    assert "positive class PNEUMONIA, threshold 0.440" in text(page["card"])
    assert not find(page["card"], lambda n: n["id"] == "operating-points")
