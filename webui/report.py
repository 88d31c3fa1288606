"""The pictures the site draws: faces boxed on the image, and the downloadable PNG report."""

from __future__ import annotations

import base64
import io
from datetime import datetime, timezone
from typing import Any

from .client import MAX_EXPERTS


COLOURS = {"fake": (176, 0, 32), "real": (0, 110, 55), "uncertain": (150, 90, 0)}


def faces_image(data: bytes, faces: list[dict[str, Any]], max_side: int = 720) -> bytes | None:
    """The image with each face's box drawn in its verdict's colour and numbered, as PNG (None when Pillow
    cannot read the image). Boxes are in the pixels of the image as shown (EXIF rotation applied)."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as src:
            img = ImageOps.exif_transpose(src).convert("RGB")
    except Exception:
        return None
    scale = min(1.0, max_side / max(img.size))
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=16)
    width = max(2, round(max(img.size) / 200))
    for k, f in enumerate(faces, start=1):
        x1, y1, x2, y2 = (v * scale for v in f["box"])
        colour = COLOURS.get(f["label"], (0, 0, 0))
        d.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        tag = f"{k}: {f['score']:.2f}"
        d.rectangle([x1, max(0, y1 - 20), x1 + 8 + 9 * len(tag), max(0, y1 - 20) + 20], fill=colour)
        d.text((x1 + 4, max(0, y1 - 20) + 1), tag, font=font, fill=(255, 255, 255))
    out = io.BytesIO()
    img.save(out, "PNG", optimize=True)
    return out.getvalue()


def _png_image(url: Any, mode: str) -> Any:
    """A PNG data URL from the API (already checked by :func:`clean_result`) as an image in ``mode``, or None
    when there is none or it does not decode as a PNG of at most 4 MP."""
    from PIL import Image

    if not (isinstance(url, str) and url.startswith("data:image/png;base64,")):
        return None
    try:
        with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1], validate=True))) as src:
            if src.format != "PNG" or src.width * src.height > 4_000_000:
                return None
            return src.convert(mode)
    except Exception:  # noqa: BLE001 - an answer the site cannot use: it goes without it
        return None


def _heatmap_image(url: Any, max_side: int) -> Any:
    """The API's composed heatmap picture, at most ``max_side`` wide, or None."""
    img = _png_image(url, "RGB")
    if img is not None and img.width > max_side:
        img = img.resize((max_side, max(1, round(img.height * max_side / img.width))))
    return img


def layer_image(url: Any) -> Any:
    """The API's map layer (an RGBA PNG data URL) as an image, or None."""
    return _png_image(url, "RGBA")


def overlay_image(picture: Any, layer_url: Any, max_side: int, opacity: float = 0.55) -> Any:
    """``picture`` (the image as shown, e.g. :func:`thumbnail`) at most ``max_side`` on its long side, with the
    map layer laid over it at ``opacity``, as the page shows it; None without a picture or a layer."""
    from PIL import Image

    layer = layer_image(layer_url)
    if layer is None or picture is None:
        return None
    base = picture.copy()
    base.thumbnail((max_side, max_side))
    base = base.convert("RGBA")
    layer = layer.resize(base.size, Image.BILINEAR)
    layer.putalpha(layer.getchannel("A").point(lambda a: int(a * opacity)))
    return Image.alpha_composite(base, layer).convert("RGB")


def shown_size(data: bytes) -> tuple[int, int]:
    """(width, height) of the image as shown (EXIF rotation applied), from its header."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as src:
        w, h = src.size
        return (h, w) if src.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)


def thumbnail(data: bytes, side: int = 360) -> Any:
    """The image as shown (EXIF rotation applied) in RGB, its long side at most ``side``; raises when Pillow
    cannot read it. High-bit-depth images (16-bit, float) are scaled to 8 bits first; a plain ``convert("RGB")``
    clips them to white."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as src:
        src.seek(0)
        img = ImageOps.exif_transpose(src)
        img.thumbnail((side, side))
        if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            hi = img.getextrema()[1] if img.mode == "I" else 65535
            img = img.convert("I").point(lambda v: v * (255 / 65535) if hi > 255 else v).convert("L")
        elif img.mode == "F":
            hi = img.getextrema()[1]
            img = img.point(lambda v: v * 255 if hi <= 1.0 else v).convert("L")
        return img.convert("RGB")


