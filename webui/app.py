"""The web UI: a page where people upload an image and see the verdict, per-expert scores and a report.

It is a separate service that talks to the JSON API over HTTP only (it imports nothing of ours, and
no model code), so the model can live on a GPU server and the site anywhere. It uses the standard
library's HTTP client with a timeout. Upload limits (bytes and pixels) are enforced here, before
anything reaches the API. Nothing is written to disk: the report PNG is built in memory and returned
inline for the browser to download. Every page and asset is local (no CDN, no external fonts).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

log = logging.getLogger("dfx.webui")


@dataclass
class WebConfig:
    api_url: str = "http://127.0.0.1:8080"
    api_key: str | None = None
    timeout: float = 30.0
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000


class UserError(Exception):
    """A failure explained to the person: HTTP status, a short title and a sentence that says what to do."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


API_ERROR_TEXT = {
    "not_an_image": "This file is not an image the service can read (JPEG, PNG, WEBP, BMP, GIF or TIFF).",
    "corrupt_image": "This image is damaged or incomplete, so it cannot be checked. Try the original file.",
    "empty_image": "The file is empty.",
    "image_too_large": "The image has too many pixels for the detection service.",
    "payload_too_large": "The file is too large for the detection service.",
    "unauthorized": "The site could not sign in to the detection service (API key). Tell the site's operator.",
    "model_loading": "The detection model is still starting. Try again in a few seconds.",
    "model_unavailable": "The detection model is not available right now. Tell the site's operator.",
}


#: The most the site reads of one API answer; a hostile or broken API cannot make it buffer more.
MAX_API_ANSWER_BYTES = 8 * 1024 * 1024
#: The most faces a verdict may list (the API scores at most 16).
MAX_FACES = 16
#: The most experts a verdict may list (the page and the report show each one).
MAX_EXPERTS = 64
LABELS = ("fake", "real", "uncertain")


def _mb(n: float, digits: int = 1) -> str:
    """A size people read: KB below one MB."""
    return f"{n / 1024 / 1024:.{digits}f} MB" if n >= 1024 * 1024 else f"{n / 1024:.{max(0, digits - 1)}f} KB"


def _over(n: int, limit: int) -> tuple[str, str]:
    """A size over the limit and the limit, written so that they differ: a 10.04 MB file was "10.0 MB" against
    a "10.0 MB" limit. More digits until they do, then bytes."""
    for digits in (1, 2, 3):
        size, most = _mb(n, digits), _mb(limit, digits)
        if size != most:
            return size, most
    return f"{n:,} bytes", f"{limit:,} bytes"


class ApiClient:
    """POSTs to the JSON API with a timeout; turns every failure into a :class:`UserError`."""

    def __init__(self, cfg: WebConfig) -> None:
        self.cfg = cfg

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.cfg.api_url.rstrip("/") + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.cfg.api_key:
            req.add_header("Authorization", f"Bearer {self.cfg.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.cfg.timeout) as resp:
                raw = resp.read(MAX_API_ANSWER_BYTES + 1)
                if len(raw) > MAX_API_ANSWER_BYTES:
                    raise UserError(502, "api_bad_answer", "The detection service gave an answer the site cannot read.")
                answer = json.loads(raw.decode())
                if not isinstance(answer, dict):
                    raise ValueError("the answer is not a JSON object")
                return answer
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read(64 * 1024).decode()).get("error", {})
            except (ValueError, AttributeError, OSError):
                err = {}
            if not isinstance(err, dict):  # e.g. a string: read nothing from it
                err = {}
            code = err.get("code") if isinstance(err.get("code"), str) else "api_error"
            message = err.get("message") if isinstance(err.get("message"), str) else None
            text = API_ERROR_TEXT.get(code) or (message or "")[:300] or f"The detection service answered {exc.code}."
            status = exc.code if exc.code in (400, 413, 415, 422) else 502
            raise UserError(status, code, text) from exc
        except (TimeoutError, socket.timeout) as exc:
            raise UserError(504, "api_timeout", f"The detection service did not answer within {self.cfg.timeout:g} "
                                                "seconds. Try again, or try a smaller image.") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise UserError(504, "api_timeout", f"The detection service did not answer within "
                                                    f"{self.cfg.timeout:g} seconds. Try again later.") from exc
            raise UserError(502, "api_unreachable", "The detection service cannot be reached right now. "
                                                    "Try again in a minute; if it persists, tell the site's operator.") from exc
        except (ValueError, OSError) as exc:
            raise UserError(502, "api_bad_answer", "The detection service gave an answer the site cannot read.") from exc

    def predict(self, image: bytes, faces: bool = False, explain: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"image": base64.b64encode(image).decode()}
        if faces:
            body["faces"] = True
        if explain:
            body["explain"] = True
        return clean_result(self._call("POST", "/predict", body))

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/healthcheck", timeout=min(5.0, self.cfg.timeout))


