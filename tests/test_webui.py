"""The web UI: Flask test client for every route and failure, and a real headless Chromium session."""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from inference import Detector
from webui.app import WebConfig, create_app

from .conftest import png_bomb_header
from .test_api import Server, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def api(tiny_bundle, tmp_path_factory):
    s = Server(tiny_bundle, tmp_path_factory.mktemp("api") / "serve.log", "--threads", "4")
    yield s
    s.stop()


@pytest.fixture()
def client(api):
    return create_app(WebConfig(api_url=api.url, timeout=60)).test_client()


def upload(client, data: bytes, name: str = "photo.jpg", accept: str = "application/json"):
    return client.post("/check", data={"image": (io.BytesIO(data), name)}, headers={"Accept": accept},
                       content_type="multipart/form-data")


def test_page_is_local_accessible_and_mobile_ready(client):
    r = client.get("/")
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert '<label for="image-input"' in html and 'aria-live="polite"' in html and 'role="alert"' in html
    assert 'name="viewport"' in html and 'lang="en"' in html
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    for path in ("/static/app.js", "/static/app.css"):
        asset = client.get(path)
        assert asset.status_code == 200
        html += asset.get_data(as_text=True)
    assert not re.search(r"(src|href)=\"https?://", html) and "@import" not in html and "//cdn" not in html


def test_check_happy_path_matches_the_api(client, odd_images, tiny_bundle):
    data = odd_images["rgb.jpg"].read_bytes()
    r = upload(client, data)
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    expected = Detector(tiny_bundle, device="cpu").predict([data])[0]
    assert body["score"] == pytest.approx(expected.score, abs=1e-5)
    assert body["label"] == expected.label and set(body["experts"]) == set(expected.experts)
    assert body["sha256"] == hashlib.sha256(data).hexdigest() and "@" in body["model"]
    assert body["report_png"].startswith("data:image/png;base64,")
    report = Image.open(io.BytesIO(base64.b64decode(body["report_png"].split(",", 1)[1])))
    assert report.format == "PNG" and report.width == 900 and report.height > 300


def test_check_without_javascript_renders_the_verdict(client, odd_images):
    r = upload(client, odd_images["rgb.webp"].read_bytes(), "x.webp", accept="text/html")
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert re.search(r'id="verdict" class="verdict verdict-(fake|real|uncertain)"', html)
    assert "convnext_atto" in html and "vit_tiny_patch16_224" in html and 'download="dfx-report-' in html


def test_api_errors_are_explained(client, bad_images):
    r = upload(client, b"just some text, not a picture" * 10, "notes.jpg")
    assert r.status_code == 422 and "not an image" in r.get_json()["error"]["message"]
    r = upload(client, bad_images["truncated.jpg"][0].read_bytes(), "cut.jpg")
    assert r.status_code == 422 and "damaged" in r.get_json()["error"]["message"]
    r = upload(client, b"", "empty.jpg")
    assert r.status_code == 400 and "empty" in r.get_json()["error"]["message"]
    r = client.post("/check", data={}, headers={"Accept": "application/json"})
    assert r.status_code == 400 and "Choose an image" in r.get_json()["error"]["message"]
    r = client.get("/nowhere")
    assert r.status_code == 404


def test_api_down_is_a_friendly_502(odd_images):
    dead = create_app(WebConfig(api_url=f"http://127.0.0.1:{free_port()}", timeout=5)).test_client()
    r = upload(dead, odd_images["rgb.jpg"].read_bytes())
    assert r.status_code == 502 and "cannot be reached" in r.get_json()["error"]["message"]
    html = upload(dead, odd_images["rgb.jpg"].read_bytes(), accept="text/html")
    assert html.status_code == 502 and "cannot be reached" in html.get_data(as_text=True)
    assert dead.get("/healthz").status_code == 503