def provenance_lines(prov: Any, label_by: Any = None, width: int = 110) -> list[str]:
    """The report's lines for what the file says about itself (webui/client.clean_provenance's form)."""
    import textwrap

    if not isinstance(prov, dict):
        return []
    lines = [f"What the file says about itself: it {prov.get('says', 'says nothing about its origin')}"]
    if prov.get("signed"):
        lines.append(f"C2PA: signed by {prov.get('signer') or '?'}, {'valid' if prov.get('valid') else 'NOT VALID'}, "
                     f"{'trusted signer' if prov.get('trusted') else 'signer not trusted (a claim)'}")
    for f in prov.get("evidence", []):
        lines += textwrap.wrap(f"- {f['fact']} ({f['source']}, {'signed' if f['signed'] else 'unsigned'})", width)
    for u in prov.get("unreadable", []):
        lines += textwrap.wrap(f"- not read: {u}", width)
    if label_by == "provenance":
        lines.append("The label comes from this evidence (the service's trusted_c2pa rule), not from the pixels.")
    lines.append("Metadata is easily removed or forged: absence proves nothing; a signature proves who signed.")
    return lines


def _draw_scale(d: Any, x: int, y: int, score: float, threshold: float, band: tuple[float, float], colour: Any,
                font: Any, width: int = 440) -> None:
    """The verdict's scale, as the page draws it: the uncertain band shaded, the threshold a tick, the score a dot."""
    lo, hi = band
    d.rectangle([x, y, x + width, y + 20], fill=(223, 227, 234))
    if hi > lo:
        d.rectangle([x + int(width * lo), y, x + int(width * hi), y + 20], fill=(243, 210, 154))
    d.line([x + int(width * threshold), y - 8, x + int(width * threshold), y + 28], fill=(20, 20, 20), width=3)
    cx = x + int(width * score)
    d.ellipse([cx - 9, y + 1, cx + 9, y + 19], fill=colour, outline=(255, 255, 255))
    d.text((x, y + 30), "0 real" + (f"   shaded: uncertain ({lo:.3f} to {hi:.3f})" if hi > lo else ""),
           font=font, fill=(90, 90, 90))
    d.text((x + width, y + 30), "1 fake", font=font, fill=(90, 90, 90), anchor="ra")


def _draw_ramp(d: Any, x: int, y: int, stops: list[str], threshold: float, font: Any, width: int = 300) -> None:
    """The map's colour scale, 0 (real) to 1 (fake), with the threshold, its bottom edge at ``y``."""
    rgb = [tuple(int(c[k:k + 2], 16) for k in (1, 3, 5)) for c in stops]
    for xx in range(width):
        f = xx / (width - 1) * (len(rgb) - 1)
        a, b, w = rgb[int(f)], rgb[min(len(rgb) - 1, int(f) + 1)], f - int(f)
        d.line([x + xx, y - 12, x + xx, y], fill=tuple(round(p * (1 - w) + q * w) for p, q in zip(a, b)))
    d.line([x + int((width - 1) * threshold), y - 16, x + int((width - 1) * threshold), y + 2], fill=(20, 20, 20),
           width=2)
    d.text((x + width + 10, y - 16), "colour: 0 real to 1 fake; tick: threshold", font=font, fill=(90, 90, 90))


