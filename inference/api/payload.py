"""Reading a request: the image's bytes (JSON base64, multipart or a raw body), the batch's, and the options."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from flask import request

from .config import OPTIONS, QUERY_FLAGS, ApiError

DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+(;[\w-]+=[\w.-]+)*;base64,", re.IGNORECASE)


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


def wants(flag: str, body: Any = None) -> bool:
    """``"<flag>": true`` in a JSON body, or ``?<flag>=1`` / ``true`` (``0`` / ``false`` off) in the query
    string; else the option's default (:data:`OPTIONS`). Anything else is a 400 in both places: a typo must not
    silently turn an option off."""
    if isinstance(body, dict) and flag in body:
        if not isinstance(body[flag], bool):
            raise ApiError(400, "bad_field", f"'{flag}' must be true or false")
        return body[flag]
    value = request.args.get(flag)
    if value is None:
        return OPTIONS[flag]
    if value.lower() not in QUERY_FLAGS:
        raise ApiError(400, "bad_field", f"?{flag}= must be 1, 0, true or false")
    return QUERY_FLAGS[value.lower()]


def _form_flag(flag: str) -> bool:
    """A multipart form field ``<flag>`` (1/true/yes/on or 0/false/no/off), else the query string's answer."""
    value = request.form.get(flag)
    if value is None or value == "":
        return wants(flag)
    low = value.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ApiError(400, "bad_field", f"form field '{flag}' must be 1, 0, true or false")

def json_body() -> Any:
    """The body as JSON, or None when it is not JSON; nesting deep enough to exhaust the parser's
    recursion is a client error (400), not a server failure with a traceback in the log."""
    try:
        return request.get_json(force=True, silent=True)
    except RecursionError:
        raise ApiError(400, "bad_json", "the JSON body is nested too deeply") from None

def single_payload() -> tuple[bytes, dict[str, bool]]:
    """The image's bytes, and the options: whether its faces are scored too, whether it is explained."""
    ctype = (request.mimetype or "").lower()
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        data = request.get_data(cache=False)
        if not data:
            raise ApiError(400, "empty_image", "the request body is empty")
        return data, {f: wants(f) for f in OPTIONS}
    if ctype == "multipart/form-data":
        upload = request.files.get("image")
        if upload is None:
            raise ApiError(400, "missing_field", "multipart request needs a file field named 'image'")
        return upload.read(), {f: _form_flag(f) for f in OPTIONS}
    if ctype in ("application/json", "") or ctype.endswith("+json") or ctype == "text/plain":
        # Old clients sometimes send JSON without a content type; try it before refusing.
        body = json_body()
        if not isinstance(body, dict):
            raise ApiError(400, "bad_json", "the body must be a JSON object like {\"image\": \"<base64>\"}")
        if "image" not in body:
            raise ApiError(400, "missing_field", "the JSON body needs an 'image' field (base64)")
        return decode_base64_image(body["image"], "image"), {f: wants(f, body) for f in OPTIONS}
    raise ApiError(415, "unsupported_media_type",
                   f"content type '{ctype}' is not accepted: send application/json "
                   "{\"image\": \"<base64>\"}, multipart/form-data with a file 'image', or image/* bytes")


def batch_payloads() -> tuple[list[Any], dict[str, bool], int]:
    """The batch's entries (bytes and a name per good image, an ApiError per bad one, in order), its options, and
    its length; refuses a batch that is not a non-empty JSON list within ``max_batch``."""
    from .worker import current

    _, config = current()
    ctype = (request.mimetype or "").lower()
    if ctype not in ("application/json", "", "text/plain") and not ctype.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", "send application/json {\"images\": [\"<base64>\", ...]}")
    body = json_body()
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
    entries: list[Any] = []
    for i, value in enumerate(images):
        try:
            entries.append((decode_base64_image(value, f"images[{i}]"), f"images[{i}]"))
        except ApiError as exc:
            entries.append(exc)
    return entries, {f: wants(f, body) for f in OPTIONS}, len(images)
