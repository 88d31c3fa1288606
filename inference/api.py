"""The JSON API: a Flask app around one Detector per worker process.

Contract kept from the competition-winning service: ``POST /predict`` with ``{"image": "<base64>"}``
answers ``{"result": <fake probability>}`` (plus more fields that old clients ignore).

Design choices, and why:
- The Detector loads in a background thread, so ``/healthcheck`` can answer 503 while a worker loads
  (or failed to load) and a load balancer routes around it.
- Decoding runs in the request threads in parallel (Pillow releases the GIL); the forward pass is
  serialised per worker by a lock, so N threads never oversubscribe the cores with N forwards.
- Every error is JSON ``{"error": {"code", "message"}}`` with a fitting status; nothing returns a stack
  trace. Request logs carry method, path, status, size and time, never the body.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from .detector import NON_FINITE, Detector, Prediction
from .images import DEFAULT_MAX_PIXELS, ImageError

log = logging.getLogger("dfx.api")

DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+(;[\w-]+=[\w.-]+)*;base64,", re.IGNORECASE)


@dataclass
class ApiConfig:
    """Settings of one API worker. ``dfx serve`` fills them from options and ``DFX_*`` variables."""

    weights: str | None = None
    device: str = "auto"
    batch_size: int = 32
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch: int = 32
    api_key: str | None = None
    torch_threads: int | None = None
    #: micro-batching: how long concurrent requests are gathered (0 = off; None = 5 ms on CUDA, off on CPU, where
    #: it costs a lone client up to 16 % and gains 1.2-1.45x only at 16 clients; README "Micro-batching")
    batch_wait_ms: float | None = None
    explain_max_side: int = 512      #: long side of the heatmap picture an ``explain`` answer carries (pixels)
    extra: dict[str, Any] = field(default_factory=dict)


class ApiError(Exception):
    """An error with an HTTP status and a stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


#: Per-request options, each ``"name": true`` in JSON or ``?name=1`` (multipart/raw bodies): score faces too;
#: explain (a heatmap picture of where the ensemble looked).
OPTIONS = ("faces", "explain")
QUERY_FLAGS = {"1": True, "true": True, "0": False, "false": False}  #: ``?faces=`` values
IMAGE_ERROR_STATUS = {"empty": (400, "empty_image"), "not_image": (422, "not_an_image"),
                      "unsupported_format": (422, "not_an_image"), "corrupt": (422, "corrupt_image"),
                      "too_large": (413, "image_too_large"), "unreadable": (422, "corrupt_image")}


def _error(status: int, code: str, message: str) -> Response:
    resp = jsonify({"error": {"code": code, "message": message}})
    resp.status_code = status
    return resp


def decode_base64_image(value: Any, what: str) -> bytes:
    """Plain base64 or a ``data:image/...;base64,`` URL → bytes; whitespace and missing padding tolerated."""
    if not isinstance(value, str):
        raise ApiError(400, "invalid_field", f"{what} must be a base64 string, got {type(value).__name__}")
    text = DATA_URL.sub("", value.strip(), count=1)
    text = "".join(text.split())
    if not text:
        raise ApiError(400, "empty_image", f"{what} is an empty string")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        try:
            return base64.b64decode(text, altchars=b"-_", validate=True)  # URL-safe alphabet
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, "invalid_base64", f"{what} is not valid base64 ({exc})") from exc


