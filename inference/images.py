"""Image loading that survives the real world.

Every scorer in the project (the CLI, the API, training's datasets) decodes through
:func:`load_image`, so an image means the same pixels everywhere. It:

- recognises the format by content, never by file name, and only opens a fixed list of formats
  (Pillow's other plugins, EPS for one, would run external programs on untrusted input);
- refuses decompression bombs from the header, before any pixel is decoded;
- decodes large JPEGs at reduced scale (``Image.draft``) when the caller only needs a small image;
- applies EXIF orientation, takes the first frame of animations, and turns every mode
  (L, LA, P, RGBA, CMYK, I;16, I, F, ...) into 8-bit RGB, compositing transparency on white;
- turns every failure into one :class:`ImageError` with a stable ``code`` and a message that
  names the image.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

#: Formats accepted by content. (Camera JPEGs that Pillow reports as MPO open through JPEG.)
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

#: Default pixel limit: above this an image is refused as a possible decompression bomb.
DEFAULT_MAX_PIXELS = 64_000_000

#: File-name suffixes that folder walks pick up (files named explicitly are always tried).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".mpo"}
)

# Truncated files must fail, never decode into half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Register Pillow's plugins: Image.open(formats=...) only finds registered ones (Pillow 13 no longer
# registers on plugin import). ALLOWED_FORMATS still decides what may be opened.
Image.init()


class ImageError(ValueError):
    """One image could not be used. ``code`` is one of: ``empty``, ``not_image``,
    ``unsupported_format``, ``corrupt``, ``too_large``, ``unreadable``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


Source = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO


def _describe(src: Source, name: str | None) -> str:
    if name:
        return name
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return "<image bytes>"


def _open_stream(src: Source, what: str) -> BinaryIO:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise ImageError("empty", f"{what}: empty input (0 bytes)")
        return io.BytesIO(data)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise ImageError("unreadable", f"{what}: not a regular file")
            if size == 0:
                raise ImageError("empty", f"{what}: empty file (0 bytes)")
            return io.BytesIO(path.read_bytes())
        except ImageError:
            raise
        except OSError as exc:
            raise ImageError("unreadable", f"{what}: cannot read file ({exc.strerror or exc})") from exc
    return src  # an already open binary stream


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white (what a viewer sees)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            top = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
        elif mode == "I" and arr.size and float(arr.max()) <= 255:
            top = 255.0
        else:  # 16-bit data (Pillow opens 16-bit PNG/TIFF as I;16 or I)
            top = 65535.0
        arr = np.clip(np.nan_to_num(arr) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(
    src: Source,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int | None = None,
    name: str | None = None,
) -> Image.Image:
    """Decode ``src`` (a path, bytes or a binary stream) into an RGB ``PIL.Image``.

    ``min_size``: the smallest side length the caller needs. JPEGs much larger than that are decoded
    at a reduced DCT scale (1/2, 1/4, 1/8) that still keeps both sides at or above ``min_size``; a
    4000×3000 photo headed for a 224-px model decodes about 8× faster this way.

    Raises :class:`ImageError` for an empty input, a non-image, an unsupported format, a corrupt or
    truncated file, or an image over ``max_pixels``.
    """
    what = _describe(src, name)
    stream = _open_stream(src, what)
    with warnings.catch_warnings():
        # Our own pixel limit applies below; Pillow's bomb warning would only add noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(stream, formats=ALLOWED_FORMATS)
        except UnidentifiedImageError as exc:
            raise ImageError("not_image", f"{what}: not an image in a supported format "
                             f"({', '.join(ALLOWED_FORMATS)})") from exc
        except Image.DecompressionBombError as exc:
            raise ImageError("too_large", f"{what}: image too large ({exc})") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError("corrupt", f"{what}: corrupt image header ({exc})") from exc

        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageError("corrupt", f"{what}: image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageError(
                "too_large",
                f"{what}: {width}x{height} = {width * height:,} pixels is over the limit of "
                f"{max_pixels:,} (a possible decompression bomb)",
            )
        try:
            if getattr(img, "is_animated", False):
                img.seek(0)
            if min_size and img.format in ("JPEG", "MPO") and min(width, height) >= 2 * min_size:
                # draft keeps each side >= the requested size; it scales by powers of two.
                scale = min(width, height) / min_size
                img.draft("RGB", (int(width / scale + 0.5), int(height / scale + 0.5)))
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
            rgb.load()
        except Image.DecompressionBombError as exc:
            raise ImageError("too_large", f"{what}: image too large ({exc})") from exc
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
            raise ImageError("corrupt", f"{what}: corrupt or truncated image data ({exc})") from exc
    return rgb


def is_candidate_file(path: Path) -> bool:
    """Whether a folder walk should pick ``path`` up: a visible file with an image suffix."""
    return (
        path.is_file()
        and not path.name.startswith(".")
        and path.suffix.lower() in IMAGE_SUFFIXES
    )


def collect_images(inputs: list[str | os.PathLike[str]], *, recursive: bool = True) -> list[Path]:
    """Expand files and folders into an ordered, de-duplicated list of image paths.

    Files given explicitly are always kept (their content decides whether they are images);
    folders contribute the visible files with an image suffix, in sorted order.
    Raises ``FileNotFoundError`` for an input that does not exist.
    """
    seen: set[Path] = set()
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        if path.is_dir():
            walker = path.rglob("*") if recursive else path.glob("*")
            found = sorted(
                p for p in walker
                if is_candidate_file(p)
                and not any(part.startswith(".") for part in p.relative_to(path).parts[:-1])
            )
        else:
            found = [path]
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out
