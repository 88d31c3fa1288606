"""What a file says about itself: C2PA content credentials (the shared fixtures and our own, signed here with the
published test key), IPTC/XMP, generator records, hostile metadata, the operator's label rule, metadata-free copies,
and the answer in the CLI, the API and the web page."""

from __future__ import annotations

import base64
import csv
import io
import json
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image, PngImagePlugin

from inference.pipeline import decode
from inference.preprocess import Preprocessor
from inference.provenance import ProvenanceReader, read_provenance
from inference.provenance.containers import MAX_TEXT_BLOCKS, strip_metadata

from .conftest import ROOT, dfx
from .test_api import Server

FIXTURES = ROOT.parent / "shared" / "data" / "provenance"
IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"
XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"


def _need_fixtures() -> None:
    if not (FIXTURES / "es256_certs.pem").is_file():
        pytest.skip(f"the C2PA fixtures are not at {FIXTURES} (../shared/data/provenance)")


def _jpeg(size=(96, 64), colour=(40, 120, 200), exif: bytes | None = None) -> bytes:
    img = Image.new("RGB", size, colour)
    for x in range(0, size[0], 8):  # some structure, so orientation mistakes show in the pixels
        img.paste((255, 255, 255), (x, 0, x + 2, size[1] // 3))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **({"exif": exif} if exif else {}))
    return buf.getvalue()


def _with_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    """``jpeg`` with one more APPn segment right after SOI (and JFIF)."""
    at = 2 + (2 + struct.unpack(">H", jpeg[4:6])[0] if jpeg[2:4] == b"\xff\xe0" else 0)
    return jpeg[:at] + bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload + jpeg[at:]


def _xmp(source_type: str) -> bytes:
    return XMP_HEADER + (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        f'Iptc4xmpExt:DigitalSourceType="{IPTC}{source_type}"/></rdf:RDF></x:xmpmeta>').encode()


def _png(texts: dict[str, str] | None = None, exif: bytes | None = None) -> bytes:
    img = Image.new("RGB", (80, 48), (200, 60, 30))
    img.paste((0, 0, 0), (0, 0, 20, 10))
    info = PngImagePlugin.PngInfo()
    for k, v in (texts or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    img.save(buf, "PNG", pnginfo=info, **({"exif": exif} if exif else {}))
    return buf.getvalue()


def _sign(data: bytes, mime: str, source_type: str, agent: str = "TestDiffusion 2") -> bytes:
    """``data`` with a C2PA manifest signed by c2pa-python's published test key, whose one action is
    ``c2pa.created`` with ``source_type`` (as an AI generator or a camera writes it)."""
    import c2pa

    _need_fixtures()
    manifest = {"claim_generator_info": [{"name": "dfx-tests", "version": "1"}], "title": "fixture",
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [
                    {"action": "c2pa.created", "digitalSourceType": IPTC + source_type, "softwareAgent": agent}]}}]}
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(
        b"es256", (FIXTURES / "es256_certs.pem").read_bytes(), (FIXTURES / "es256_private.key").read_bytes(), None))
    out = io.BytesIO()
    with c2pa.Builder(manifest) as builder:
        builder.sign(signer, mime, io.BytesIO(data), out)
    return out.getvalue()


def _anchors() -> str:
    _need_fixtures()
    return (FIXTURES / "es256_certs.pem").read_text()


def _camera_exif(orientation: int = 1) -> bytes:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "Canon EOS 5D Mark IV"
    if orientation != 1:
        exif[0x0112] = orientation
    return exif.tobytes()


