"""Documentation a newcomer can find their way in (issue 35): a short README whose links resolve, a docs site that
builds strictly with references generated from the code, the API's own /docs page (Swagger UI, nothing from outside
127.0.0.1), ``dfx --version``, and a model card with a machine-readable header that matches its prose."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from .conftest import dfx
from .test_api import API_KEY, Server
from .test_webui import CHROMIUM, _browser_or_skip

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    s = Server(tiny_bundle, tmp_path_factory.mktemp("docs-srv") / "serve.log", "--threads", "4")
    yield s
    s.stop()


def test_readme_is_short_and_every_link_resolves():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert len(links) >= 20
    for link in links:
        if not link.startswith(("http://", "https://")):
            assert (ROOT / link).exists(), f"README links to {link}, which does not exist"
    for must in ("pip install", "pytest", "dfx predict", "dfx serve", "docs/train.md"):
        assert must in text


def test_every_verb_has_a_cli_reference_entry_and_a_readme_line():
    """The reference is the parsers' own --help, one section per verb (nested verbs included); every top-level verb
    also has its line in the README's table."""
    from inference.cli import build_parser
    from inference.cli.reference import WIDTH, _columns, cli_reference, verbs

    parser = build_parser()
    text = cli_reference(parser)
    found = verbs(parser)
    commands = {cmd for cmd, _, _ in found}
    assert {"dfx predict", "dfx serve", "dfx train", "dfx prepare blend", "dfx bundle verify", "dfx webui",
            "dfx select"} <= commands
    with _columns(WIDTH):
        for cmd, sub, _ in found:
            assert f"\n## {cmd}\n" in text, cmd
            assert sub.format_help().rstrip() in text, cmd  # verbatim, so the page cannot drift from --help
    readme = (ROOT / "README.md").read_text()
    for cmd in commands:
        top = " ".join(cmd.split()[:2])
        assert f"`{top}" in readme, f"the README's verb table has no line for {top}"


def test_api_reference_is_rendered_from_the_served_openapi_document(server):
    """What /openapi.json serves on a running API is exactly what the docs page is rendered from."""
    sys.path.insert(0, str(ROOT))
    from mkdocs_hooks import generated_pages

    from inference.api.reference import api_reference

    served = requests.get(f"{server.url}/openapi.json", timeout=30).json()
    page = generated_pages()["reference/api.md"]
    assert api_reference(served) == page
    for path, ops in served["paths"].items():
        for method in ops:
            assert f"## `{method.upper()} {path}`" in page


def test_docs_site_builds_strictly_with_generated_references(tmp_path):
    """`mkdocs build --strict` (what CI runs): every page in the nav, no broken link; the CLI page has a section per
    verb and the API page one per endpoint; no page asks a CDN or a font service for anything."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e .[docs])")
    pytest.importorskip("material", reason="mkdocs-material is not installed (pip install -e .[docs])")
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    cli = (site / "reference" / "cli" / "index.html").read_text()
    for verb in ("dfx-predict", "dfx-prepare-blend", "dfx-bundle-verify", "dfx-train", "dfx-serve"):
        assert f'id="{verb}"' in cli
    api = (site / "reference" / "api" / "index.html").read_text()
    assert 'id="predict"' in api and 'id="predictbatch"' in api
    for page in site.rglob("*.html"):
        html = page.read_text()
        for outside in ("fonts.googleapis", "cdn.jsdelivr", "unpkg.com", "api.github.com", "md-source"):
            assert outside not in html, (page, outside)


def test_docs_page_is_served_from_the_api_itself(server):
    """/docs and every file it loads come from this server; the CSP forbids anything else."""
    r = requests.get(f"{server.url}/docs", timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    refs = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert refs and all(ref.startswith("/docs/static/") for ref in refs), refs
    for ref in refs:
        asset = requests.get(f"{server.url}{ref}", timeout=30)
        assert asset.status_code == 200 and len(asset.content) > 100, ref
    assert requests.get(f"{server.url}/docs/static/../../etc/passwd", timeout=30).status_code == 404
    assert requests.get(f"{server.url}/docs/static/index.html", timeout=30).status_code == 404  # not in the list


def test_docs_can_be_turned_off_and_honours_the_api_key(tiny_bundle, tmp_path):
    off = Server(tiny_bundle, tmp_path / "off.log", "--no-docs")
    try:
        r = requests.get(f"{off.url}/docs", timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert requests.get(f"{off.url}/docs/static/swagger-ui.css", timeout=30).status_code == 404
    finally:
        off.stop()
    keyed = Server(tiny_bundle, tmp_path / "keyed.log", env={"DFX_API_KEY": API_KEY})
    try:
        assert requests.get(f"{keyed.url}/docs", timeout=30).status_code == 200   # a static page, no data
        assert requests.get(f"{keyed.url}/openapi.json", timeout=30).status_code == 401  # the data needs the key
        _browser_lists_endpoints(keyed.url, key=API_KEY)
    finally:
        keyed.stop()


def _browser_lists_endpoints(url: str, key: str | None = None) -> None:
    """Chromium opens /docs: Swagger UI lists /predict and /predict/batch, and no request leaves ``url``."""
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    seen: list[str] = []

    def guard(route, req) -> None:
        seen.append(req.url)
        if req.url.startswith(url + "/"):
            route.continue_()
        else:
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.route("**/*", guard)
            page.goto(f"{url}/docs")
            if key is not None:
                page.fill("#dfx-key-input", key)
                page.click("#dfx-key button")
            page.wait_for_selector('.opblock-summary-path[data-path="/predict/batch"]', timeout=30000)
            paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.dataset.path)")
            assert "/predict" in paths and "/predict/batch" in paths, paths
        finally:
            browser.close()
    outside = [u for u in seen if not u.startswith(url + "/")]
    assert not outside, f"requests left {url}: {outside}"
    assert any(u.endswith("/openapi.json") for u in seen)


def test_real_browser_renders_the_api_explorer_offline(server):
    _browser_lists_endpoints(server.url)


def test_dfx_version_names_the_package_and_the_default_bundle():
    from importlib.metadata import version

    from inference.bundle import bundle_digest, read_spec

    r = dfx("--version", cwd=ROOT, env={"DFX_WEIGHTS": ""})
    assert r.returncode == 0, r.stderr
    spec = read_spec(ROOT / "weights" / "default")
    assert f"deepfake-experts {version('deepfake-experts')}" in r.stdout
    assert f"{spec.name}@{bundle_digest(spec)}" in r.stdout


def test_model_card_header_is_machine_readable_and_matches_the_card():
    """The YAML header (Hugging Face style) holds the licence, the data and each headline metric with its protocol,
    and every number in it is the one the card's own tables state."""
    import yaml

    card = (ROOT / "weights" / "default" / "MODEL_CARD.md").read_text()
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    meta = yaml.safe_load(head)
    assert meta["license"] and meta["datasets"] and meta["base_model"] == "openai/clip-vit-base-patch16"
    assert meta["bundle_format"] == json.loads((ROOT / "weights" / "default" / "ensemble.json").read_text())["format"]
    results = meta["model-index"][0]["results"]
    assert len(results) >= 3
    for result in results:
        assert "protocol" in result["dataset"]["name"] or "tested on" in result["dataset"]["name"]
        for m in result["metrics"]:
            digits = 3 if m["type"] == "roc_auc" else 2
            assert f"{m['value']:.{digits}f}" in body, (m, result["dataset"]["name"])
