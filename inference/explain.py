"""Where an ensemble looked: per-expert and ensemble heatmaps over the image, and the pictures people read.

An expert has a map when its output is local:

- a ``patch`` expert (inference/families/patch.py) gives a fake-probability per receptive-field patch of each
  input it reads; the patch grid is stretched over the part of the image that input came from;
- a ``tiles`` expert of any family gives each crop's probability over that crop (crops that overlap average).

Whole-image experts (``squash``/``crop`` of the timm, residual and probe families) have no map: one number says
nothing about where. The ensemble's map is the weighted mean (the experts' ensemble weights) of the maps there
are, pixel by pixel; pixels no map covers are NaN (drawn untinted). A bundle with no map-capable expert gets an
:data:`UNAVAILABLE` note, never an error.

Maps are built at a working resolution (the decoded image's, long side at most ``max_side``; a patch grid is
rarely finer than 1/8 of an input) and brought to any size with :meth:`Explanation.map_at`. Patch maps are the
patches' own softmax (before the bundle's temperature, which calibrates image scores, not patches); crop maps
use the temperature, as scores do; test-time views are not applied to maps.

Rendering needs only Pillow and NumPy (the API's core dependencies): :func:`overlay_png` draws the image, the
map in a perceptually ordered colour map, a colour bar, the score and the label; :func:`map16_png` stores the
raw map as a 16-bit grey PNG (0 = not looked at, ``1 + round(p * 65534)`` for probability ``p``).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .preprocess import centre_crop_box, parse_mode, tile_boxes, upscaled_size

if TYPE_CHECKING:
    from .bundle import ExpertSpec
    from .detector import Detector, Prediction

#: The note an answer carries when a bundle has no expert that can say where.
UNAVAILABLE = ("no expert of this bundle has a map: only patch experts (family patch) and tiled experts "
               "(preprocess tiles) say where")
MAX_SIDE = 1024  #: default working resolution of the maps (long side, pixels)

Box = tuple[float, float, float, float]


@dataclass
class Explanation:
    """One image's verdict and where it came from. ``maps``/``ensemble`` are ``float32`` arrays ``(h, w)`` at the
    working resolution, NaN where the expert (the ensemble: every expert) did not look."""

    prediction: "Prediction"
    image_size: tuple[int, int]                       #: (width, height) of the image as decoded
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    ensemble: np.ndarray | None = None
    unavailable: str | None = None                    #: why there is no map (then ``ensemble`` is None)
    image: Image.Image | None = field(default=None, repr=False)  #: the decoded image, for :func:`overlay`

    def map_at(self, size: tuple[int, int], which: str | None = None) -> np.ndarray:
        """The ensemble's map (or expert ``which``'s) resized to ``size`` = (width, height), bilinear; NaN kept."""
        m = self.ensemble if which is None else self.maps[which]
        if m is None:
            raise ValueError(self.unavailable or "no map")
        if (m.shape[1], m.shape[0]) == tuple(size):
            return m
        known = np.isfinite(m)
        if known.all():  # one resize; NaN bookkeeping only where some pixels were not looked at
            return np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
        value = Image.fromarray(np.where(known, m, 0).astype(np.float32), mode="F").resize(size, Image.BILINEAR)
        weight = Image.fromarray(known.astype(np.float32), mode="F").resize(size, Image.BILINEAR)
        v, w = np.asarray(value), np.asarray(weight)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(w > 0.5, v / np.maximum(w, 1e-6), np.nan).astype(np.float32)


def has_map(e: "ExpertSpec") -> bool:
    """Whether expert ``e`` says where: its family maps each input (patches), or it reads tiles."""
    from .families import get as family_of

    return family_of(e.family).has_map(e) or e.preprocess == "tiles"


def input_boxes(width: int, height: int, e: "ExpertSpec") -> list[Box]:
    """Where each input tensor of expert ``e`` came from, as (left, top, right, bottom) in the pixels of an image
    of ``width``×``height`` (one box for ``squash``/``crop``, one per crop for ``tiles``); mirrors
    inference.preprocess exactly."""
    mode, crops = parse_mode(e.preprocess_key[1])
    size = e.input_size
    if mode == "squash":
        return [(0.0, 0.0, float(width), float(height))]
    if mode == "crop":
        return [centre_crop_box(width, height, size)]
    vw, vh = upscaled_size(width, height, size)
    sx, sy = width / vw, height / vh
    return [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in tile_boxes(vw, vh, size, crops)]


def _paint(shape: tuple[int, int], scale: float, boxes: Sequence[Box], values: Sequence[np.ndarray]) -> np.ndarray:
    """Average of ``values`` (one 2-D grid per box) stretched over their boxes, on an ``(h, w)`` canvas whose
    pixel is ``scale`` image pixels; NaN where no box falls."""
    total = np.zeros(shape, dtype=np.float32)
    count = np.zeros(shape, dtype=np.float32)
    for (x0, y0, x1, y1), grid in zip(boxes, values):
        # Every box covers at least one canvas pixel inside the canvas, however thin the image or the box (a
        # 64000×1 image's last crops start at its right edge once scaled down).
        l, t = min(shape[1] - 1, int(round(x0 / scale))), min(shape[0] - 1, int(round(y0 / scale)))
        r, b = min(shape[1], max(l + 1, int(round(x1 / scale)))), min(shape[0], max(t + 1, int(round(y1 / scale))))
        patch = Image.fromarray(np.asarray(grid, dtype=np.float32), mode="F").resize((r - l, b - t), Image.BILINEAR)
        total[t:b, l:r] += np.asarray(patch)
        count[t:b, l:r] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


@torch.inference_mode()
def expert_grids(model: torch.nn.Module, e: "ExpertSpec", x: torch.Tensor) -> list[np.ndarray]:
    """One probability grid per input of one image: ``x`` is ``(3, S, S)`` or ``(K, 3, S, S)`` (tiles), as the
    expert's family draws it (a patch expert its patch grid, others a 1×1 grid: the crop's probability)."""
    from .families import get as family_of

    batch = x if x.dim() == 4 else x[None]
    return list(family_of(e.family).map_probs(model, e, batch).cpu().numpy())


def explain_prepared(det: "Detector", img_size: tuple[int, int], item: dict, prediction: "Prediction",
                     max_side: int = MAX_SIDE) -> Explanation:
    """The maps of one already prepared image (``item`` from ``det.preprocessor.transform``) whose decoded
    size is ``img_size``; ``prediction`` is its score (so the maps go with exactly the score predict gives)."""
    width, height = img_size
    scale = max(1.0, max(width, height) / max_side)
    shape = (max(1, round(height / scale)), max(1, round(width / scale)))
    maps: dict[str, np.ndarray] = {}
    for e in det.spec.experts:
        if not has_map(e) or e.reads != "image":  # a face expert's score is in the boxes drawn, not in the map
            continue
        x = item[e.preprocess_key].to(det.device)
        with det._autocast():
            grids = expert_grids(det.models[e.name], e, x)
        maps[e.name] = _paint(shape, scale, input_boxes(width, height, e), grids)
    if not maps:
        return Explanation(prediction, img_size, unavailable=UNAVAILABLE)
    weights = {e.name: e.weight for e in det.spec.experts if e.name in maps}
    num = np.zeros(shape, dtype=np.float64)
    den = np.zeros(shape, dtype=np.float64)
    for name, m in maps.items():
        known = np.isfinite(m)
        num += np.where(known, m, 0) * weights[name]
        den += known * weights[name]
    with np.errstate(invalid="ignore", divide="ignore"):
        ensemble = np.where(den > 0, num / np.maximum(den, 1e-12), np.nan).astype(np.float32)
    return Explanation(prediction, img_size, maps, ensemble)


# -- pictures -------------------------------------------------------------------------------------------------

# Matplotlib's "inferno" (perceptually ordered, readable in grey and by most colour-blind readers), sampled at
# nine evenly spaced points; linear interpolation between them is within a few levels of the original.
_ANCHORS = np.array([[0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85],
                     [227, 89, 51], [249, 140, 10], [249, 201, 50], [252, 255, 164]], dtype=np.float32)
COLOURS = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c])
                    for c in range(3)], axis=1).astype(np.uint8)  #: the 256-entry colour map (RGB)


def colourise(m: np.ndarray) -> np.ndarray:
    """``(h, w)`` map in [0, 1] (NaN allowed) → ``(h, w, 3)`` uint8 colours (NaN → black)."""
    idx = np.clip(np.nan_to_num(m, nan=0.0) * 255 + 0.5, 0, 255).astype(np.uint8)
    return COLOURS[idx]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def overlay(img: Image.Image | None, expl: Explanation, *, label: str, threshold: float, max_side: int = 1024,
            alpha: float = 0.55, boxes: Sequence[tuple[Sequence[float], float]] = ()) -> Image.Image:
    """The picture a person reads: the image (long side at most ``max_side``) tinted by the ensemble's map where
    it has one, a title line (score, label, threshold), and a colour bar from 0 (real) to 1 (fake).
    ``boxes``: optional ((left, top, right, bottom) in decoded-image pixels, score) pairs, e.g. faces. ``img``
    None: the image the explanation kept."""
    img = img if img is not None else expl.image
    if img is None:
        raise ValueError("overlay needs the image (Detector.explain keeps it on the explanation)")
    scale = min(1.0, max_side / max(img.size))
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    base = np.asarray(img.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.float32)
    if expl.ensemble is not None:
        m = expl.map_at((w, h))
        known = np.isfinite(m)[..., None]
        tinted = base * (1 - alpha) + colourise(m).astype(np.float32) * alpha
        base = np.where(known, tinted, base * 0.6)  # where nothing looked: dimmed, untinted
    pic = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    for box, score in boxes:
        colour = tuple(int(c) for c in COLOURS[int(np.clip(score, 0, 1) * 255)])
        draw.rectangle([v * scale for v in box], outline=colour, width=max(2, w // 300))

    fs = max(12, min(28, w // 40))
    font, small = _font(fs), _font(max(10, fs * 3 // 4))
    head, bar_w = fs * 2, max(60, fs * 4)
    canvas = Image.new("RGB", (w + bar_w, h + head), (255, 255, 255))
    canvas.paste(pic, (0, head))
    d = ImageDraw.Draw(canvas)
    score = expl.prediction.score
    title = f"{label.upper()}  fake-probability {score:.3f}  (threshold {threshold:.3f})"
    if expl.ensemble is None:
        title += "  - no map"
    d.text((6, head // 4), title, fill=(0, 0, 0), font=font)
    top, bottom = head + fs, head + h - fs
    if bottom - top >= 8:
        ramp = COLOURS[::-1][np.linspace(0, 255, bottom - top).astype(int)]
        col = np.repeat(ramp[:, None, :], max(8, bar_w // 4), axis=1)
        x0 = 8
        canvas.paste(Image.fromarray(col), (w + x0, top))
        for v, y in ((1.0, top), (0.5, (top + bottom) // 2), (0.0, bottom)):
            d.text((w + x0 + col.shape[1] + 4, y - fs // 2), f"{v:.1f}", fill=(0, 0, 0), font=small)
        d.text((w + x0, top - fs), "fake", fill=(0, 0, 0), font=small)
        d.text((w + x0, bottom + 2), "real", fill=(0, 0, 0), font=small)
    return canvas


def map_layer(expl: Explanation, max_side: int = 1024) -> Image.Image | None:
    """The ensemble's map alone, coloured (:data:`COLOURS`), at the size :func:`overlay` draws the image (long side
    at most ``max_side``): opaque where an expert looked, transparent elsewhere. For viewers that lay it over the
    image themselves, at an opacity the reader picks; None when no expert draws a map."""
    if expl.ensemble is None:
        return None
    iw, ih = expl.image.size if expl.image is not None else expl.image_size
    scale = min(1.0, max_side / max(iw, ih))
    w, h = max(1, round(iw * scale)), max(1, round(ih * scale))
    m = expl.map_at((w, h))
    alpha = np.where(np.isfinite(m), 255, 0).astype(np.uint8)[..., None]
    return Image.fromarray(np.concatenate([colourise(m), alpha], axis=2), mode="RGBA")


#: the colour map's anchors as CSS colours, 0 (real) to 1 (fake): what a viewer's colour scale is drawn from
COLOUR_STOPS = ["#%02x%02x%02x" % tuple(int(v) for v in c) for c in _ANCHORS]


def original_size(src) -> tuple[int, int] | None:
    """(width, height) of an image file (path or stream) as a viewer shows it (EXIF rotation applied), read from
    its header only; None when it cannot be read (the detector's own decoding reports why)."""
    try:
        with Image.open(src) as im:
            w, h = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
                w, h = h, w
            return w, h
    except Exception:
        return None


def png_bytes(img: Image.Image, compress_level: int = 6) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def map16(m: np.ndarray) -> Image.Image:
    """A map as a 16-bit grey image: 0 where nothing looked, ``1 + round(p * 65534)`` for probability ``p``."""
    v = np.clip(m, 0, 1, dtype=np.float32)
    v *= 65534
    v += 1.5  # 1 + round(p * 65534)
    v[~np.isfinite(m)] = 0
    return Image.fromarray(v.astype(np.uint16))  # mode "I;16"


def read_map16(path_or_bytes) -> np.ndarray:
    """The inverse of :func:`map16`: probabilities as float32, NaN where nothing looked."""
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
    with Image.open(src) as im:
        v = np.asarray(im).astype(np.float32)
    return np.where(v > 0, (v - 1) / 65534, np.nan).astype(np.float32)
