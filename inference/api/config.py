"""The API's settings and its one error type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flask import Response, jsonify

from ..images import DEFAULT_MAX_PIXELS


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
    #: the operator's provenance rule instead of the bundle's (inference/provenance ``RULES``; None: the bundle's)
    provenance_rule: str | None = None
    trust_anchors: str | None = None  #: a PEM file of CA certificates whose C2PA signers are trusted; None: none
    docs: bool = True                 #: ``GET /docs``: Swagger UI over /openapi.json (inference/api/docs_page.py)
    extra: dict[str, Any] = field(default_factory=dict)


class ApiError(Exception):
    """An error with an HTTP status and a stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


#: Per-request options, each ``"name": true`` in JSON or ``?name=1`` (multipart/raw bodies): score faces too;
#: explain (a heatmap picture of where the ensemble looked); read what the file says about its origin (on unless
#: ``false``/``0``). Each option's value when the request does not name it:
OPTIONS = {"faces": False, "explain": False, "provenance": True}
QUERY_FLAGS = {"1": True, "true": True, "0": False, "false": False}  #: ``?faces=`` values
IMAGE_ERROR_STATUS = {"empty": (400, "empty_image"), "not_image": (422, "not_an_image"),
                      "unsupported_format": (422, "not_an_image"), "corrupt": (422, "corrupt_image"),
                      "too_large": (413, "image_too_large"), "unreadable": (422, "corrupt_image")}


def error_response(status: int, code: str, message: str) -> Response:
    resp = jsonify({"error": {"code": code, "message": message}})
    resp.status_code = status
    return resp
