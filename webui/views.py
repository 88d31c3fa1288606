"""The site's pages and the hooks every response passes (errors a person can read, a strict CSP), as one
Blueprint."""

from __future__ import annotations

import base64
import hashlib
import logging
import time

from flask import Blueprint, Response, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .client import ApiClient
from .config import UserError, WebConfig, check_upload, limits, mb, sizes_that_differ
from .report import faces_image, render_report

log = logging.getLogger("dfx.webui")
bp = Blueprint("dfx_webui", __name__)


def _site() -> tuple[WebConfig, ApiClient]:
    return current_app.extensions["dfx_webui"], current_app.extensions["dfx_webui_client"]


def wants_json() -> bool:
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "application/json"


def fail(err: UserError) -> Response:
    log.info("check failed: %s (%d)", err.code, err.status)
    cfg, _ = _site()
    if wants_json():
        resp = jsonify({"error": {"code": err.code, "message": err.message}})
    else:
        resp = Response(render_template("index.html", error=err, limits=limits(cfg)), mimetype="text/html")
    resp.status_code = err.status
    return resp


@bp.app_errorhandler(UserError)
def _user_error(err: UserError) -> Response:
    return fail(err)


@bp.app_errorhandler(RequestEntityTooLarge)
def _too_large(_: Exception) -> Response:
    # Refused from its Content-Length before a byte is read: the upload's size is that, envelope included.
    cfg, _ = _site()
    sent = request.content_length
    said = (f"The upload is {sizes_that_differ(sent, cfg.max_upload_bytes)[0]}; " if sent
            else "The upload is over the limit: ")
    return fail(UserError(413, "file_too_large", f"{said}the limit is {mb(cfg.max_upload_bytes)}."))


@bp.app_errorhandler(HTTPException)
def _http(exc: HTTPException) -> Response:
    return fail(UserError(exc.code or 500, "http_error", exc.description or exc.name))


@bp.get("/")
def index() -> str:
    cfg, _ = _site()
    return render_template("index.html", error=None, limits=limits(cfg))


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


@bp.post("/check")
def check() -> Response:
    cfg, client = _site()
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
        "provenance": result.get("provenance"), "label_by": result.get("label_by", "model"),
        "faces": result.get("faces"), "whole_score": result.get("whole_score"),
        "faces_png": "data:image/png;base64," + base64.b64encode(annotated).decode() if annotated else None,
        "report_png": "data:image/png;base64," + base64.b64encode(report).decode(),
    }
    if wants_json():
        return jsonify(body)
    return Response(render_template("index.html", error=None, result=body, limits=limits(cfg)), mimetype="text/html")


@bp.get("/healthz")
def healthz() -> Response:
    _, client = _site()
    try:
        api = client.health()
        return jsonify({"healthy": True, "api": api})
    except UserError as err:
        resp = jsonify({"healthy": False, "api_error": err.message})
        resp.status_code = 503
        return resp


@bp.after_app_request
def _headers(resp: Response) -> Response:
    # Everything is local: no third-party origin may load anything into the page.
    resp.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data: blob:; "
                                                       "style-src 'self'; script-src 'self'; frame-ancestors 'none'; "
                                                       "form-action 'self'; base-uri 'none'")
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Referrer-Policy", "no-referrer")
    return resp