def render_report(data: bytes, result: dict[str, Any], sha256: str, filename: str, picture: Any = None) -> bytes:
    """A one-page PNG report: thumbnail, verdict, the score on its scale (threshold, uncertain band, how they were
    chosen), experts with what each reads, faces, the file's evidence about itself, heatmap, model, date and
    SHA-256. ``result``: the page's result (webui/results.check_one); ``picture``: the image as shown, already
    decoded by the caller (default: decoded here)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    W, pad = 900, 32
    font = ImageFont.load_default(size=18)
    big = ImageFont.load_default(size=34)
    small = ImageFont.load_default(size=15)
    if picture is None:
        try:
            picture = thumbnail(data, 1024)
        except Exception:  # the API read it; if Pillow cannot, the report goes without pictures of it
            picture = None
    thumb = None
    if picture is not None:
        thumb = picture.copy()
        thumb.thumbnail((360, 360))
    experts = dict(list(result.get("experts", {}).items())[:MAX_EXPERTS])
    described = {e["name"]: e.get("description") for e in result.get("experts_info") or []}
    notes = {n: textwrap.wrap(described[n], 62)[:3] for n in experts if described.get(n)}
    threshold = float(result.get("threshold", 0.5))
    lo, hi = (float(v) for v in (result.get("band") or [threshold, threshold])[:2])
    rule = textwrap.wrap(f"How the threshold was chosen: {result['threshold_rule']}", 62)[:3] \
        if result.get("threshold_rule") else []
    faces = result.get("faces") or []
    if faces and thumb is not None:  # the boxes, drawn on the thumbnail as on the page
        sx = thumb.width / shown_size(data)[0]
        td = ImageDraw.Draw(thumb)
        for k, f in enumerate(faces, start=1):
            td.rectangle([v * sx for v in f["box"]], outline=COLOURS.get(f["label"], (0, 0, 0)), width=3)
            td.text((f["box"][0] * sx + 3, f["box"][1] * sx + 2), str(k), fill=COLOURS.get(f["label"], (0, 0, 0)))
    heat = overlay_image(picture, result.get("heatmap_layer"), max_side=W - 2 * pad) \
        or _heatmap_image(result.get("heatmap"), max_side=W - 2 * pad)
    prov_lines = provenance_lines(result.get("provenance"), result.get("label_by"))
    H = (800 + 28 * len(experts) + 20 * sum(map(len, notes.values())) + 20 * len(rule) + 24 * len(faces)
         + (heat.height + 60 if heat is not None else 0) + 22 * len(prov_lines) + 40)
    page = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(page)
    label = result.get("label", "uncertain")
    d.text((pad, pad), "deepfake-experts report", font=font, fill=(40, 40, 40))
    if thumb is not None:
        page.paste(thumb, (pad, pad + 40))
    x = pad + 380
    d.text((x, pad + 36), str(label).upper(), font=big, fill=COLOURS.get(label, (0, 0, 0)))
    d.text((x, pad + 80), {"fake": "Likely generated or manipulated", "real": "Likely a real photograph",
                           "uncertain": "The detector is not sure"}.get(label, ""), font=font, fill=(20, 20, 20))
    score = float(result.get("score", result.get("result", 0.0)))
    d.text((x, pad + 110), f"fake probability {score:.3f} (threshold {threshold:.3f})", font=font, fill=(20, 20, 20))
    _draw_scale(d, x, pad + 140, score, threshold, (lo, hi), COLOURS.get(label, (0, 0, 0)), small)
    y = pad + 192
    for line in rule:
        d.text((x, y), line, font=small, fill=(90, 90, 90))
        y += 20
    y += 12
    d.text((x, y), "experts", font=font, fill=(40, 40, 40))
    for name, p in experts.items():
        y += 28
        d.text((x, y), f"{name}: {float(p):.3f}", font=small, fill=(40, 40, 40))
        for line in notes.get(name, []):
            y += 20
            d.text((x + 12, y), line, font=small, fill=(100, 100, 100))
    if result.get("faces") is not None:
        y += 40
        d.text((x, y), f"faces: {len(faces)}" + (" (none found: scored whole)" if not faces else
                                                  f" (score = max of whole image "
                                                  f"{float(result.get('whole_score', score)):.3f} and faces)"),
               font=small, fill=(40, 40, 40))
        for k, f in enumerate(faces, start=1):
            y += 24
            d.text((x, y), f"face {k}: {f['score']:.3f} {f['label']}  box {', '.join(str(round(v)) for v in f['box'])}",
                   font=small, fill=COLOURS.get(f["label"], (40, 40, 40)))
    y = max(y + 40, pad + 420)
    if prov_lines:  # what the file says about itself, beside (never inside) the model's verdict
        for k, line in enumerate(prov_lines):
            d.text((pad, y), line, font=font if k == 0 else small, fill=(40, 40, 40))
            y += 26 if k == 0 else 22
        y += 18
    if heat is not None:  # where the detector looked, as the page shows it
        d.text((pad, y), "where the detector looked (tint: fake-probability of each region)", font=small,
               fill=(40, 40, 40))
        page.paste(heat, (pad, y + 24))
        y += heat.height + 48
        if len(result.get("heatmap_colours") or []) >= 2:
            _draw_ramp(d, pad, y, result["heatmap_colours"], threshold, small)
            y += 24
    for line in (f"file: {filename}", f"SHA-256: {sha256}", f"model: {result.get('model', '?')}",
                 f"date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}",
                 "A score is a model's estimate, not proof. Detectors miss generators they never saw."):
        d.text((pad, y), line, font=small, fill=(60, 60, 60))
        y += 24
    out = io.BytesIO()
    page.crop((0, 0, W, min(H, y + pad))).save(out, "PNG", optimize=True)  # y: below the last line
    return out.getvalue()
