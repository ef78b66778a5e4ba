"""The page of `medtransfer serve` as a person uses it: Chromium driven by Playwright against a live server.

Choose files, press Classify, read the class, the probabilities and the heatmap; junk and oversized files show
their error; several files at once each get their answer; the model card shows the operating point, the run's
figures with CIs and the intended use.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from medtransfer.serving.app import INTENDED_USE
from tests.serving.live import live_server, save_random_model

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} is absent; `make test` installs it (apt-get install chromium)")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("page") / "run", ["NORMAL", "PNEUMONIA"], threshold=0.44,
                             temperature=1.2, image_size=48, decode_size=56, threshold_policy="youden", metrics=True)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url: str):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("requestfailed", lambda request: errors.append(f"failed: {request.url}"))
    page.on("request", lambda request: None if request.url.startswith((url, "data:")) else errors.append(request.url))
    page.goto(url + "/")
    return page, errors


def submit(page, files: list[Path]) -> None:
    page.set_input_files("#file", [str(f) for f in files])
    page.click("button[type=submit]")
    page.wait_for_selector(f"#results[data-done='{len(files)}']", timeout=60_000)


def test_a_person_classifies_images_and_reads_the_model_card(browser, run, tmp_path, make_image):
    images = [make_image(tmp_path / f"xray{i}.png", size=(80 + 9 * i, 70)) for i in range(3)]
    junk = tmp_path / "notes.png"
    junk.write_bytes(b"this is not an image")
    with live_server(run) as url:
        page, errors = open_page(browser, url)
        page.wait_for_selector("#metrics")
        card = page.inner_text("#card")
        assert "resnet18: NORMAL / PNEUMONIA; positive class PNEUMONIA, threshold 0.440 (youden)" in card
        assert "Threshold policy: youden" in card and INTENDED_USE in card
        rows = [r.split("\t") for r in page.inner_text("#metrics").splitlines()]
        assert rows[1][:3] == ["val", "40", "0.910 (0.820-0.970)"] and rows[2][:3] == ["test", "60", "0.880 (0.790-0.950)"]

        submit(page, [images[0]])
        block = page.locator("section.answer").first
        assert block.locator(".predicted").inner_text() in ("NORMAL", "PNEUMONIA")
        probabilities = block.locator("table.probabilities").inner_text()
        assert "NORMAL" in probabilities and "PNEUMONIA" in probabilities
        heatmap = block.locator("img")
        assert heatmap.get_attribute("alt") == "Grad-CAM heatmap of xray0.png"
        assert heatmap.evaluate("img => img.complete && img.naturalWidth") >= 48  # the PNG decoded in the browser

        submit(page, [*images, junk])  # several files at once (multi-select)
        blocks = page.locator("section.answer")
        assert blocks.count() == 4
        for i, image in enumerate(images):
            assert blocks.nth(i).get_attribute("data-file") == image.name
            assert blocks.nth(i).locator(".predicted").count() == 1 and blocks.nth(i).locator("img").count() == 1
        error = blocks.nth(3).locator(".error").inner_text()
        assert error.startswith("notes.png: not a readable image (unrecognised format") and "DICOM" in error
        assert errors == []


def test_an_oversized_file_shows_its_error(browser, run, tmp_path):
    big = tmp_path / "huge.png"
    big.write_bytes(b"\0" * (2 * 2**20))
    with live_server(run, max_upload_mb=1) as url:
        page, _ = open_page(browser, url)
        page.wait_for_selector("#metrics")
        submit(page, [big])
        assert page.inner_text("section.answer .error") == "huge.png: upload too large (2.0 MB); the limit is 1 MB"


def test_the_page_sends_the_token_given_once_in_the_address(browser, run, tmp_path, make_image):
    image = make_image(tmp_path / "t.png", size=(60, 60))
    with live_server(run, token="s3cret") as url:
        page, _ = open_page(browser, url)
        assert "token" in page.locator("#card .error").inner_text()  # no token yet: the card says what is missing
        page.goto(url + "/?token=s3cret")
        page.wait_for_selector("#metrics")
        assert page.url == url + "/"  # the token left the address bar
        page.reload()  # kept in localStorage
        page.wait_for_selector("#metrics")
        submit(page, [image])
        assert page.locator("section.answer .predicted").count() == 1