def test_api_too_slow_is_a_504(odd_images):
    """A real TCP peer that accepts the connection and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    conns = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        slow = create_app(WebConfig(api_url=f"http://127.0.0.1:{srv.getsockname()[1]}", timeout=1)).test_client()
        t0 = time.monotonic()
        r = upload(slow, odd_images["rgb.jpg"].read_bytes())
        assert r.status_code == 504 and "did not answer within 1" in r.get_json()["error"]["message"]
        assert time.monotonic() - t0 < 10
    finally:
        stop.set()
        t.join()
        for c in conns:
            c.close()
        srv.close()


def test_limits_are_enforced_before_the_api(odd_images):
    """The API URL is a closed port: an answer other than 502 proves the site stopped the upload itself."""
    site = create_app(WebConfig(api_url=f"http://127.0.0.1:{free_port()}", max_upload_bytes=20_000,
                                max_pixels=1_000_000)).test_client()
    big = os.urandom(30_000)
    r = upload(site, big)
    assert r.status_code == 413
    assert r.get_json()["error"]["message"] == "The file is 29 KB; the limit is 20 KB."
    # issue 26, item 8: sizes that round alike were reported alike ("10.0 MB; the limit is 10.0 MB"), and an
    # upload over the whole-request limit was not given its size
    r = upload(site, os.urandom(20_500))
    assert r.status_code == 413
    assert r.get_json()["error"]["message"] == "The file is 20.0 KB; the limit is 19.5 KB."
    r = upload(site, os.urandom(200_000))  # one file over its limit: that file's message
    assert r.status_code == 413 and r.get_json()["error"]["message"] == "The file is 195 KB; the limit is 20 KB."
    # a check's whole upload is bounded too, refused from its Content-Length before a byte is read (with its size)
    small = create_app(WebConfig(api_url=f"http://127.0.0.1:{free_port()}", max_upload_bytes=20_000,
                                 max_total_bytes=100_000)).test_client()
    r = upload(small, os.urandom(200_000))
    assert r.status_code == 413
    assert r.get_json()["error"]["message"] == ("The upload is 196 KB; the limit for one check is 98 KB "
                                                "(each file up to 20 KB).")
    # and the number of files: a check of 21 images is refused before any reaches the API
    r = site.post("/check", data={"image": [(io.BytesIO(b"x"), f"{k}.jpg") for k in range(21)]},
                  headers={"Accept": "application/json"}, content_type="multipart/form-data")
    assert r.status_code == 413 and r.get_json()["error"]["message"].startswith("21 files is over the limit of 20")
    # several files, one over its limit: that file's own error, the others still tried (the API is down here)
    r = site.post("/check", data={"image": [(io.BytesIO(os.urandom(30_000)), "big.jpg"),
                                            (io.BytesIO(odd_images["rgb.jpg"].read_bytes()), "ok.jpg")]},
                  headers={"Accept": "application/json"}, content_type="multipart/form-data")
    assert r.status_code == 200
    [big_row, ok_row] = r.get_json()["results"]
    assert big_row["error"]["message"] == "The file is 29 KB; the limit is 20 KB."
    assert "cannot be reached" in ok_row["error"]["message"]
    r = upload(site, png_bomb_header(5000, 5000), "huge.png")
    assert r.status_code == 413 and "megapixels" in r.get_json()["error"]["message"]


def test_nothing_is_left_on_disk(client, odd_images, monkeypatch, tmp_path):
    """Uploads over werkzeug's in-memory threshold spool to a temporary file; it must be gone afterwards."""
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 256, (500, 500, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    assert len(buf.getvalue()) > 600_000
    r = upload(client, buf.getvalue(), "big.png")
    assert r.status_code == 200
    assert list(spool.iterdir()) == []


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        pytest.skip("playwright (Python) is not installed; `pip install -e .[dev]` installs it")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (apt-get install -y chromium)")


@contextlib.contextmanager
def webui_browser(api, tmp_path: Path):
    """A real `dfx webui` on 127.0.0.1 in front of ``api``, and headless Chromium: yields (browser, url)."""
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    port = free_port()
    log = open(tmp_path / "webui.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("dfx")), "webui", "--api-url", api.url,
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(200):
            try:
                if requests.get(url, timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                "--disable-component-update", "--disable-sync"])
            try:
                yield browser, url
            finally:
                browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_real_browser_upload_verdict_and_report(api, odd_images, tmp_path):
    from playwright.sync_api import expect

    with webui_browser(api, tmp_path) as (browser, url):
        page = browser.new_page(viewport={"width": 1100, "height": 900}, accept_downloads=True)
        page.goto(url)
        page.focus("#drop-zone")
        assert page.evaluate("document.activeElement.id") == "drop-zone", "the drop zone takes keyboard focus"
        page.set_input_files("#image-input", str(odd_images["rgb.jpg"]))
        expect(page.locator("#preview")).to_be_visible()
        page.click("#check-button")
        expect(page.locator("#result")).to_be_visible(timeout=60_000)
        assert page.locator("#verdict").inner_text().strip().lower() in {"fake", "real", "uncertain"}
        assert page.locator("#experts tbody tr").count() == 2
        score = float(page.locator("#score-text").inner_text())
        assert 0.0 <= score <= 1.0
        assert page.locator("#sha256").inner_text() == hashlib.sha256(odd_images["rgb.jpg"].read_bytes()).hexdigest()
        with page.expect_download() as dl:
            page.click("#report-link")
        report = tmp_path / dl.value.suggested_filename
        dl.value.save_as(report)
        assert report.name.startswith("dfx-report-") and report.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        page.screenshot(path=str(tmp_path / "webui-desktop.png"), full_page=True)
        # a bad file in the browser: the error box, not a dump
        bad = tmp_path / "notes.jpg"
        bad.write_text("not an image" * 50)
        page.set_input_files("#image-input", str(bad))
        page.click("#check-button")
        expect(page.locator("#error")).to_be_visible(timeout=30_000)
        assert "not an image" in page.locator("#error-message").inner_text()
        # phone-sized screen: nothing scrolls sideways
        phone = browser.new_page(viewport={"width": 390, "height": 844})
        phone.goto(url)
        assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        phone.screenshot(path=str(tmp_path / "webui-phone.png"), full_page=True)
    print(f"screenshots: {tmp_path / 'webui-desktop.png'}, {tmp_path / 'webui-phone.png'}")


def _astronaut_jpeg() -> bytes:
    from skimage import data as skdata

    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def test_faces_option_lists_and_draws_each_face(client):
    data = _astronaut_jpeg()
    r = client.post("/check", data={"image": (io.BytesIO(data), "astronaut.jpg"), "faces": "on"},
                    headers={"Accept": "application/json"}, content_type="multipart/form-data")
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    assert len(body["faces"]) == 1 and body["faces"][0]["label"] in {"fake", "real", "uncertain"}
    assert body["score"] == pytest.approx(max(body["whole_score"], body["faces"][0]["score"]))
    drawn = Image.open(io.BytesIO(base64.b64decode(body["faces_png"].split(",", 1)[1])))
    assert drawn.size == (512, 512)
    x1, y1, x2, y2 = (round(v) for v in body["faces"][0]["box"])
    from webui.report import COLOURS

    edge = np.asarray(drawn.convert("RGB"))[y1 + 2:y2 - 2, x1]
    assert (edge == np.array(COLOURS[body["faces"][0]["label"]])).all(), "the box is drawn in its verdict's colour"
    report = Image.open(io.BytesIO(base64.b64decode(body["report_png"].split(",", 1)[1])))
    plain = upload(client, data).get_json()
    assert plain["faces"] is None and plain["faces_png"] is None, "faces are opt-in"
    plain_report = Image.open(io.BytesIO(base64.b64decode(plain["report_png"].split(",", 1)[1])))
    colour = np.array(COLOURS[body["faces"][0]["label"]])

    def thumb_has_colour(img: Image.Image) -> bool:
        return bool((np.asarray(img.convert("RGB"))[72:432, 32:392] == colour).all(axis=2).any())

    assert thumb_has_colour(report) and not thumb_has_colour(plain_report), "the report draws the face's box"
    assert np.asarray(report.convert("RGB"))[:, 412:].tobytes() != np.asarray(plain_report.convert("RGB"))[:, 412:].tobytes(), \
        "and lists the face"
    html = client.post("/check", data={"image": (io.BytesIO(data), "a.jpg"), "faces": "on"}, headers={"Accept": "text/html"},
                       content_type="multipart/form-data").get_data(as_text=True)
    assert "1 face(s)" in html and 'id="faces-image"' in html and "data:image/png;base64," in html


def test_real_browser_faces_checkbox(api, tmp_path):
    from playwright.sync_api import expect

    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(_astronaut_jpeg())
    with webui_browser(api, tmp_path) as (browser, url):
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url)
        page.set_input_files("#image-input", str(photo))
        page.check("#faces-input")
        page.click("#check-button")
        expect(page.locator("#result")).to_be_visible(timeout=60_000)
        expect(page.locator("#faces-box")).to_be_visible()
        expect(page.locator("#faces-image")).to_be_visible()
        assert page.locator("#faces tbody tr").count() == 1
        assert "1 face(s)" in page.locator("#faces-summary").inner_text()
        page.screenshot(path=str(tmp_path / "faces.png"), full_page=True)
        # unchecked: no faces section
        page.uncheck("#faces-input")
        page.click("#check-button")
        expect(page.locator("#faces-box")).to_be_hidden(timeout=60_000)


