"""The web UI: a page where people upload an image and see the verdict, per-expert scores and a report.

It is a separate service that talks to the JSON API over HTTP only (it imports nothing of ours, and
no model code), so the model can live on a GPU server and the site anywhere. It uses the standard
library's HTTP client with a timeout. Upload limits (bytes and pixels) are enforced here, before
anything reaches the API. Nothing is written to disk: the report PNG is built in memory and returned
inline for the browser to download. Every page and asset is local (no CDN, no external fonts).

Modules: ``config`` (settings, limits), ``client`` (the API over HTTP), ``report`` (pictures), ``views`` (pages).
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask

from .client import ApiClient
from .config import WebConfig
from .views import bp

__all__ = ["WebConfig", "create_app"]


def create_app(config: WebConfig | dict[str, Any] | None = None) -> Flask:
    """The site as a WSGI app; it reaches the API over HTTP only."""
    cfg = config if isinstance(config, WebConfig) else WebConfig(**(config or {}))
    app = Flask("dfx-webui", template_folder=os.path.join(os.path.dirname(__file__), "templates"),
                static_folder=os.path.join(os.path.dirname(__file__), "static"))
    # One check's files together, with a little room for the multipart envelope; each file's limit is checked
    # on its own (one file over it is that file's error, not the check's).
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_total_bytes + 64 * 1024
    app.extensions["dfx_webui"] = cfg
    app.extensions["dfx_webui_client"] = ApiClient(cfg)
    app.register_blueprint(bp)
    return app