# -- reading ----------------------------------------------------------------------------------------------------
def test_the_shared_c2pa_fixtures_read_as_the_library_validates_them():
    _need_fixtures()
    reader = ProvenanceReader()
    c = reader.read(FIXTURES / "C.jpg")
    assert (c.signed, c.valid, c.trusted) == (True, True, False)
    assert c.declared == "ai_generated" and c.declared_by == "C2PA manifest"  # IPTC algorithmicMedia
    assert c.c2pa["validation_state"] == "Valid" and "C2PA Signer" in c.c2pa["signer"]
    assert "not on the operator's trust list" in c.summary()
    ca = reader.read(FIXTURES / "CA.jpg")
    assert (ca.signed, ca.valid, ca.declared) == (True, True, "edited")
    assert [i["title"] for i in ca.c2pa["ingredients"]] == ["A.jpg"]
    xca = reader.read(FIXTURES / "XCA.jpg")
    assert (xca.signed, xca.valid) == (True, False)
    assert any(f.startswith("assertion.dataHash.mismatch") for f in xca.c2pa["failures"])
    assert "INVALID" in xca.summary()
    none = reader.read(FIXTURES / "no_manifest.jpg")
    assert (none.signed, none.valid, none.c2pa) == (False, None, None)
    assert none.declared == "edited" and none.declared_by == "EXIF Software"  # it names Photoshop, unsigned


def test_our_own_signed_fixtures_declare_what_they_were_signed_with():
    ai = _sign(_jpeg(), "image/jpeg", "trainedAlgorithmicMedia")
    camera = _sign(_jpeg(colour=(10, 200, 10)), "image/jpeg", "digitalCapture", agent="Test Camera 1")
    untrusted, trusted = ProvenanceReader(), ProvenanceReader(_anchors())
    p = untrusted.read(ai)
    assert (p.declared, p.signed, p.valid, p.trusted) == ("ai_generated", True, True, False)
    assert p.c2pa["actions"][0]["software_agent"] == "TestDiffusion 2"
    p = trusted.read(ai)
    assert (p.declared, p.valid, p.trusted) == ("ai_generated", True, True)
    assert p.c2pa["validation_state"] == "Trusted"
    p = trusted.read(camera)
    assert (p.declared, p.trusted) == ("captured", True)
    # a PNG signed the same way (its manifest lives in a caBX chunk)
    p = trusted.read(_sign(_png(), "image/png", "trainedAlgorithmicMedia"))
    assert (p.declared, p.valid, p.trusted) == ("ai_generated", True, True)
    # pixels changed after signing: the claim stays visible but is not valid
    tampered = bytearray(ai)
    tampered[-100] ^= 0xFF
    p = trusted.read(bytes(tampered))
    assert p.signed and p.valid is False and p.declared == "ai_generated"


def test_generator_records_and_iptc_xmp_are_recognised():
    reader = ProvenanceReader()
    a1111 = reader.read(_png({"parameters": "a cat in a hat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, "
                                            "CFG scale: 7, Seed: 42, Size: 80x48, Model: sd_xl_base_1.0"}))
    assert a1111.declared == "ai_generated" and a1111.declared_by == "PNG text 'parameters'"
    assert "sd_xl_base_1.0" in a1111.summary() and not a1111.signed
    comfy = reader.read(_png({"prompt": json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 1}}})}))
    assert comfy.declared == "ai_generated" and "ComfyUI" in comfy.summary()
    xmp = reader.read(_with_segment(_jpeg(), 0xE1, _xmp("trainedAlgorithmicMedia")))
    assert (xmp.declared, xmp.declared_by, xmp.signed) == ("ai_generated", "XMP (IPTC)", False)
    inpainted = reader.read(_with_segment(_jpeg(), 0xE1, _xmp("compositeWithTrainedAlgorithmicMedia")))
    assert inpainted.declared == "ai_edited"
    camera = reader.read(_jpeg(exif=_camera_exif()))
    assert camera.declared == "captured" and "Canon EOS 5D" in camera.summary()
    plain = reader.read(_jpeg())
    assert (plain.declared, plain.evidence, plain.unreadable) == ("none", [], [])
    # an ordinary text chunk is not evidence
    assert reader.read(_png({"Comment": "holiday 2019"})).declared == "none"