class _Model:
    """The worker's Detector, loaded in the background; ``state`` is loading, ready or failed."""

    def __init__(self, config: ApiConfig) -> None:
        self.config = config
        self.detector: Detector | None = None
        self.state = "loading"
        self.wait_ms = 0.0  #: the micro-batching wait in effect (set at load: the default depends on the device)
        self.error: str | None = None
        self.forward_lock = threading.Lock()
        self.finder_lock = threading.Lock()
        self.finder: Any = None
        threading.Thread(target=self._load, name="dfx-load-model", daemon=True).start()

    def _load(self) -> None:
        try:
            import torch

            from .weights import resolve_weights

            if self.config.torch_threads:
                torch.set_num_threads(self.config.torch_threads)
            self.detector = Detector(resolve_weights(self.config.weights), device=self.config.device,
                                     batch_size=self.config.batch_size, max_pixels=self.config.max_pixels)
            from .microbatch import MicroBatcher

            det, sizes = self.detector, max(self.config.batch_size, self.config.max_batch)
            cuda = det.device.type == "cuda"
            self.wait_ms = self.config.batch_wait_ms if self.config.batch_wait_ms is not None else 5.0 if cuda else 0.0
            self.batcher = MicroBatcher(self._forward, max_batch=self.config.batch_size, wait_ms=self.wait_ms,
                                        warm_up=(lambda: det.warm_up(sizes)) if det.device.type == "cuda" else None)
            self.state = "ready"
            log.info("model ready: %s on %s", self.detector.model_id, self.detector.device)
        except Exception as exc:  # the detail (paths, internals) goes to the log only, never to a client
            self.error = type(exc).__name__
            self.state = "failed"
            log.error("model failed to load: %s: %s", type(exc).__name__, exc)

    def face_finder(self) -> Any:
        """The face finder, built on first use (one per worker process; MTCNN, else Haar)."""
        with self.finder_lock:
            if self.finder is None:
                from .faces import FaceFinder

                self.finder = FaceFinder()
            return self.finder

    def _forward(self, items: list) -> list[Prediction]:
        with self.forward_lock:
            assert self.detector is not None
            return self.detector.score_prepared(items)

    def require(self) -> Detector:
        if self.state == "ready" and self.detector is not None:
            return self.detector
        if self.state == "loading":
            raise ApiError(503, "model_loading", "the model is still loading; retry shortly")
        raise ApiError(503, "model_unavailable", "the model could not be loaded; the server's log says why")

    def wait(self, timeout: float = 300) -> bool:
        """Block until loaded or failed (for tools and tests); True when ready."""
        end = time.monotonic() + timeout
        while self.state == "loading" and time.monotonic() < end:
            time.sleep(0.05)
        return self.state == "ready"


def _prediction_json(det: Detector, pred: Prediction) -> dict[str, Any]:
    body: dict[str, Any] = {"result": pred.score, "label": pred.label, "experts": pred.experts}
    if pred.faces is not None:
        from .faces import face_fields

        body.update(face_fields(pred.faces, pred.whole_score))
    body.update(pred.explain or {})
    return body


