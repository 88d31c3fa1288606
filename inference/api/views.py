"""The API's endpoints and the hooks every request passes (auth, request log, errors as JSON), as one Blueprint."""

from __future__ import annotations

import hmac
import logging
import time
import uuid

from flask import Blueprint, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from .config import ApiError, error_response
from .docs_page import is_docs_path
from .payload import batch_payloads, single_payload
from .scoring import prediction_json, score
from .worker import current

log = logging.getLogger("dfx.api")
bp = Blueprint("dfx_api", __name__)


@bp.before_app_request
def _start() -> Response | None:
    g.t0 = time.perf_counter()
    _, config = current()
    # /docs is a static page (it asks for the key and sends it with every request it makes), so it loads without one
    if config.api_key and request.path != "/healthcheck" and not (config.docs and is_docs_path(request.path)):
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            resp = error_response(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="dfx"'
            return resp
    return None


@bp.after_app_request
def _log(resp: Response) -> Response:
    elapsed = (time.perf_counter() - g.get("t0", time.perf_counter())) * 1000
    log.info("%s %s %d %sB %.1fms", request.method, request.path, resp.status_code,
             request.content_length or 0, elapsed)
    return resp


@bp.app_errorhandler(ApiError)
def _api_error(exc: ApiError) -> Response:
    return error_response(exc.status, exc.code, exc.message)


@bp.app_errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    _, config = current()
    codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
             415: "unsupported_media_type", 400: "bad_request"}
    message = exc.description or exc.name
    if exc.code == 413:
        if (request.content_length or 0) > config.max_body_bytes:
            message = f"request body is over the limit of {config.max_body_bytes:,} bytes"
        else:  # werkzeug's form parser: too many parts, or one part over its memory limit
            message = "the multipart form has too many parts or too large a field; send one file field 'image'"
    resp = error_response(exc.code or 500, codes.get(exc.code or 500, "http_error"), message)
    if exc.code == 405 and getattr(exc, "valid_methods", None):
        resp.headers["Allow"] = ", ".join(exc.valid_methods)
    return resp


@bp.app_errorhandler(Exception)
def _internal(exc: Exception) -> Response:
    incident = uuid.uuid4().hex[:12]  # names the log entry, never the exception: internals stay in the log
    log.exception("internal error on %s %s (incident %s)", request.method, request.path, incident)
    return error_response(500, "internal_error", f"the model failed on this request; the error is logged as "
                                                 f"incident {incident} and the service keeps running")


def _elapsed_ms() -> float:
    return round((time.perf_counter() - g.t0) * 1000, 2)


@bp.post("/predict")
def predict() -> Response:
    data, options = single_payload()
    model, _ = current()
    det = model.require()
    [result] = score(det, [(data, "image")], **options)
    if isinstance(result, ApiError):
        raise result
    return jsonify({**prediction_json(det, result), "threshold": det.spec.threshold, "model": det.model_id,
                    "elapsed_ms": _elapsed_ms()})


@bp.post("/predict/batch")
def predict_batch() -> Response:
    entries, options, _ = batch_payloads()
    model, _ = current()
    det = model.require()
    scored = iter(score(det, [e for e in entries if not isinstance(e, ApiError)], **options))
    out = []
    for entry in entries:
        result = entry if isinstance(entry, ApiError) else next(scored)
        if isinstance(result, ApiError):
            out.append({"error": {"code": result.code, "message": result.message, "status": result.status}})
        else:
            out.append(prediction_json(det, result))
    return jsonify({"results": out, "threshold": det.spec.threshold, "model": det.model_id,
                    "elapsed_ms": _elapsed_ms()})


@bp.get("/healthcheck")
def healthcheck() -> Response:
    model, _ = current()
    if model.state == "ready" and model.detector is not None:
        return jsonify({"healthy": True, "model": model.detector.model_id})
    code = "model_loading" if model.state == "loading" else "model_unavailable"
    message = ("the model is still loading" if model.state == "loading"
               else "the model could not be loaded; the server's log says why")
    resp = jsonify({"healthy": False, "status": model.state, "error": {"code": code, "message": message}})
    resp.status_code = 503
    return resp


@bp.get("/model")
def model_info() -> Response:
    model, config = current()
    det = model.require()
    return jsonify({**det.describe(), "device": str(det.device),
                    "limits": {"max_body_bytes": config.max_body_bytes, "max_pixels": config.max_pixels,
                               "max_batch": config.max_batch},
                    "microbatch": {"wait_ms": model.wait_ms, "max_batch": config.batch_size,
                                   **model.batcher.summary(request.args.get("last", type=int))}})


@bp.get("/docs")
def docs() -> Response:
    """Swagger UI over /openapi.json, from the swagger-ui-bundle package, nothing from a CDN."""
    from .docs_page import assets_dir, page

    _, config = current()
    if not config.docs:
        raise ApiError(404, "not_found", "the API explorer is off on this server (dfx serve --no-docs)")
    if assets_dir() is None:
        raise ApiError(404, "not_found", "the API explorer needs the swagger-ui-bundle package "
                                         "(pip install swagger-ui-bundle); /openapi.json describes the API")
    return page(bool(config.api_key))


@bp.get("/docs/static/<path:name>")
def docs_asset(name: str) -> Response:
    from .docs_page import asset

    _, config = current()
    resp = asset(name) if config.docs else None
    if resp is None:
        raise ApiError(404, "not_found", f"no such file: /docs/static/{name[:100]}")
    return resp


@bp.get("/openapi.json")
def openapi() -> Response:
    from .openapi import openapi_spec

    _, config = current()
    return jsonify(openapi_spec(config))