@pytest.fixture(scope="module")
def map_api(tmp_path_factory):
    """An API serving an untrained patch expert: every answer can carry a heatmap."""
    from inference.bundle_init import init_bundle

    d = tmp_path_factory.mktemp("map_api")
    init_bundle(["convnext_atto"], d / "patch", input_size=64, patch=1)
    s = Server(d / "patch", d / "serve.log", "--threads", "4")
    yield s
    s.stop()


def test_heatmap_shown_and_in_the_report_when_asked(map_api, api, odd_images):
    """The page asks for a heatmap when its box is ticked, shows it, and the report includes it; unticked (or a
    model without maps) there is none, and the report is the plain one."""
    web = create_app(WebConfig(api_url=map_api.url, timeout=60)).test_client()
    data = odd_images["rgb.jpg"].read_bytes()

    def check(url_client, explain: bool) -> dict:
        form = {"image": (io.BytesIO(data), "photo.jpg")} | ({"explain": "on"} if explain else {})
        r = url_client.post("/check", data=form, headers={"Accept": "application/json"},
                            content_type="multipart/form-data")
        assert r.status_code == 200, r.get_data(as_text=True)
        return r.get_json()

    def png(url: str) -> Image.Image:
        img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        img.load()
        return img

    shown, plain = check(web, True), check(web, False)
    assert shown["heatmap"].startswith("data:image/png;base64,") and png(shown["heatmap"]).format == "PNG"
    assert plain["heatmap"] is None and shown["score"] == pytest.approx(plain["score"], abs=1e-6)
    assert png(shown["report_png"]).height > png(plain["report_png"]).height + 100, "the report shows the heatmap"
    no_maps = check(create_app(WebConfig(api_url=api.url, timeout=60)).test_client(), True)
    assert no_maps["heatmap"] is None and no_maps["label"] in {"fake", "real", "uncertain"}


