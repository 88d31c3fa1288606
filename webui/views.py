"""The site's pages and the hooks every response passes (errors a person can read, a strict CSP), as one
Blueprint."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .client import ApiClient
from .config import UserError, WebConfig, limits, mb, sizes_that_differ
from .results import check_many, check_one, table_row, table_urls

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
    said = (f"The upload is {sizes_that_differ(sent, cfg.max_total_bytes)[0]}; " if sent
            else "The upload is over the limit: ")
    return fail(UserError(413, "file_too_large", f"{said}the limit for one check is {mb(cfg.max_total_bytes)} "
                                                 f"(each file up to {mb(cfg.max_upload_bytes)})."))


@bp.app_errorhandler(HTTPException)
def _http(exc: HTTPException) -> Response:
    return fail(UserError(exc.code or 500, "http_error", exc.description or exc.name))


@bp.get("/")
def index() -> str:
    cfg, _ = _site()
    return render_template("index.html", error=None, limits=limits(cfg))


def same_site() -> bool:
    """Whether a POST comes from this site's own page (or from no browser page at all, like curl).
    Another origin must not spend the API, and its key, through a visitor's browser. A browser's
    ``Sec-Fetch-Site`` (which no page can set) decides when present; else the ``Origin``. (A form posted with
    JavaScript off may carry ``Origin: null``: its ``Sec-Fetch-Site`` still says same-origin.)"""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        return fetch_site in ("same-origin", "none")
    origin = request.headers.get("Origin")
    if origin is not None and origin.rstrip("/") != request.host_url.rstrip("/"):
        return False
    return True


@bp.post("/check")
def check() -> Response:
    """One or more images (file field ``image``, repeated): each checked through the API on its own. One image
    answers as before (JSON fields, or the page with its result; an error is the page's error); several answer a
    table (JSON ``results``, one entry or error per image, or the page with every result)."""
    cfg, client = _site()
    if not same_site():
        raise UserError(403, "cross_site", "Uploads are accepted from this site's own page only.")
    uploads = [u for u in request.files.getlist("image") if u is not None and u.filename]
    if not uploads:
        raise UserError(400, "no_file", "Choose an image file first.")
    if len(uploads) > cfg.max_files:
        raise UserError(413, "too_many_files", f"{len(uploads)} files is over the limit of {cfg.max_files} per "
                                               "check. Check them in smaller groups.")
    want_faces = request.form.get("faces", "").lower() in ("1", "on", "true", "yes")
    want_map = request.form.get("explain", "").lower() in ("1", "on", "true", "yes")
    items = [(u.filename, u.read()) for u in uploads]
    if len(items) == 1:
        name, data = items[0]
        bodies = [check_one(client, cfg, data, name, faces=want_faces, explain=want_map)]
    else:
        bodies = check_many(client, cfg, items, faces=want_faces, explain=want_map)
    if wants_json():
        for b in bodies:  # the result as the page draws it, so scripts insert the server's own markup
            if "error" not in b:
                b["html"] = render_detail(b)
            b["row"] = table_row(b)
        return jsonify(bodies[0] if len(items) == 1 else {"results": bodies, "table": [b["row"] for b in bodies]})
    return Response(render_template("index.html", error=None, results=bodies, downloads=table_urls(bodies),
                                    limits=limits(cfg)), mimetype="text/html")


def render_detail(body: dict) -> str:
    """One result's section as the page draws it (templates/_result.html)."""
    return render_template("_result_one.html", r=body, i=0)


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
    # same-origin: nothing leaves for other sites, and the page's own form posts keep their Origin
    resp.headers.setdefault("Referrer-Policy", "same-origin")
    return resp
