"""The JSON API: a Flask app around one Detector per worker process.

Contract kept from the competition-winning service: ``POST /predict`` with ``{"image": "<base64>"}`` answers
``{"result": <fake probability>}`` (plus more fields that old clients ignore). The Detector loads in the background
(``/healthcheck`` answers 503 until it is ready, so a load balancer routes around a loading worker); request threads
decode in parallel and one forward runs at a time per worker; every error is JSON ``{"error": {"code", "message"}}``.

Modules: ``config`` (settings, the error type), ``worker`` (the model), ``payload`` (reading requests), ``scoring``
(images → answers), ``views`` (endpoints and hooks, one Blueprint), ``openapi`` (the description).
"""

from __future__ import annotations

from typing import Any

from flask import Flask

from .config import ApiConfig, ApiError
from .payload import decode_base64_image
from .views import bp
from .worker import ModelWorker

__all__ = ["ApiConfig", "ApiError", "create_app", "decode_base64_image"]


def create_app(config: ApiConfig | dict[str, Any] | None = None) -> Flask:
    """The API as a WSGI app; the Detector starts loading at once in a background thread."""
    config = config if isinstance(config, ApiConfig) else ApiConfig(**(config or {}))
    app = Flask("dfx-api")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.config["MAX_FORM_PARTS"] = 16  # one file field is all /predict reads; 5000 parts cost CPU for nothing
    app.json.sort_keys = False
    app.extensions["dfx_config"] = config
    app.extensions["dfx_model"] = ModelWorker(config)
    app.register_blueprint(bp)
    return app