def test_real_browser_shows_the_heatmap(map_api, odd_images, tmp_path):
    from playwright.sync_api import expect

    with webui_browser(map_api, tmp_path) as (browser, url):
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url)
        assert page.is_checked("#explain-input"), "people see where by default"
        page.set_input_files("#image-input", str(odd_images["rgb.jpg"]))
        page.click("#check-button")
        expect(page.locator("#heatmap-box")).to_be_visible(timeout=60_000)
        assert page.evaluate("document.getElementById('heatmap').naturalWidth") > 0, "the heatmap image decodes"
        page.screenshot(path=str(tmp_path / "heatmap.png"), full_page=True)
        page.uncheck("#explain-input")
        page.click("#check-button")
        expect(page.locator("#heatmap-box")).to_be_hidden(timeout=60_000)


# -- the page as a reviewer's tool (issue 28) ----------------------------------------------------------------------
TEN = ["rgb.jpg", "gray_L.png", "gray_alpha_LA.png", "palette_P.png", "rgba.png", "cmyk.jpg", "rgb.webp", "rgb.bmp",
       "exif_rotated.jpg"]


def test_real_browser_ten_images_dropped_at_once(api, odd_images, tmp_path):
    """Ten files dropped on the page, one of them not an image: nine results and one clear error row; the
    table sorts, a row opens its result, and the table downloads as CSV and JSON."""
    from playwright.sync_api import expect

    files = [(name, odd_images[name].read_bytes()) for name in TEN] + [("broken.jpg", b"\xff\xd8not a jpeg" * 40)]
    payload = [{"name": n, "b64": base64.b64encode(d).decode()} for n, d in files]
    with webui_browser(api, tmp_path) as (browser, url):
        page = browser.new_page(viewport={"width": 1100, "height": 900}, accept_downloads=True)
        page.goto(url)
        page.evaluate("""(files) => {
            const dt = new DataTransfer();
            for (const f of files) {
                const bytes = Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0));
                dt.items.add(new File([bytes], f.name));
            }
            document.getElementById("drop-zone").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
        }""", payload)
        assert "10 images chosen" in page.locator("#chosen").inner_text()
        page.click("#check-button")
        expect(page.locator("#status")).to_contain_text("Checked 9 of 10 images", timeout=120_000)
        rows = page.locator("#results-table tbody tr")
        assert rows.count() == 10
        errors = page.locator("#results-table tbody tr.error-row")
        assert errors.count() == 1 and "broken.jpg" in errors.inner_text() and "not an image" in errors.inner_text()
        # sort by score: ascending, then descending (the error row, without a score, last)
        page.click("#results-table th[data-key=score] button")
        scores = [float(v) for v in page.eval_on_selector_all(
            "#results-table tbody tr:not(.error-row)", "rows => rows.map(r => r.dataset.score)")]
        assert len(scores) == 9 and scores == sorted(scores)
        assert page.get_attribute("#results-table th[data-key=score]", "aria-sort") == "ascending"
        page.click("#results-table th[data-key=score] button")
        scores = [float(v) for v in page.eval_on_selector_all(
            "#results-table tbody tr:not(.error-row)", "rows => rows.map(r => r.dataset.score)")]
        assert scores == sorted(scores, reverse=True)
        # a row opens its own result
        row = page.locator("#results-table tbody tr", has_text="rgb.bmp")
        row.click()
        expect(page.locator("#result .result-file")).to_have_text("rgb.bmp")
        assert row.get_attribute("aria-selected") == "true"
        assert float(page.locator("#score-text").inner_text()) == pytest.approx(float(row.get_attribute("data-score")),
                                                                                abs=1e-3)
        page.screenshot(path=str(tmp_path / "ten-images.png"), full_page=True)
        with page.expect_download() as dl:
            page.click("#download-csv")
        table = list(csv.DictReader(io.StringIO(open(dl.value.path()).read())))
        assert len(table) == 10 and sum(1 for t in table if t["error"]) == 1
        assert {t["file"] for t in table} == {n for n, _ in files}
        assert all(t["label"] in {"fake", "real", "uncertain"} and 0 <= float(t["score"]) <= 1
                   for t in table if not t["error"])
        with page.expect_download() as dl:
            page.click("#download-json")
        rows_json = json.loads(open(dl.value.path()).read())
        assert len(rows_json) == 10 and {r["file"] for r in rows_json} == {n for n, _ in files}
        # on a phone the table scrolls inside its box; the page never scrolls sideways
        page.set_viewport_size({"width": 390, "height": 844})
        wide = page.evaluate("""() => Array.from(document.querySelectorAll('body *')).filter(
            (el) => !el.closest('.table-wrap') && el.getBoundingClientRect().right > window.innerWidth + 0.5).map(
            (el) => el.tagName + '#' + el.id + '.' + el.className)""")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), wide[:6]
        page.screenshot(path=str(tmp_path / "ten-images-phone.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'ten-images.png'}")


def test_several_images_without_javascript(client, odd_images):
    """The form posts every file at once: a table, each result in full, and the downloads, with a bad file as
    its own row."""
    files = [(io.BytesIO(odd_images["rgb.jpg"].read_bytes()), "a.jpg"), (io.BytesIO(b"no image here" * 20), "b.jpg"),
             (io.BytesIO(odd_images["rgb.webp"].read_bytes()), "c.webp")]
    r = client.post("/check", data={"image": files}, headers={"Accept": "text/html"},
                    content_type="multipart/form-data")
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert html.count('<tr data-index=') == 2 and html.count('class="error-row"') == 1
    assert 'id="result"' in html and 'id="result-2"' in html and 'href="#result-2"' in html
    urls = re.findall(r'id="download-csv" href="data:text/csv;charset=utf-8;base64,([^"]+)"', html)
    table = list(csv.DictReader(io.StringIO(base64.b64decode(urls[0]).decode())))
    assert [t["file"] for t in table] == ["a.jpg", "b.jpg", "c.webp"] and table[1]["error"] and not table[0]["error"]


def test_experts_are_described_and_the_verdict_explained(map_api, odd_images):
    """Each expert's description comes from the bundle (/model), falling back to its family's; the verdict has a
    scale with the threshold and the band, and says how they were chosen."""
    model = requests.get(f"{map_api.url}/model", timeout=10).json()
    [expert] = model["experts"]
    assert expert["description"].startswith("local patches") and "edit masks" in expert["description"]
    web = create_app(WebConfig(api_url=map_api.url, timeout=60)).test_client()
    r = web.post("/check", data={"image": (io.BytesIO(odd_images["rgb.jpg"].read_bytes()), "p.jpg"), "explain": "on"},
                 headers={"Accept": "application/json"}, content_type="multipart/form-data")
    body = r.get_json()
    assert body["experts_info"][0]["description"] == expert["description"]
    assert body["band"] == model["uncertain_band"] and body["threshold_rule"] == model["threshold_rule"]
    html = body["html"]
    assert expert["description"] in html and 'class="scale-threshold"' in html
    assert f"How they were chosen: {model['threshold_rule']}" in html
    # the overlay: the map alone (transparent where nothing looked) and the image, at exactly the same size
    layer = Image.open(io.BytesIO(base64.b64decode(body["heatmap_layer"].split(",", 1)[1])))
    shown = Image.open(io.BytesIO(base64.b64decode(body["display"].split(",", 1)[1])))
    src = Image.open(odd_images["rgb.jpg"])
    assert layer.mode == "RGBA" and shown.size == src.size  # shown at its own size (up to 1024 px)
    assert abs(layer.width / layer.height - src.width / src.height) < 0.03, "the map has the image's aspect"
    assert len(body["heatmap_colours"]) >= 2 and 'id="colour-scale"' in html


def test_real_browser_overlay_toggle_opacity_and_no_javascript(map_api, odd_images, tmp_path):
    from playwright.sync_api import expect

    with webui_browser(map_api, tmp_path) as (browser, url):
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url)
        page.set_input_files("#image-input", str(odd_images["rgb.jpg"]))
        page.click("#check-button")
        expect(page.locator("#heatmap")).to_be_visible(timeout=60_000)
        assert "overlaid" in page.get_attribute("#map-view", "class")
        base, layer = page.locator("#heatmap-base").bounding_box(), page.locator("#heatmap").bounding_box()
        assert all(abs(base[k] - layer[k]) < 1.5 for k in ("x", "y", "width", "height")), "the map lies on the image"
        assert page.evaluate("getComputedStyle(document.getElementById('heatmap')).opacity") == "0.6"
        page.fill("#overlay-opacity", "20")
        page.dispatch_event("#overlay-opacity", "input")
        assert page.evaluate("getComputedStyle(document.getElementById('heatmap')).opacity") == "0.2"
        page.screenshot(path=str(tmp_path / "overlay-20.png"), full_page=True)
        page.uncheck("#overlay-toggle")
        expect(page.locator("#heatmap")).to_be_hidden()
        page.check("#overlay-toggle")
        expect(page.locator("#heatmap")).to_be_visible()
        assert "local patches" in page.locator("#experts .expert-description").first.inner_text()
        expect(page.locator("#scale")).to_be_visible()
        expect(page.locator("#colour-scale")).to_be_visible()
        # JavaScript off: one image still works; the map is shown beside the image, not over it
        plain = browser.new_context(java_script_enabled=False, viewport={"width": 1100, "height": 900}).new_page()
        plain.goto(url)
        plain.set_input_files("#image-input", str(odd_images["rgb.jpg"]))
        plain.click("#check-button")
        plain.wait_for_load_state()
        expect(plain.locator("#verdict")).to_be_visible(timeout=60_000)
        assert plain.locator("#results-table tbody tr").count() == 1
        expect(plain.locator(".map-controls")).to_be_hidden()
        base, layer = plain.locator("#heatmap-base").bounding_box(), plain.locator("#heatmap").bounding_box()
        assert layer["x"] >= base["x"] + base["width"] - 1, "side by side"
        assert "local patches" in plain.locator("#experts .expert-description").first.inner_text()
        plain.screenshot(path=str(tmp_path / "no-js.png"), full_page=True)
    print(f"screenshots: {tmp_path / 'overlay-20.png'}, {tmp_path / 'no-js.png'}")
