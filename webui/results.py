"""One check's results: each image through the API (a few at a time), what the page shows of each, and the table a
reviewer downloads.

Every image is its own API call, so one bad file is one error row and never hides the others; the calls run
``concurrency`` at a time so a check of twenty images does not take twenty of the API's threads at once.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .client import ApiClient
from .config import UserError, WebConfig, check_upload
from .report import faces_image, layer_image, render_report, thumbnail

#: the table's columns, in order (the CSV's header and each JSON row's keys)
COLUMNS = ("file", "sha256", "label", "score", "faces", "label_by", "provenance", "elapsed_ms", "error")


def check_one(client: ApiClient, cfg: WebConfig, data: bytes, filename: str, *, faces: bool,
              explain: bool) -> dict[str, Any]:
    """Everything the page shows of one image (raises UserError when the site or the API refuses it). The bundle's
    description (``/model``: what each expert reads, the band, the threshold rule) is asked once the image is
    scored, from the client's cache."""
    check_upload(data, cfg)
    t0 = time.perf_counter()
    result = client.predict(data, faces=faces, explain=explain)
    model = client.model()
    sha = hashlib.sha256(data).hexdigest()
    descriptions = model.get("descriptions", {})
    threshold = result.get("threshold", 0.5)
    band = model.get("band") if model.get("threshold") == threshold else None
    body: dict[str, Any] = {
        "label": result.get("label"), "score": result.get("result"), "threshold": threshold,
        "band": band or [threshold, threshold], "threshold_rule": model.get("threshold_rule"),
        "experts": result.get("experts", {}),
        "experts_info": [{"name": n, "score": p, "description": descriptions.get(n)}
                         for n, p in result.get("experts", {}).items()],
        "model": result.get("model"), "sha256": sha, "filename": filename,
        "heatmap": result.get("heatmap"),  # a data: URL when the API offers one
        "heatmap_layer": result.get("heatmap_layer"), "heatmap_colours": result.get("heatmap_colours"),
        "provenance": result.get("provenance"), "label_by": result.get("label_by", "model"),
        "faces": result.get("faces"), "whole_score": result.get("whole_score"),
    }
    annotated = faces_image(data, result["faces"]) if result.get("faces") else None
    body["faces_png"] = _png_url(annotated) if annotated else None
    picture = shown_picture(data)  # decoded once for the table, the overlay and the report
    body["display"] = _jpeg_url(picture) if picture is not None and layer_image(body["heatmap_layer"]) else None
    body["thumb"] = _jpeg_url(picture, 96, quality=80) if picture is not None else None
    body["report_png"] = _png_url(render_report(data, body, sha, filename, picture=picture))
    body["elapsed_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    return body


def check_many(client: ApiClient, cfg: WebConfig, uploads: list[tuple[str, bytes]], *, faces: bool,
               explain: bool) -> list[dict[str, Any]]:
    """Each upload's body, or ``{"filename", "error": {code, message, status}}``, in upload order."""
    def one(item: tuple[str, bytes]) -> dict[str, Any]:
        name, data = item
        try:
            return check_one(client, cfg, data, name, faces=faces, explain=explain)
        except UserError as err:
            return {"filename": name, "error": {"code": err.code, "message": err.message, "status": err.status}}

    with ThreadPoolExecutor(max_workers=max(1, min(cfg.concurrency, len(uploads)))) as pool:
        return list(pool.map(one, uploads))


def table_row(body: dict[str, Any]) -> dict[str, Any]:
    """One result as a row of the downloadable table (:data:`COLUMNS`)."""
    if "error" in body:
        return {**{c: None for c in COLUMNS}, "file": body.get("filename"), "error": body["error"]["message"]}
    prov = body.get("provenance") or {}
    return {"file": body.get("filename"), "sha256": body.get("sha256"), "label": body.get("label"),
            "score": body.get("score"), "faces": None if body.get("faces") is None else len(body["faces"]),
            "label_by": body.get("label_by"), "provenance": prov.get("declared"),
            "elapsed_ms": body.get("elapsed_ms"), "error": None}


def _safe_cell(value: Any) -> str:
    """A CSV cell a spreadsheet shows and never runs (a leading = + - @ would be a formula)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def table_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows([_safe_cell(r.get(c)) for c in COLUMNS] for r in rows)
    return buf.getvalue()


def table_urls(bodies: list[dict[str, Any]]) -> dict[str, str]:
    """The table as CSV and JSON data URLs (the page's downloads without JavaScript)."""
    rows = [table_row(b) for b in bodies]
    return {"csv": "data:text/csv;charset=utf-8;base64," + base64.b64encode(table_csv(rows).encode()).decode(),
            "json": "data:application/json;base64," + base64.b64encode(json.dumps(rows, indent=1).encode()).decode()}


def _png_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def shown_picture(data: bytes, max_side: int = 1024) -> Any:
    """The image as shown (EXIF rotation applied, long side at most ``max_side``), or None when Pillow cannot
    read it (the API did: the page goes without pictures of it)."""
    try:
        return thumbnail(data, max_side)
    except Exception:  # noqa: BLE001
        return None


def _jpeg_url(picture: Any, side: int | None = None, quality: int = 88) -> str:
    """``picture`` (at most ``side`` on its long side) as a JPEG data URL: the table's thumbnail, or what the page
    lays the map over (the layer is stretched to the image's box: both have the image's aspect)."""
    if side is not None:
        picture = picture.copy()
        picture.thumbnail((side, side))
    buf = io.BytesIO()
    picture.save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
