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

import errno
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
# Our own pixel limit (``max_pixels``, checked from the header before any pixel is decoded) is the only one:
# Pillow's would silently cap ``--max-pixels`` at 2 × 89.5 MP and quote its own number in the error.
Image.MAX_IMAGE_PIXELS = None

#: Modes with more than 8 bits per sample; converted to 8 bits in strips of about this many pixels.
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
STRIP_PIXELS = 1 << 20
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


def _open_stream(src: Source, what: str) -> tuple[BinaryIO, int | None]:
    """A binary stream for ``src`` and its length in bytes when known. Files are opened, not read: Pillow
    reads the header first, so a 2 GB non-image costs a few bytes, not 2 GB."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise ImageError("empty", f"{what}: empty input (0 bytes)")
        return io.BytesIO(data), len(data)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if path.is_symlink() and not path.exists():
            try:
                os.stat(path)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise ImageError("unreadable", f"{what}: symbolic link loop (the link points back to itself)") from None
            raise ImageError("unreadable", f"{what}: dangling symbolic link (its target does not exist)")
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise ImageError("unreadable", f"{what}: not a regular file")
            if size == 0:
                raise ImageError("empty", f"{what}: empty file (0 bytes)")
            return open(path, "rb"), size
        except ImageError:
            raise
        except OSError as exc:
            raise ImageError("unreadable", f"{what}: cannot read file ({exc.strerror or exc})") from exc
    return src, None  # an already open binary stream (the caller keeps it)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white (what a viewer sees)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in HIGH_DEPTH_MODES:
        return _high_depth_to_l(img).convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float grey → 8-bit grey, a strip of rows at a time.

    The scale is 65535 for 16-bit data, 255 for ``I`` data that fits in 8 bits, and 1 or 255 for float
    data (by its maximum). Working in strips keeps the extra memory at a few MB: a whole-image float64
    copy of a 7999×7999 16-bit PNG (124 KB on disk) cost 1.8 GB.
    """
    mode, (width, height) = img.mode, img.size
    if mode == "F":
        hi = img.getextrema()[1]
        top = 1.0 if hi <= 1.0 else 255.0  # NaN compares False: 255
    elif mode == "I":
        top = 255.0 if img.getextrema()[1] <= 255 else 65535.0
    else:  # 16-bit data (Pillow opens 16-bit PNG/TIFF as I;16 or I)
        top = 65535.0
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, STRIP_PIXELS // max(1, width))
    for y in range(0, height, rows):
        strip = np.asarray(img.crop((0, y, width, min(height, y + rows))), dtype=np.float64)
        out[y:y + rows] = np.clip(np.nan_to_num(strip) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def _check_jpeg_length(img: Image.Image, nbytes: int | None, what: str) -> None:
    """Refuse a JPEG whose header promises far more pixels than its data can hold.

    libjpeg fills the blocks after a premature end of scan with grey and only warns, so a 640×480 scan under
    a header that claims 7999×7999 would decode to 99.5 % grey and be scored. Every coded 8×8 luma block
    takes at least one bit in any JPEG (a Huffman code for its DC difference, even in a progressive DC scan),
    so a file with fewer bits than luma blocks cannot be complete.
    """
    if nbytes is None or img.format not in ("JPEG", "MPO"):
        return
    width, height = img.size
    blocks = -(-width // 8) * -(-height // 8)
    if nbytes * 8 < blocks:
        raise ImageError("corrupt", f"{what}: truncated JPEG: {nbytes:,} bytes cannot hold the {blocks:,} "
                                    f"8x8 blocks of its {width}x{height} header")


def _check_jpeg_fill(rgb: Image.Image, what: str) -> None:
    """Refuse a JPEG whose scan ended early although its bytes could have held it (a dense scan under a
    bigger header). libjpeg zero-fills every block after the end of the data, which decodes to exactly
    (128, 128, 128); a photograph never ends in 16 rows of exactly that colour. (An image whose last 16 rows
    are exactly mid-grey is refused too: the price of not scoring a 99 %-grey fill as if it were an image.)"""
    width, height = rgb.size
    if height < 16:
        return
    tail = rgb.crop((0, height - 16, width, height))
    if tail.getextrema() == ((128, 128), (128, 128), (128, 128)):
        raise ImageError("corrupt", f"{what}: truncated JPEG: its scan ends before its {width}x{height} header "
                                    "does (the rest would be grey fill)")


def load_image(
    src: Source,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int | None = None,
    name: str | None = None,
    min_long: int | None = None,
) -> Image.Image:
    """Decode ``src`` (a path, bytes or a binary stream) into an RGB ``PIL.Image``.

    ``min_size``: the smallest side length the caller needs. JPEGs much larger than that are decoded
    at a reduced DCT scale (1/2, 1/4, 1/8) that still keeps both sides at or above ``min_size``; a
    4000×3000 photo headed for a 224-px model decodes about 8× faster this way. ``min_long``: the same for the
    long side (a face search reads the image at most so many pixels long).

    Raises :class:`ImageError` for an empty input, a non-image, an unsupported format, a corrupt or
    truncated file, or an image over ``max_pixels``.
    """
    return load_image_scaled(src, max_pixels=max_pixels, min_size=min_size, min_long=min_long, name=name)[0]


def load_image_scaled(src: Source, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None,
                      min_long: int | None = None, name: str | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`load_image`, and the size of the image decoded in full (EXIF rotation applied): what a JPEG decoded at
    reduced scale stands for, so that boxes found on it can be given in the file's own pixels."""
    what = _describe(src, name)
    stream, nbytes = _open_stream(src, what)
    owned = isinstance(src, (str, os.PathLike))
    try:
        return _decode(stream, nbytes, what, max_pixels=max_pixels, min_size=min_size, min_long=min_long)
    finally:
        if owned:
            stream.close()


def _decode(stream: BinaryIO, nbytes: int | None, what: str, *, max_pixels: int, min_size: int | None,
            min_long: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
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
        _check_jpeg_length(img, nbytes, what)
        fmt = img.format
        try:
            if getattr(img, "is_animated", False):
                img.seek(0)
            ratios = ([min(width, height) / min_size] if min_size else []) + \
                ([max(width, height) / min_long] if min_long else [])
            if ratios and img.format in ("JPEG", "MPO") and min(ratios) >= 2:
                # draft keeps each side >= the requested size; it scales by powers of two.
                scale = min(ratios)
                img.draft("RGB", (int(width / scale + 0.5), int(height / scale + 0.5)))
            img.load()
            stored = img.size
            img = ImageOps.exif_transpose(img)
            turned = img.size != stored  # EXIF rotated it by 90° or 270°
            full = (height, width) if turned else (width, height)
            if img.mode in HIGH_DEPTH_MODES:
                img = _high_depth_to_l(img)  # drops the wide image before the RGB copy is made
            rgb = _to_rgb(img)
            del img
            rgb.load()
            if fmt in ("JPEG", "MPO"):
                _check_jpeg_fill(rgb, what)
        except Image.DecompressionBombError as exc:
            raise ImageError("too_large", f"{what}: image too large ({exc})") from exc
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
            raise ImageError("corrupt", f"{what}: corrupt or truncated image data ({exc})") from exc
    return rgb, full


def is_candidate_file(path: Path) -> bool:
    """Whether a folder walk should pick ``path`` up: a visible entry with an image suffix that is not a
    folder. Dangling symlinks, FIFOs and other non-files are kept, so that they get an error row (and
    ``dfx submit`` its 0.5) instead of vanishing; :func:`load_image` refuses them without opening them."""
    return (
        not path.name.startswith(".")
        and path.suffix.lower() in IMAGE_SUFFIXES
        and not path.is_dir()
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
        if not path.exists() and not path.is_symlink():  # a broken or looping link is an input: it gets an error row
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
            try:
                key = p.resolve()
            except (RuntimeError, OSError):  # a symlink loop: kept, so that it gets its own error row like a dangling link
                key = p.absolute()
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out