def clean_result(answer: dict[str, Any]) -> dict[str, Any]:
    """Only the fields the page shows, with their types and sizes checked: the site never trusts the
    API's answer to be small or well-formed (200 000 experts would size the report at gigabytes)."""
    bad = UserError(502, "api_bad_answer", "The detection service gave an answer the site cannot read.")
    try:
        score = float(answer["result"])
    except (KeyError, TypeError, ValueError):
        raise bad from None
    if not 0.0 <= score <= 1.0:
        raise bad
    experts = answer.get("experts") or {}
    if not isinstance(experts, dict) or len(experts) > MAX_EXPERTS:
        raise bad
    try:
        experts = {str(k)[:80]: float(v) for k, v in experts.items()}
        threshold = float(answer.get("threshold", 0.5))
    except (TypeError, ValueError):
        raise bad from None
    label = answer.get("label") if answer.get("label") in LABELS else "uncertain"
    heatmap = answer.get("heatmap")
    if not (isinstance(heatmap, str) and heatmap.startswith("data:image/png;base64,")):
        heatmap = None
    faces = None
    if answer.get("faces") is not None:
        raw = answer["faces"]
        if not isinstance(raw, list):
            raise bad
        faces = []
        try:
            for f in raw[:MAX_FACES]:
                box = [float(v) for v in f["box"]][:4]
                fscore = float(f["score"])
                if len(box) != 4 or not 0.0 <= fscore <= 1.0:
                    raise bad
                faces.append({"box": box, "score": fscore, "confidence": float(f.get("confidence", 0.0)),
                              "label": f.get("label") if f.get("label") in LABELS else "uncertain"})
            whole = float(answer.get("whole_score", score))
        except (KeyError, TypeError, ValueError):
            raise bad from None
    return {"result": score, "label": label, "experts": experts, "threshold": threshold,
            "model": str(answer.get("model", "?"))[:200], "heatmap": heatmap, "faces": faces,
            **({"whole_score": whole} if faces is not None else {})}


COLOURS = {"fake": (176, 0, 32), "real": (0, 110, 55), "uncertain": (150, 90, 0)}


def faces_image(data: bytes, faces: list[dict[str, Any]], max_side: int = 720) -> bytes | None:
    """The image with each face's box drawn in its verdict's colour and numbered, as PNG (None when Pillow
    cannot read the image). Boxes are in the pixels of the image as shown (EXIF rotation applied)."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as src:
            img = ImageOps.exif_transpose(src).convert("RGB")
    except Exception:
        return None
    scale = min(1.0, max_side / max(img.size))
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=16)
    width = max(2, round(max(img.size) / 200))
    for k, f in enumerate(faces, start=1):
        x1, y1, x2, y2 = (v * scale for v in f["box"])
        colour = COLOURS.get(f["label"], (0, 0, 0))
        d.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        tag = f"{k}: {f['score']:.2f}"
        d.rectangle([x1, max(0, y1 - 20), x1 + 8 + 9 * len(tag), max(0, y1 - 20) + 20], fill=colour)
        d.text((x1 + 4, max(0, y1 - 20) + 1), tag, font=font, fill=(255, 255, 255))
    out = io.BytesIO()
    img.save(out, "PNG", optimize=True)
    return out.getvalue()


def _heatmap_image(url: Any, max_side: int) -> Any:
    """The API's heatmap (a PNG data URL, already checked by :func:`clean_result`) as an RGB image at most
    ``max_side`` wide, or None when there is none or it does not decode."""
    from PIL import Image

    if not (isinstance(url, str) and url.startswith("data:image/png;base64,")):
        return None
    try:
        with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1], validate=True))) as src:
            if src.format != "PNG" or src.width * src.height > 4_000_000:
                return None
            img = src.convert("RGB")
    except Exception:  # an answer the report cannot use: the report goes without it
        return None
    if img.width > max_side:
        img = img.resize((max_side, max(1, round(img.height * max_side / img.width))))
    return img


def _thumbnail(data: bytes) -> Any:
    """A 360-px RGB thumbnail, or None when Pillow cannot read the image. High-bit-depth images (16-bit,
    float) are scaled to 8 bits first; a plain ``convert("RGB")`` clips them to white."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as src:
        src.seek(0)
        img = ImageOps.exif_transpose(src)
        img.thumbnail((360, 360))
        if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            hi = img.getextrema()[1] if img.mode == "I" else 65535
            img = img.convert("I").point(lambda v: v * (255 / 65535) if hi > 255 else v).convert("L")
        elif img.mode == "F":
            hi = img.getextrema()[1]
            img = img.point(lambda v: v * 255 if hi <= 1.0 else v).convert("L")
        return img.convert("RGB")


