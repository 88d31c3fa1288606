"""The site's settings, the error a person reads, and the upload limits checked before the API sees anything."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any


@dataclass
class WebConfig:
    api_url: str = "http://127.0.0.1:8080"
    api_key: str | None = None
    timeout: float = 30.0
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_files: int = 20                       #: images per check at most
    max_total_bytes: int = 64 * 1024 * 1024   #: one check's upload at most (all its files together)
    concurrency: int = 3                      #: API calls at once for one check (each image is its own call)


class UserError(Exception):
    """A failure explained to the person: HTTP status, a short title and a sentence that says what to do."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def mb(n: float, digits: int = 1) -> str:
    """A size people read: KB below one MB."""
    return f"{n / 1024 / 1024:.{digits}f} MB" if n >= 1024 * 1024 else f"{n / 1024:.{max(0, digits - 1)}f} KB"


def sizes_that_differ(n: int, limit: int) -> tuple[str, str]:
    """A size over the limit and the limit, written so that they differ: a 10.04 MB file was "10.0 MB" against
    a "10.0 MB" limit. More digits until they do, then bytes."""
    for digits in (1, 2, 3):
        size, most = mb(n, digits), mb(limit, digits)
        if size != most:
            return size, most
    return f"{n:,} bytes", f"{limit:,} bytes"


def check_upload(data: bytes, cfg: WebConfig) -> tuple[int, int] | None:
    """The site's own limits, before the API sees anything: size, then pixel count from the header
    (Pillow reads the header only). Returns (width, height) when Pillow knows the format, else None
    (the API then decides whether it is an image)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UserError(400, "empty_file", "The file is empty.")
    if len(data) > cfg.max_upload_bytes:
        size, limit = sizes_that_differ(len(data), cfg.max_upload_bytes)
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


def limits(cfg: WebConfig) -> dict[str, Any]:
    return {"bytes": mb(cfg.max_upload_bytes), "megapixels": f"{cfg.max_pixels / 1e6:.0f}",
            "files": cfg.max_files, "total": mb(cfg.max_total_bytes), "concurrency": cfg.concurrency}
