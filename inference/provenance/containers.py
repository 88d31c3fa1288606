"""The metadata blocks of a JPEG, PNG or WebP file, found by walking the container (never decoding pixels), and the
same file without them.

Walking is bounded so a hostile file costs little: blocks are addressed in place (a 20 MB junk segment is stepped
over, never copied), at most :data:`MAX_BLOCKS` blocks are walked, at most :data:`MAX_TEXT_BLOCKS` text blocks and
:data:`MAX_METADATA_BYTES` of metadata in all are read, and compressed text is inflated to :data:`MAX_TEXT_BYTES`
at most. What was left unread is said (``skipped``), never silently dropped.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Iterator

MAX_BLOCKS = 20_000              #: container blocks walked per file at most
MAX_TEXT_BLOCKS = 256            #: PNG text chunks / JPEG comments read per file at most
MAX_METADATA_BYTES = 2 << 20     #: bytes of metadata read (copied, inflated) per file at most
MAX_TEXT_BYTES = 256 << 10       #: one text value at most, after inflating

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
EXIF_HEADER = b"Exif\x00\x00"
#: PNG chunks a metadata-free copy keeps: the pixels, their palette and transparency, and APNG's frames
PNG_KEEP = {b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND", b"acTL", b"fcTL", b"fdAT"}
#: WebP chunks a metadata-free copy keeps
WEBP_KEEP = {b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM", b"ANMF"}

Block = tuple[bytes, memoryview, int, int]  #: (kind, payload, start, end): ``start``/``end`` bound the whole block


class NotAContainer(ValueError):
    """The bytes are not a JPEG, PNG or WebP file this module can walk."""


@dataclass
class Blocks:
    """What a file carries besides its pixels."""

    format: str | None = None                                  #: "jpeg", "png", "webp" or None (not walked)
    text: list[tuple[str, str]] = field(default_factory=list)  #: (key, value): PNG text chunks, JPEG comments
    xmp: list[str] = field(default_factory=list)
    exif: list[bytes] = field(default_factory=list)            #: raw EXIF (TIFF header first)
    c2pa: bool = False                                         #: a C2PA/JUMBF block is embedded
    skipped: list[str] = field(default_factory=list)           #: what the bounds left unread
    budget: int = MAX_METADATA_BYTES

    def note(self, text: str) -> None:
        if text not in self.skipped:
            self.skipped.append(text)

    def take(self, view: memoryview, what: str) -> bytes | None:
        """``view`` as bytes if the metadata budget allows, else None (and why, once per kind)."""
        if len(view) > self.budget:
            self.note(f"{what} not read: over the {MAX_METADATA_BYTES >> 20} MB metadata bound")
            return None
        self.budget -= len(view)
        return bytes(view)

    def add_text(self, key: str, value: str) -> None:
        if key == "XML:com.adobe.xmp":
            self.xmp.append(value)
        elif len(self.text) < MAX_TEXT_BLOCKS:
            self.text.append((key, value))
        else:
            self.note(f"text blocks after the first {MAX_TEXT_BLOCKS} not read")


def sniff(data: bytes | memoryview) -> str | None:
    head = bytes(data[:12])
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == PNG_SIGNATURE:
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def read_blocks(data: bytes | memoryview) -> Blocks:
    """The metadata of a JPEG, PNG or WebP file (other formats: an empty :class:`Blocks` with ``format`` None).
    A malformed container ends the walk where it breaks; what was read so far is kept."""
    view = memoryview(data)
    blocks = Blocks(format=sniff(view))
    walk = {"jpeg": _jpeg, "png": _png, "webp": _webp}.get(blocks.format or "")
    if walk is not None:
        try:
            walk(view, blocks)
        except (struct.error, IndexError, ValueError) as exc:
            blocks.note(f"the {(blocks.format or '').upper()} container was read up to where it stops being "
                        f"readable ({exc})")
    return blocks


def _text(raw: bytes, encoding: str = "latin-1") -> str:
    return raw[:MAX_TEXT_BYTES].decode(encoding, "replace")


def _inflate(raw: bytes) -> bytes:
    """zlib data inflated to :data:`MAX_TEXT_BYTES` at most (a zip bomb yields its first 256 KB)."""
    return zlib.decompressobj().decompress(raw, MAX_TEXT_BYTES)


def _jpeg_segments(view: memoryview) -> Iterator[Block]:
    """Each segment before the scan (marker byte as ``kind``)."""
    pos, n = 2, 0
    while pos + 4 <= len(view) and n < MAX_BLOCKS:
        if view[pos] != 0xFF:
            raise ValueError("not at a marker")
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: the metadata we read comes before
            return
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        length = struct.unpack(">H", view[pos + 2:pos + 4])[0]
        if length < 2:
            raise ValueError("bad segment length")
        yield bytes([marker]), view[pos + 4:pos + 2 + length], pos, pos + 2 + length
        pos += 2 + length
        n += 1
    if n >= MAX_BLOCKS:
        raise ValueError(f"more than {MAX_BLOCKS:,} segments")


def _jpeg(view: memoryview, blocks: Blocks) -> None:
    for kind, payload, _, _ in _jpeg_segments(view):
        marker = kind[0]
        if marker == 0xE1 and bytes(payload[:6]) == EXIF_HEADER:
            raw = blocks.take(payload[6:], "EXIF")
            if raw:
                blocks.exif.append(raw)
        elif marker == 0xE1 and bytes(payload[:len(XMP_HEADER)]) == XMP_HEADER:
            raw = blocks.take(payload[len(XMP_HEADER):], "XMP")
            if raw:
                blocks.xmp.append(_text(raw, "utf-8"))
        elif marker == 0xEB:  # APP11: JUMBF boxes, where C2PA manifests live in a JPEG
            blocks.c2pa = blocks.c2pa or b"c2pa" in bytes(payload[:64])
        elif marker == 0xFE:
            raw = blocks.take(payload[:MAX_TEXT_BYTES], "comments")
            if raw:
                blocks.add_text("JPEG comment", _text(raw, "utf-8"))


def _png_chunks(view: memoryview) -> Iterator[Block]:
    pos, n = 8, 0
    while pos + 8 <= len(view) and n < MAX_BLOCKS:
        length, kind = struct.unpack(">I4s", view[pos:pos + 8])
        end = pos + 12 + length
        if end > len(view):
            raise ValueError("a chunk runs past the end")
        yield kind, view[pos + 8:pos + 8 + length], pos, end
        if kind == b"IEND":
            return
        pos, n = end, n + 1
    if n >= MAX_BLOCKS:
        raise ValueError(f"more than {MAX_BLOCKS:,} chunks")


def _png(view: memoryview, blocks: Blocks) -> None:
    for kind, payload, _, _ in _png_chunks(view):
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            if len(blocks.text) >= MAX_TEXT_BLOCKS:
                blocks.note(f"text blocks after the first {MAX_TEXT_BLOCKS} not read")
                continue
            raw = blocks.take(payload[:MAX_TEXT_BYTES + 1024], "PNG text")
            if raw is not None:
                _png_text(kind, raw, blocks)
        elif kind == b"eXIf":
            raw = blocks.take(payload, "EXIF")
            if raw:
                blocks.exif.append(raw)
        elif kind == b"caBX":
            blocks.c2pa = True


def _png_text(kind: bytes, raw: bytes, blocks: Blocks) -> None:
    key, _, rest = raw.partition(b"\x00")
    name = key[:79].decode("latin-1", "replace")
    try:
        if kind == b"tEXt":
            value = _text(rest)
        elif kind == b"zTXt":
            value = _text(_inflate(rest[1:]))
        else:  # iTXt: compression flag, method, language\0, translated keyword\0, text (UTF-8)
            compressed = rest[:1] == b"\x01"
            _, _, rest2 = rest[2:].partition(b"\x00")
            _, _, text = rest2.partition(b"\x00")
            value = _text(_inflate(text) if compressed else text, "utf-8")
    except zlib.error:
        blocks.note(f"PNG text '{name}' is corrupt")
        return
    blocks.add_text(name, value)


def _riff_chunks(view: memoryview) -> Iterator[Block]:
    pos, n = 12, 0
    while pos + 8 <= len(view) and n < MAX_BLOCKS:
        kind, length = struct.unpack("<4sI", view[pos:pos + 8])
        end = pos + 8 + length + (length & 1)
        yield kind, view[pos + 8:pos + 8 + length], pos, min(end, len(view))
        pos, n = end, n + 1
    if n >= MAX_BLOCKS:
        raise ValueError(f"more than {MAX_BLOCKS:,} chunks")


def _webp(view: memoryview, blocks: Blocks) -> None:
    for kind, payload, _, _ in _riff_chunks(view):
        if kind == b"EXIF":
            raw = blocks.take(payload, "EXIF")
            if raw:
                blocks.exif.append(raw[6:] if raw[:6] == EXIF_HEADER else raw)
        elif kind == b"XMP ":
            raw = blocks.take(payload, "XMP")
            if raw:
                blocks.xmp.append(_text(raw, "utf-8"))
        elif kind == b"C2PA":
            blocks.c2pa = True


# -- a metadata-free copy --------------------------------------------------------------------------------------
def orientation_exif(orientation: int) -> bytes:
    """A minimal EXIF (TIFF header, one IFD) holding only the Orientation tag: what a copy keeps so that it is
    decoded the same way (inference/images.py applies the orientation)."""
    return (b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 1)
            + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + b"\x00\x00\x00\x00")


def _orientation(exif: list[bytes]) -> int:
    from PIL import Image

    for raw in exif:
        try:
            value = Image.Exif()
            value.load(raw)
            o = int(value.get(0x0112, 1))
        except Exception:  # noqa: BLE001 - an unreadable EXIF is no orientation (as Pillow decides when decoding)
            continue
        if 2 <= o <= 8:
            return o
    return 1


def strip_metadata(data: bytes) -> bytes:
    """The file without its metadata: the coded pixels untouched (a JPEG is not re-encoded), only EXIF orientation
    kept (as a one-tag EXIF) so that it decodes to exactly the same picture. JPEG keeps JFIF (APP0), Adobe
    (APP14, which says how its colours are coded) and every coding segment; PNG keeps :data:`PNG_KEEP`; WebP
    :data:`WEBP_KEEP`. Raises :class:`NotAContainer` for other formats and ValueError for a broken container."""
    view = memoryview(data)
    fmt = sniff(view)
    if fmt is None:
        raise NotAContainer("only JPEG, PNG and WebP files can be stripped without re-encoding")
    orientation = _orientation(read_blocks(view).exif)
    if fmt == "jpeg":
        return _strip_jpeg(view, orientation)
    if fmt == "png":
        return _strip_png(view, orientation)
    return _strip_webp(view, orientation)


def _strip_jpeg(view: memoryview, orientation: int) -> bytes:
    out = [b"\xff\xd8"]
    end = 2
    for kind, _, start, end in _jpeg_segments(view):
        marker = kind[0]
        if marker in (0xE0, 0xEE) or not (0xE1 <= marker <= 0xEF or marker == 0xFE):
            out.append(bytes(view[start:end]))
    if orientation != 1:
        exif = EXIF_HEADER + orientation_exif(orientation)
        at = 2 if len(out) > 1 and out[1][:4] == b"\xff\xe0" else 1  # after SOI (and JFIF, which must be first)
        out.insert(at, b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif)
    out.append(bytes(view[end:]))  # the scan and everything after it, as it is
    return b"".join(out)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _strip_png(view: memoryview, orientation: int) -> bytes:
    out = [PNG_SIGNATURE]
    for kind, _, start, end in _png_chunks(view):
        if kind in PNG_KEEP:
            out.append(bytes(view[start:end]))
        if kind == b"IHDR" and orientation != 1:
            out.append(_png_chunk(b"eXIf", orientation_exif(orientation)))
    return b"".join(out)


def _strip_webp(view: memoryview, orientation: int) -> bytes:
    chunks = []
    for kind, _, start, end in _riff_chunks(view):
        if kind in WEBP_KEEP:
            raw = bytearray(view[start:end])
            if kind == b"VP8X":  # flags: ICC 0x20, EXIF 0x08, XMP 0x04 (those chunks are gone)
                raw[8] &= ~(0x20 | 0x08 | 0x04) & 0xFF
                if orientation != 1:
                    raw[8] |= 0x08
            chunks.append(bytes(raw))
    if orientation != 1:
        if not chunks or chunks[0][:4] != b"VP8X":
            raise NotAContainer("a simple WebP cannot keep its EXIF orientation without re-encoding")
        exif = orientation_exif(orientation)
        chunks.append(b"EXIF" + struct.pack("<I", len(exif)) + exif + b"\x00" * (len(exif) & 1))
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body