def create_app(config: ApiConfig | dict[str, Any] | None = None) -> Flask:
    """The API as a WSGI app; the Detector starts loading at once in a background thread."""
    if config is None:
        config = ApiConfig()
    elif isinstance(config, dict):
        config = ApiConfig(**config)
    app = Flask("dfx-api")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.config["MAX_FORM_PARTS"] = 16  # one file field is all /predict reads; 5000 parts cost CPU for nothing
    app.json.sort_keys = False
    model = _Model(config)
    app.extensions["dfx_model"] = model
    app.extensions["dfx_config"] = config
    api_key = config.api_key or None

    @app.before_request
    def _start() -> Response | None:
        g.t0 = time.perf_counter()
        if api_key and request.path != "/healthcheck":
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                resp = _error(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'")
                resp.headers["WWW-Authenticate"] = 'Bearer realm="dfx"'
                return resp
        return None

    @app.after_request
    def _log(resp: Response) -> Response:
        elapsed = (time.perf_counter() - g.get("t0", time.perf_counter())) * 1000
        log.info("%s %s %d %sB %.1fms", request.method, request.path, resp.status_code,
                 request.content_length or 0, elapsed)
        return resp

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return _error(exc.status, exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                 415: "unsupported_media_type", 400: "bad_request"}
        message = exc.description or exc.name
        if exc.code == 413:
            if (request.content_length or 0) > config.max_body_bytes:
                message = f"request body is over the limit of {config.max_body_bytes:,} bytes"
            else:  # werkzeug's form parser: too many parts, or one part over its memory limit
                message = "the multipart form has too many parts or too large a field; send one file field 'image'"
        resp = _error(exc.code or 500, codes.get(exc.code or 500, "http_error"), message)
        if exc.code == 405 and hasattr(exc, "valid_methods") and exc.valid_methods:
            resp.headers["Allow"] = ", ".join(exc.valid_methods)
        return resp

    @app.errorhandler(Exception)
    def _internal(exc: Exception) -> Response:
        incident = uuid.uuid4().hex[:12]  # names the log entry, never the exception: internals stay in the log
        log.exception("internal error on %s %s (incident %s)", request.method, request.path, incident)
        return _error(500, "internal_error", f"the model failed on this request; the error is logged as incident "
                                             f"{incident} and the service keeps running")

    def _score(det: Detector, payloads: list[tuple[bytes, str]], faces: bool = False,
               explain: bool = False) -> list[Prediction | ApiError]:
        """Decode each payload in this thread (errors kept per item), then score the good ones through the
        micro-batcher, together with whatever other requests are ready (inference/microbatch.py). With
        ``faces``, each image's face crops are scored in the same forward and combined (Detector.combine_faces).
        With ``explain``, each prediction gains ``explain`` fields (:func:`_explain_fields`): its maps are
        computed after the score, under the forward lock."""
        from .detector import prepare_faces

        prepared: list = []
        groups: list[tuple[int, list, Any]] = []  # per good image: prepared items, its faces, its decoded image
        results: list = []
        model.batcher.decoding(+1)
        try:
            for data, what in payloads:
                try:
                    img = det.preprocessor.load(data, name=what) if explain else None
                    if faces:
                        items, found = prepare_faces(det.preprocessor, model.face_finder(), data, name=what)
                    else:
                        items, found = [det.preprocessor.transform(img) if img is not None
                                        else det.prepare(data, name=what)], []
                    prepared += items
                    groups.append((len(items), found, (img, items[0], data)))
                    results.append(None)
                except ImageError as exc:
                    status, code = IMAGE_ERROR_STATUS.get(exc.code, (422, "invalid_image"))
                    results.append(ApiError(status, code, exc.message))
        finally:
            model.batcher.decoding(-1)
        if prepared:
            preds = model.batcher.submit(prepared)
            combined, at = [], 0
            for n, found, (img, whole, data) in groups:
                pred = det.combine_faces(found, preds[at:at + n]) if faces else preds[at]
                if explain:
                    pred = replace(pred, explain=_explain_fields(det, img, whole, preds[at], pred, data))
                combined.append(pred)
                at += n
            scored = iter(combined)
            results = [r if r is not None else next(scored) for r in results]
            results = [ApiError(500, *NON_FINITE) if isinstance(r, Prediction) and not r.finite else r
                       for r in results]
        return results

    def _explain_fields(det: Detector, img: Any, whole: Any, whole_pred: Prediction, pred: Prediction,
                        data: bytes) -> dict[str, Any]:
        """``heatmap`` (a PNG data URL: the image tinted by the ensemble's map, colour bar, score, label; face
        boxes when faces were scored) and ``explained_by`` (the experts with maps), or ``explain_unavailable``."""
        from .explain import explain_prepared

        try:
            with model.forward_lock:
                expl = explain_prepared(det, img.size, whole, whole_pred)
            return _heatmap_fields(det, expl, img, pred, data)
        except Exception:  # the score stands; one image's map never fails its batch (issue 26, item 2)
            incident = uuid.uuid4().hex[:12]
            log.exception("drawing the heatmap failed (incident %s)", incident)
            return {"explain_unavailable": f"the heatmap of this image could not be drawn; the error is logged "
                                           f"as incident {incident}"}

    def _heatmap_fields(det: Detector, expl: Any, img: Any, pred: Prediction, data: bytes) -> dict[str, Any]:
        from .explain import data_url, original_size, overlay, png_bytes

        if expl.ensemble is None:
            return {"explain_unavailable": expl.unavailable}
        expl.prediction = pred
        boxes = []
        if pred.faces:
            full = original_size(io.BytesIO(data)) or img.size
            sx = img.width / full[0]
            boxes = [([v * sx for v in f["box"]], f["score"]) for f in pred.faces]
        picture = overlay(img, expl, label=pred.label, threshold=det.spec.threshold,
                          max_side=config.explain_max_side, boxes=boxes)
        return {"heatmap": data_url(png_bytes(picture)), "explained_by": sorted(expl.maps)}

    def _wants(flag: str, body: Any = None) -> bool:
        """``"<flag>": true`` in a JSON body, or ``?<flag>=1`` / ``true`` (``0`` / ``false`` off) in the query
        string. Anything else is a 400 in both places: a typo must not silently turn an option off."""
        if isinstance(body, dict) and flag in body:
            if not isinstance(body[flag], bool):
                raise ApiError(400, "bad_field", f"'{flag}' must be true or false")
            return body[flag]
        value = request.args.get(flag)
        if value is None:
            return False
        if value.lower() not in QUERY_FLAGS:
            raise ApiError(400, "bad_field", f"?{flag}= must be 1, 0, true or false")
        return QUERY_FLAGS[value.lower()]

    def _json_body() -> Any:
        """The body as JSON, or None when it is not JSON; nesting deep enough to exhaust the parser's
        recursion is a client error (400), not a server failure with a traceback in the log."""
        try:
            return request.get_json(force=True, silent=True)
        except RecursionError:
            raise ApiError(400, "bad_json", "the JSON body is nested too deeply") from None

    def _single_payload() -> tuple[bytes, dict[str, bool]]:
        """The image's bytes, and the options: whether its faces are scored too, whether it is explained."""
        ctype = (request.mimetype or "").lower()
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            data = request.get_data(cache=False)
            if not data:
                raise ApiError(400, "empty_image", "the request body is empty")
            return data, {f: _wants(f) for f in OPTIONS}
        if ctype == "multipart/form-data":
            upload = request.files.get("image")
            if upload is None:
                raise ApiError(400, "missing_field", "multipart request needs a file field named 'image'")
            return upload.read(), {f: _wants(f) or request.form.get(f, "").lower() in ("1", "true", "yes", "on")
                                   for f in OPTIONS}
        if ctype in ("application/json", "") or ctype.endswith("+json") or ctype == "text/plain":
            # Old clients sometimes send JSON without a content type; try it before refusing.
            body = _json_body()
            if not isinstance(body, dict):
                raise ApiError(400, "bad_json", "the body must be a JSON object like {\"image\": \"<base64>\"}")
            if "image" not in body:
                raise ApiError(400, "missing_field", "the JSON body needs an 'image' field (base64)")
            return decode_base64_image(body["image"], "image"), {f: _wants(f, body) for f in OPTIONS}
        raise ApiError(415, "unsupported_media_type",
                       f"content type '{ctype}' is not accepted: send application/json "
                       "{\"image\": \"<base64>\"}, multipart/form-data with a file 'image', or image/* bytes")

    @app.post("/predict")
    def predict() -> Response:
        data, options = _single_payload()
        det = model.require()
        [result] = _score(det, [(data, "image")], **options)
        if isinstance(result, ApiError):
            raise result
        body = _prediction_json(det, result)
        body.update(threshold=det.spec.threshold, model=det.model_id,
                    elapsed_ms=round((time.perf_counter() - g.t0) * 1000, 2))
        return jsonify(body)

    @app.post("/predict/batch")
    def predict_batch() -> Response:
        ctype = (request.mimetype or "").lower()
        if ctype not in ("application/json", "", "text/plain") and not ctype.endswith("+json"):
            raise ApiError(415, "unsupported_media_type", "send application/json {\"images\": [\"<base64>\", ...]}")
        body = _json_body()
        if not isinstance(body, dict):
            raise ApiError(400, "bad_json", "the body must be a JSON object like {\"images\": [\"<base64>\", ...]}")
        images = body.get("images")
        if not isinstance(images, list):
            raise ApiError(400, "missing_field", "the JSON body needs an 'images' list of base64 strings")
        if not images:
            raise ApiError(400, "empty_batch", "'images' is empty")
        if len(images) > config.max_batch:
            raise ApiError(413, "too_many_images", f"{len(images)} images is over the limit of {config.max_batch} "
                                                   "per request")
        det = model.require()
        payloads, entries = [], []
        for i, value in enumerate(images):
            try:
                payloads.append((decode_base64_image(value, f"images[{i}]"), f"images[{i}]"))
                entries.append(None)
            except ApiError as exc:
                entries.append(exc)
        scored = iter(_score(det, payloads, **{f: _wants(f, body) for f in OPTIONS}))
        out = []
        for entry in entries:
            result = entry if entry is not None else next(scored)
            if isinstance(result, ApiError):
                out.append({"error": {"code": result.code, "message": result.message, "status": result.status}})
            else:
                out.append(_prediction_json(det, result))
        return jsonify({"results": out, "threshold": det.spec.threshold, "model": det.model_id,
                        "elapsed_ms": round((time.perf_counter() - g.t0) * 1000, 2)})

    @app.get("/healthcheck")
    def healthcheck() -> Response:
        if model.state == "ready" and model.detector is not None:
            return jsonify({"healthy": True, "model": model.detector.model_id})
        code = "model_loading" if model.state == "loading" else "model_unavailable"
        message = ("the model is still loading" if model.state == "loading"
                   else "the model could not be loaded; the server's log says why")
        resp = jsonify({"healthy": False, "status": model.state, "error": {"code": code, "message": message}})
        resp.status_code = 503
        return resp

    @app.get("/model")
    def model_info() -> Response:
        det = model.require()
        return jsonify({**det.describe(), "device": str(det.device),
                        "limits": {"max_body_bytes": config.max_body_bytes, "max_pixels": config.max_pixels,
                                   "max_batch": config.max_batch},
                        "microbatch": {"wait_ms": model.wait_ms, "max_batch": config.batch_size,
                                       **model.batcher.summary(request.args.get("last", type=int))}})

    @app.get("/openapi.json")
    def openapi() -> Response:
        from .openapi import openapi_spec

        return jsonify(openapi_spec(config))

    return app