def _peak_mib(fn) -> tuple[object, float]:
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def _hostile_files() -> dict[str, bytes]:
    """A JPEG with 20 MB of junk in APP1 segments that claim to be XMP; a PNG with 10 000 text chunks; a PNG
    with a zTXt bomb (1 GB of zeros); a JPEG with garbage where a C2PA manifest should be."""
    junk = XMP_HEADER + bytes(range(256)) * 255
    base = _jpeg()
    big = base[:2] + b"".join(bytes([0xFF, 0xE1]) + struct.pack(">H", len(junk) + 2) + junk
                              for _ in range(320)) + base[2:]
    img = Image.new("RGB", (32, 32), (9, 9, 9))
    info = PngImagePlugin.PngInfo()
    for i in range(10_000):
        info.add_text(f"k{i}", "x" * 64)
    texts = io.BytesIO()
    img.save(texts, "PNG", pnginfo=info)
    z = zlib.compressobj(9)
    bomb = z.compress(b"\0" * (1 << 30)) + z.flush()
    chunk = b"parameters\x00\x00" + bomb
    png = _png()
    at = png.index(b"IDAT") - 4
    bombed = png[:at] + struct.pack(">I", len(chunk)) + b"zTXt" + chunk + struct.pack(
        ">I", zlib.crc32(b"zTXt" + chunk)) + png[at:]
    jumbf = _with_segment(_jpeg(), 0xEB, b"JP\x00\x00\x00\x00\x00\x01\x00\x00\x00\x20jumbc2pa" + b"\x00" * 40)
    return {"big.jpg": big, "texts.png": texts.getvalue(), "bomb.png": bombed, "jumbf.jpg": jumbf}


def test_hostile_metadata_is_bounded_and_answered():
    files = _hostile_files()
    big = files["big.jpg"]
    assert len(big) > 20_000_000
    prov, peak = _peak_mib(lambda: read_provenance(big))
    assert any("metadata bound" in u for u in prov.unreadable), prov.unreadable
    assert peak < 12, f"reading 20 MB of junk XMP took {peak:.1f} MiB"
    prov, peak = _peak_mib(lambda: read_provenance(files["texts.png"]))
    assert any(f"first {MAX_TEXT_BLOCKS}" in u for u in prov.unreadable), prov.unreadable
    assert peak < 12
    prov, peak = _peak_mib(lambda: read_provenance(files["bomb.png"]))
    assert peak < 12 and prov.declared == "none"
    # garbage where a C2PA manifest should be: unreadable evidence, never an exception
    prov = ProvenanceReader().read(files["jumbf.jpg"])
    assert prov.signed and prov.valid is False and prov.unreadable


def test_hostile_files_are_scored_by_the_cli(tiny_bundle, tmp_path):
    folder = tmp_path / "hostile"
    folder.mkdir()
    for name, data in _hostile_files().items():
        (folder / name).write_bytes(data)
    r = dfx("predict", str(folder), "--weights", str(tiny_bundle), "--workers", "0", "--no-progress",
            "-o", str(tmp_path / "rows.csv"))
    assert r.returncode == 0, r.stderr
    rows = {Path(row["path"]).name: row for row in csv.DictReader(open(tmp_path / "rows.csv"))}
    assert set(rows) == {"big.jpg", "texts.png", "bomb.png", "jumbf.jpg"}
    assert all(rows[n]["status"] == "ok" and rows[n]["score"] for n in ("big.jpg", "texts.png", "jumbf.jpg"))
    # Pillow itself refuses to open a PNG whose text inflates past 1 MB: a clear error row, the run goes on
    assert rows["bomb.png"]["status"] == "ok" or "too large" in rows["bomb.png"]["error"]
    assert "metadata bound" in rows["big.jpg"]["provenance_evidence"]
    assert "holds no manifest" in rows["jumbf.jpg"]["provenance_evidence"]