def check_upload(data: bytes, cfg: WebConfig) -> tuple[int, int] | None:
    """The site's own limits, before the API sees anything: size, then pixel count from the header
    (Pillow reads the header only). Returns (width, height) when Pillow knows the format, else None
    (the API then decides whether it is an image)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UserError(400, "empty_file", "The file is empty.")
    if len(data) > cfg.max_upload_bytes:
        size, limit = _over(len(data), cfg.max_upload_bytes)
        raise UserError(413, "file_too_large", f"The file is {size}; the limit is {limit}.")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    if w * h > cfg.max_pixels:
        raise UserError(413, "too_many_pixels", f"The image is {w}×{h} = {w * h / 1e6:.0f} megapixels; the limit is "
                                                f"{cfg.max_pixels / 1e6:.0f} megapixels. Resize it and try again.")
    return w, h


def render_report(data: bytes, result: dict[str, Any], sha256: str, filename: str) -> bytes:
    """A one-page PNG report: thumbnail, verdict, score bar, experts, model, date and SHA-256."""
    from PIL import Image, ImageDraw, ImageFont

    W, pad = 900, 32
    font = ImageFont.load_default(size=18)
    big = ImageFont.load_default(size=34)
    small = ImageFont.load_default(size=15)
    try:
        thumb = _thumbnail(data)
    except Exception:  # the API read it; if Pillow cannot, the report goes without a thumbnail
        thumb = None
    experts = dict(list(result.get("experts", {}).items())[:MAX_EXPERTS])
    faces = result.get("faces") or []
    if faces and thumb is not None:  # the boxes, drawn on the thumbnail as on the page
        from PIL import ImageDraw as _Draw

        with Image.open(io.BytesIO(data)) as src:
            from PIL import ImageOps

            shown = ImageOps.exif_transpose(src).size
        sx = thumb.width / shown[0]
        td = _Draw.Draw(thumb)
        for k, f in enumerate(faces, start=1):
            td.rectangle([v * sx for v in f["box"]], outline=COLOURS.get(f["label"], (0, 0, 0)), width=3)
            td.text((f["box"][0] * sx + 3, f["box"][1] * sx + 2), str(k), fill=COLOURS.get(f["label"], (0, 0, 0)))
    heat = _heatmap_image(result.get("heatmap"), max_side=W - 2 * pad)
    H = 760 + 28 * len(experts) + 24 * len(faces) + (heat.height + 60 if heat is not None else 0)
    page = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(page)
    colours = {"fake": (176, 0, 32), "real": (0, 110, 55), "uncertain": (150, 90, 0)}
    label = result.get("label", "uncertain")
    d.text((pad, pad), "deepfake-experts report", font=font, fill=(40, 40, 40))
    if thumb is not None:
        page.paste(thumb, (pad, pad + 40))
    x = pad + 380
    d.text((x, pad + 36), str(label).upper(), font=big, fill=colours.get(label, (0, 0, 0)))
    d.text((x, pad + 80), {"fake": "Likely generated or manipulated", "real": "Likely a real photograph",
                           "uncertain": "The detector is not sure"}.get(label, ""), font=font, fill=(20, 20, 20))
    score = float(result.get("result", 0.0))
    d.text((x, pad + 110), f"fake probability {score:.3f} (threshold {float(result.get('threshold', 0.5)):.3f})",
           font=font, fill=(20, 20, 20))
    d.rectangle([x, pad + 140, x + 440, pad + 160], outline=(60, 60, 60))
    d.rectangle([x, pad + 140, x + int(440 * score), pad + 160], fill=colours.get(label, (0, 0, 0)))
    y = pad + 185
    d.text((x, y), "experts", font=font, fill=(40, 40, 40))
    for name, p in experts.items():
        y += 28
        d.text((x, y), f"{name}: {float(p):.3f}", font=small, fill=(40, 40, 40))
    if result.get("faces") is not None:
        y += 40
        d.text((x, y), f"faces: {len(faces)}" + (" (none found: scored whole)" if not faces else
                                                  f" (score = max of whole image "
                                                  f"{float(result.get('whole_score', score)):.3f} and faces)"),
               font=small, fill=(40, 40, 40))
        for k, f in enumerate(faces, start=1):
            y += 24
            d.text((x, y), f"face {k}: {f['score']:.3f} {f['label']}  box {', '.join(str(round(v)) for v in f['box'])}",
                   font=small, fill=COLOURS.get(f["label"], (40, 40, 40)))
    y = max(y + 40, pad + 420)
    if heat is not None:  # where the detector looked, as the page shows it
        d.text((pad, y), "where the detector looked (tint: fake-probability of each region)", font=small,
               fill=(40, 40, 40))
        page.paste(heat, (pad, y + 24))
        y += heat.height + 48
    for line in (f"file: {filename}", f"SHA-256: {sha256}", f"model: {result.get('model', '?')}",
                 f"date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}",
                 "A score is a model's estimate, not proof. Detectors miss generators they never saw."):
        d.text((pad, y), line, font=small, fill=(60, 60, 60))
        y += 24
    out = io.BytesIO()
    page.crop((0, 0, W, min(H, y + pad))).save(out, "PNG", optimize=True)  # y: below the last line
    return out.getvalue()


def create_app(config: WebConfig | dict[str, Any] | None = None) -> Flask:
    cfg = config if isinstance(config, WebConfig) else WebConfig(**(config or {}))
    app = Flask("dfx-webui", template_folder=os.path.join(os.path.dirname(__file__), "templates"),
                static_folder=os.path.join(os.path.dirname(__file__), "static"))
    # A little room above the file limit for the multipart envelope; the exact limit is checked per file.
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_upload_bytes + 64 * 1024
    app.extensions["dfx_webui"] = cfg
    client = ApiClient(cfg)

    def wants_json() -> bool:
        return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "application/json"

    def fail(err: UserError) -> Response:
        log.info("check failed: %s (%d)", err.code, err.status)
        if wants_json():
            resp = jsonify({"error": {"code": err.code, "message": err.message}})
        else:
            resp = Response(render_template("index.html", error=err, limits=_limits(cfg)), mimetype="text/html")
        resp.status_code = err.status
        return resp

    @app.errorhandler(UserError)
    def _user_error(err: UserError) -> Response:
        return fail(err)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(_: Exception) -> Response:
        # Refused from its Content-Length before a byte is read: the upload's size is that, envelope included.
        sent = request.content_length
        said = f"The upload is {_over(sent, cfg.max_upload_bytes)[0]}; " if sent else "The upload is over the limit: "
        return fail(UserError(413, "file_too_large", f"{said}the limit is {_mb(cfg.max_upload_bytes)}."))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        return fail(UserError(exc.code or 500, "http_error", exc.description or exc.name))

    @app.get("/")
    def index() -> str:
        return render_template("index.html", error=None, limits=_limits(cfg))

    def same_site() -> bool:
        """Whether a POST comes from this site's own page (or from no browser page at all, like curl).
        Another origin must not spend the API, and its key, through a visitor's browser."""
        fetch_site = request.headers.get("Sec-Fetch-Site")
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            return False
        origin = request.headers.get("Origin")
        if origin is not None and origin.rstrip("/") != request.host_url.rstrip("/"):
            return False
        return True

    @app.post("/check")
    def check() -> Response:
        if not same_site():
            raise UserError(403, "cross_site", "Uploads are accepted from this site's own page only.")
        upload = request.files.get("image")
        if upload is None or not upload.filename:
            raise UserError(400, "no_file", "Choose an image file first.")
        data = upload.read()
        check_upload(data, cfg)
        t0 = time.perf_counter()
        want_faces = request.form.get("faces", "").lower() in ("1", "on", "true", "yes")
        want_map = request.form.get("explain", "").lower() in ("1", "on", "true", "yes")
        result = client.predict(data, faces=want_faces, explain=want_map)
        sha = hashlib.sha256(data).hexdigest()
        report = render_report(data, result, sha, upload.filename)
        annotated = faces_image(data, result["faces"]) if result.get("faces") else None
        body = {
            "label": result.get("label"), "score": result.get("result"), "threshold": result.get("threshold"),
            "experts": result.get("experts", {}), "model": result.get("model"), "sha256": sha,
            "filename": upload.filename, "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1),
            "heatmap": result.get("heatmap"),  # a data: URL when the API offers one
            "faces": result.get("faces"), "whole_score": result.get("whole_score"),
            "faces_png": "data:image/png;base64," + base64.b64encode(annotated).decode() if annotated else None,
            "report_png": "data:image/png;base64," + base64.b64encode(report).decode(),
        }
        if wants_json():
            return jsonify(body)
        return Response(render_template("index.html", error=None, result=body, limits=_limits(cfg)), mimetype="text/html")

    @app.get("/healthz")
    def healthz() -> Response:
        try:
            api = client.health()
            return jsonify({"healthy": True, "api": api})
        except UserError as err:
            resp = jsonify({"healthy": False, "api_error": err.message})
            resp.status_code = 503
            return resp

    @app.after_request
    def _headers(resp: Response) -> Response:
        # Everything is local: no third-party origin may load anything into the page.
        resp.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data: blob:; "
                                                           "style-src 'self'; script-src 'self'; frame-ancestors 'none'; "
                                                           "form-action 'self'; base-uri 'none'")
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        return resp

    return app


def _limits(cfg: WebConfig) -> dict[str, str]:
    return {"bytes": _mb(cfg.max_upload_bytes), "megapixels": f"{cfg.max_pixels / 1e6:.0f}"}