# -- metadata never reaches the experts ----------------------------------------------------------------------------
def test_experts_read_the_same_input_from_an_image_and_its_metadata_free_copy(tmp_path):
    # every way an expert reads an image: squashed, centre-cropped, native-resolution tiles
    pre = Preprocessor([(64, "squash", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                        (48, "crop", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                        (24, "tiles:4", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    files = {
        "rotated.jpg": _with_segment(_jpeg(size=(120, 64), exif=_camera_exif(orientation=6)), 0xFE,
                                     b"Steps: 20, Sampler: Euler a, Seed: 1, Model: sd15"),
        "xmp.jpg": _with_segment(_jpeg(), 0xE1, _xmp("trainedAlgorithmicMedia")),
        "a1111.png": _png({"parameters": "Steps: 30, Sampler: DPM++, CFG scale: 5, Seed: 7"},
                          exif=_camera_exif(orientation=3)),
    }
    try:
        files["signed.jpg"] = _sign(_jpeg(colour=(1, 2, 3)), "image/jpeg", "trainedAlgorithmicMedia")
    except pytest.skip.Exception:
        pass
    webp = io.BytesIO()
    Image.new("RGB", (40, 30), (5, 90, 200)).save(webp, "WEBP", lossless=True, exif=_camera_exif(),
                                                  xmp=_xmp("trainedAlgorithmicMedia")[len(XMP_HEADER):])
    files["camera.webp"] = webp.getvalue()
    for name, data in files.items():
        before = read_provenance(data)
        assert before.declared != "none", name
        stripped = strip_metadata(data)
        after = read_provenance(stripped)
        assert (after.declared, after.evidence, after.signed) == ("none", [], False), (name, after.summary())
        a, b = decode(pre, data), decode(pre, stripped)
        for x, y in zip(a.items, b.items):
            assert x.keys() == y.keys()
            assert all(torch.equal(x[k], y[k]) for k in x), f"{name}: the experts' input changed"
        assert Image.open(io.BytesIO(stripped)).size == Image.open(io.BytesIO(data)).size
    # the orientation really was kept: a rotated image's copy is still shown rotated
    assert decode(pre, files["rotated.jpg"], keep_image=True).image.size == (64, 120)


def test_prepare_index_writes_metadata_free_copies(tmp_path):
    src = tmp_path / "fakes"
    (src / "sub").mkdir(parents=True)
    (src / "a.png").write_bytes(_png({"parameters": "Steps: 20, Sampler: Euler, Seed: 1"}))
    (src / "sub" / "b.jpg").write_bytes(_with_segment(_jpeg(), 0xE1, _xmp("trainedAlgorithmicMedia")))
    Image.new("RGB", (20, 20)).save(src / "c.bmp")
    r = dfx("prepare", "index", str(src), "--label", "fake", "-o", str(tmp_path / "m.csv"),
            "--strip-metadata", str(tmp_path / "clean"))
    assert r.returncode == 0, r.stderr
    assert "c.bmp" in r.stderr and "left out" in r.stderr
    from inference.manifest import read_manifest

    man = read_manifest(tmp_path / "m.csv")
    paths = sorted(man.abspath(r).resolve() for r in man.rows)
    assert [p.relative_to((tmp_path / "clean").resolve()).as_posix() for p in paths] == ["fakes/a.png",
                                                                                         "fakes/sub/b.jpg"]
    for p in paths:
        assert read_provenance(p.read_bytes()).declared == "none"


# -- the label rule and every place a score is shown ------------------------------------------------------------
def test_cli_columns_and_the_operators_rule(tiny_bundle, tmp_path):
    ai = tmp_path / "ai.jpg"
    ai.write_bytes(_sign(_jpeg(), "image/jpeg", "trainedAlgorithmicMedia"))
    camera = tmp_path / "camera.jpg"
    camera.write_bytes(_sign(_jpeg(colour=(9, 9, 9)), "image/jpeg", "digitalCapture"))
    pem = str(FIXTURES / "es256_certs.pem")

    def rows(*extra: str) -> dict[str, dict[str, str]]:
        out = tmp_path / "rows.csv"
        r = dfx("predict", str(ai), str(camera), "--weights", str(tiny_bundle), "--workers", "1", "--no-progress",
                "-o", str(out), *extra)
        assert r.returncode == 0, r.stderr
        return {Path(row["path"]).name: row for row in csv.DictReader(open(out))}

    plain = rows()
    assert plain["ai.jpg"]["provenance"] == "ai_generated" and plain["camera.jpg"]["provenance"] == "captured"
    assert "not on the operator's trust list" in plain["ai.jpg"]["provenance_evidence"]
    assert plain["ai.jpg"]["label_by"] == "model"
    model_label = plain["ai.jpg"]["label"]
    ruled = rows("--provenance-rule", "trusted_c2pa", "--trust-anchors", pem)
    assert (ruled["ai.jpg"]["label"], ruled["ai.jpg"]["label_by"]) == ("fake", "provenance")
    assert ruled["ai.jpg"]["score"] == plain["ai.jpg"]["score"], "the score stays the pixels'"
    assert ruled["camera.jpg"]["label_by"] == "model", "a trusted camera claim never decides"
    no_anchor = rows("--provenance-rule", "trusted_c2pa")
    assert (no_anchor["ai.jpg"]["label"], no_anchor["ai.jpg"]["label_by"]) == (model_label, "model")
    no_rule = rows("--trust-anchors", pem)
    assert no_rule["ai.jpg"]["label_by"] == "model"
    off = rows("--no-provenance")
    assert "provenance" not in off["ai.jpg"]
    # the rule can live in the bundle (format 1.6); the anchors never do
    from inference.bundle import BundleSpec, read_spec, write_bundle
    from safetensors.torch import load_file

    spec = read_spec(tiny_bundle)
    ruled_bundle = tmp_path / "ruled"
    write_bundle(ruled_bundle, BundleSpec(**{**spec.__dict__, "provenance_rule": "trusted_c2pa"}),
                 {e.name: load_file(str(tiny_bundle / e.file)) for e in spec.experts})
    assert read_spec(ruled_bundle).format == "dfx-ensemble/1.6"
    r = dfx("predict", str(ai), "--weights", str(ruled_bundle), "--workers", "0", "--no-progress",
            "--trust-anchors", pem)
    assert r.returncode == 0 and ",fake," in r.stdout and "provenance" in r.stdout, r.stderr
    # explain's table carries the same columns
    r = dfx("explain", str(ai), "--weights", str(tiny_bundle), "-o", str(tmp_path / "ex"), "--no-progress",
            "--provenance-rule", "trusted_c2pa", "--trust-anchors", pem)
    assert r.returncode == 0, r.stderr
    [row] = csv.DictReader(open(tmp_path / "ex" / "explain.csv"))
    assert (row["label"], row["label_by"], row["provenance"]) == ("fake", "provenance", "ai_generated")


@pytest.fixture(scope="module")
def ruled_api(tiny_bundle, tmp_path_factory):
    _need_fixtures()
    s = Server(tiny_bundle, tmp_path_factory.mktemp("prov") / "serve.log", "--threads", "2",
               "--trust-anchors", str(FIXTURES / "es256_certs.pem"), "--provenance-rule", "trusted_c2pa")
    yield s
    s.stop()


def test_api_answers_provenance_and_applies_the_rule(ruled_api):
    ai = _sign(_jpeg(), "image/jpeg", "trainedAlgorithmicMedia")
    camera = _sign(_jpeg(colour=(9, 9, 9)), "image/jpeg", "digitalCapture")
    r = requests.post(f"{ruled_api.url}/predict", json={"image": base64.b64encode(ai).decode()}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["label"], body["label_by"]) == ("fake", "provenance")
    p = body["provenance"]
    assert (p["declared"], p["signed"], p["valid"], p["trusted"]) == ("ai_generated", True, True, True)
    assert p["c2pa"]["validation_state"] == "Trusted" and p["evidence"][0]["source"] == "C2PA manifest"
    r = requests.post(f"{ruled_api.url}/predict/batch", json={"images": [base64.b64encode(x).decode() for x in
                                                                       (ai, camera, _jpeg())]}, timeout=60)
    results = r.json()["results"]
    assert [x["provenance"]["declared"] for x in results] == ["ai_generated", "captured", "none"]
    assert [x["label_by"] for x in results] == ["provenance", "model", "model"]
    r = requests.post(f"{ruled_api.url}/predict", json={"image": base64.b64encode(ai).decode(), "provenance": False},
                      timeout=60)
    assert "provenance" not in r.json() and "label_by" not in r.json()
    r = requests.post(f"{ruled_api.url}/predict?provenance=0", data=ai, headers={"Content-Type": "image/jpeg"},
                      timeout=60)
    assert r.status_code == 200 and "provenance" not in r.json()
    r = requests.post(f"{ruled_api.url}/predict?provenance=maybe", data=ai, headers={"Content-Type": "image/jpeg"},
                      timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_field"
    r = requests.post(f"{ruled_api.url}/predict", files={"image": ("x.jpg", ai)}, data={"provenance": "0"},
                      timeout=60)
    assert r.status_code == 200 and "provenance" not in r.json()
    spec = requests.get(f"{ruled_api.url}/openapi.json", timeout=10).json()
    assert "provenance" in spec["components"]["schemas"]["Prediction"]["properties"]


def test_web_page_shows_what_the_file_says(ruled_api):
    from webui.app import WebConfig, create_app

    client = create_app(WebConfig(api_url=ruled_api.url, timeout=60)).test_client()
    ai = _sign(_jpeg(), "image/jpeg", "trainedAlgorithmicMedia")
    r = client.post("/check", data={"image": (io.BytesIO(ai), "ai.jpg")}, headers={"Accept": "application/json"},
                    content_type="multipart/form-data")
    body = r.get_json()
    assert body["label"] == "fake" and body["label_by"] == "provenance"
    p = body["provenance"]
    assert p["declared"] == "ai_generated" and p["valid"] and p["trusted"] and "C2PA Signer" in p["signer"]
    # without JavaScript: the box is rendered by the server, above the verdict
    tampered = bytearray(ai)
    tampered[-100] ^= 0xFF
    html = client.post("/check", data={"image": (io.BytesIO(bytes(tampered)), "x.jpg")}, headers={"Accept": "text/html"},
                       content_type="multipart/form-data").get_data(as_text=True)
    assert html.index("What the file says about itself") < html.index("Verdict:")
    box = html[html.index('id="provenance-box"'):html.index("Verdict:")]
    assert "hidden" not in box.split(">")[0]
    assert "C2PA Signer" in box and "NOT valid" in box and "its claims do not hold" in box
    plain = client.post("/check", data={"image": (io.BytesIO(_jpeg()), "p.jpg")}, headers={"Accept": "text/html"},
                        content_type="multipart/form-data").get_data(as_text=True)
    assert "says nothing about its origin" in plain


def test_real_browser_shows_the_evidence_box(ruled_api, tmp_path):
    from playwright.sync_api import expect

    from .test_webui import webui_browser

    signed = tmp_path / "signed-ai.jpg"
    signed.write_bytes(_sign(_jpeg(), "image/jpeg", "trainedAlgorithmicMedia"))
    plain = tmp_path / "plain.jpg"
    plain.write_bytes(_jpeg(colour=(90, 90, 90)))
    with webui_browser(ruled_api, tmp_path) as (browser, url):
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url)
        page.set_input_files("#image-input", str(signed))
        page.click("#check-button")
        expect(page.locator("#provenance-box")).to_be_visible(timeout=60_000)
        assert "generated by AI" in page.locator("#provenance-says").inner_text()
        assert "C2PA Signer" in page.locator("#provenance-signer").inner_text()
        assert page.locator("#provenance-validity").inner_text() == "valid"
        assert page.locator("#provenance-trust").inner_text() == "signer trusted by this service"
        expect(page.locator("#provenance-label")).to_be_visible()
        assert page.locator("#verdict").inner_text().strip().lower() == "fake"
        box = page.locator("#provenance-box").bounding_box()
        assert box["y"] < page.locator("#verdict").bounding_box()["y"], "the evidence comes before the verdict"
        page.screenshot(path=str(tmp_path / "provenance-signed.png"), full_page=True)
        page.set_input_files("#image-input", str(plain))
        page.click("#check-button")
        expect(page.locator("#provenance-c2pa")).to_be_hidden(timeout=60_000)
        assert "says nothing about its origin" in page.locator("#provenance-says").inner_text()
        expect(page.locator("#provenance-label")).to_be_hidden()
    print(f"screenshot: {tmp_path / 'provenance-signed.png'}")
