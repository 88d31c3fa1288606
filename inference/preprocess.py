"""Turn a decoded image into the tensors an ensemble's experts read.

One :class:`Preprocessor` serves a whole ensemble: it decodes each image once (at reduced JPEG scale
when the largest input size allows), resizes once per distinct (size, mode) and normalises once per
distinct (size, mode, mean, std). Resizing happens on 8-bit pixels *before* normalising, which is
both faster and what the training pipeline does.

``tiles`` is the exception to resizing: it cuts a g×g grid of size×size crops from the image at its
native resolution (decoded in full, never at reduced JPEG scale), because the pixel-level traces a
generator leaves die when a 4 MP photo is squashed to 224 px. Crop corners sit on multiples of
:data:`TILE_ALIGN` pixels, so every crop keeps the image's 8-pixel grid phase (JPEG blocks, the ×8
up-sampling of latent diffusion decoders); only an image smaller than a crop is up-scaled (its short side
up to ``size``, virtually: each crop is resampled from its own source region). The expert scores every crop and its probabilities are averaged.

Preprocessors are plain picklable objects, so the same code runs in DataLoader workers and in the
request thread of the API: a score never depends on where an image was decoded.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from PIL import Image

from .images import DEFAULT_MAX_PIXELS, Source, load_image_scaled

PreprocessKey = tuple[int, str, tuple[float, ...], tuple[float, ...]]
TILE_ALIGN = 8


def mode_key(preprocess: str, crops: int = 1) -> str:
    """The mode part of a preprocessing key: the mode itself, ``tiles:<crops>`` for tiles (the inverse of
    :func:`parse_mode`)."""
    return f"tiles:{crops}" if preprocess == "tiles" else preprocess


def parse_mode(mode: str) -> tuple[str, int]:
    """A preprocessing key's mode part → (mode, crops): ``squash`` → (squash, 1), ``tiles:9`` → (tiles, 9)."""
    name, _, n = mode.partition(":")
    return name, int(n) if n else 1


def upscaled_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The size an image has once its short side is brought up to ``size`` (unchanged when it already is).
    Only a virtual size: :func:`crop_upscaled` reads crops of that image without ever making it."""
    if min(width, height) >= size:
        return width, height
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def crop_upscaled(img: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The ``box`` crop of ``img`` up-scaled (bicubic) to :func:`upscaled_size`, resampled from its own
    source region only. The up-scaled image is never allocated: a 193-byte 1×58000 PNG would otherwise
    become a 224×13-million-pixel image (2.3 GB) before its crops were cut. Memory is the crop's."""
    left, top, right, bottom = box
    width, height = img.size
    crop_w, crop_h = right - left, bottom - top
    short = min(width, height)
    if short >= max(crop_w, crop_h) or (crop_w, crop_h) == (0, 0):
        return img.crop(box)
    vw, vh = upscaled_size(width, height, max(crop_w, crop_h))
    sx, sy = width / vw, height / vh
    return img.resize((crop_w, crop_h), Image.Resampling.BICUBIC,
                      box=(left * sx, top * sy, right * sx, bottom * sy))


def _grid_offsets(length: int, size: int, g: int) -> list[int]:
    """``g`` crop starts evenly spread over ``[0, length - size]``, floored to multiples of TILE_ALIGN."""
    span = length - size
    if g == 1:
        starts = [span // 2]
    else:
        starts = [round(i * span / (g - 1)) for i in range(g)]
    return [s - s % TILE_ALIGN for s in starts]


def tile_boxes(width: int, height: int, size: int, crops: int) -> list[tuple[int, int, int, int]]:
    """The (left, top, right, bottom) boxes of ``crops`` (a square number) native-resolution crops,
    row by row; the image must be at least size×size (see :func:`upscaled_size`)."""
    g = int(round(crops ** 0.5))
    if g * g != crops or g < 1:
        raise ValueError(f"crops must be a square number (1, 4, 9, ...), got {crops}")
    if min(width, height) < size:
        raise ValueError(f"image {width}x{height} is smaller than a {size}px crop")
    return [(x, y, x + size, y + size) for y in _grid_offsets(height, size, g) for x in _grid_offsets(width, size, g)]


def tiles_for(img: Image.Image, size: int, crops: int) -> list[Image.Image]:
    """The ``crops`` native-resolution crops of ``img`` that a tiled expert scores. An image smaller than a
    crop is up-scaled (short side to ``size``) virtually: each crop is resampled from its own region, so the
    memory used is the crops', whatever the image's aspect ratio."""
    vw, vh = upscaled_size(img.width, img.height, size)
    return [crop_upscaled(img, box) if (vw, vh) != img.size else img.crop(box)
            for box in tile_boxes(vw, vh, size, crops)]


def centre_crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The source region, in the image's pixels, of ``crop`` mode's centred size×size crop of the image scaled
    to short side ``size`` (also where a heatmap of that crop belongs: inference/explain.py)."""
    scale = size / min(width, height)
    nw, nh = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    sx, sy = width / nw, height / nh
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def resize_for(img: Image.Image, size: int, mode: str) -> Image.Image:
    """``squash``: the whole image to size×size (aspect ratio not kept, as the winning recipe does);
    ``crop``: shorter side to ``size`` then a centred size×size crop."""
    if mode == "squash":
        if img.size == (size, size):
            return img
        return img.resize((size, size), Image.Resampling.BICUBIC)
    if mode == "crop":
        # The centred crop of the image scaled to short side ``size``, resampled from its source region
        # only: a 1×58000 image never becomes a 224×13-million one on the way.
        box = centre_crop_box(img.width, img.height, size)
        if min(img.size) == size:  # already at scale: an exact crop, no resampling
            return img.crop(tuple(int(v) for v in box))
        return img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    raise ValueError(f"unknown preprocess mode '{mode}'")


def normalise(img: Image.Image, mean: Iterable[float], std: Iterable[float]) -> torch.Tensor:
    """8-bit RGB → float32 CHW tensor, ``(x/255 - mean) / std``."""
    arr = np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)
    arr = (arr - np.asarray(tuple(mean), dtype=np.float32)) / np.asarray(tuple(std), dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class FaceInputs(dict):
    """A face crop's inputs (key → tensor, as :meth:`Preprocessor.transform` makes them), marked as a face's: in
    a bundle with experts that read faces, only those score it, and only the other experts score a whole image."""


class Preprocessor:
    """Decode + resize + normalise for a set of preprocessing keys (see module docstring).

    ``face_keys`` and ``finder`` (a bundle with experts that read faces): the keys of those experts, and the
    :class:`inference.faces.FaceFinder` every image is searched with (inference/pipeline.py ``decode``)."""

    def __init__(self, keys: Iterable[PreprocessKey], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 face_keys: Iterable[PreprocessKey] = (), finder: object | None = None) -> None:
        self.keys: tuple[PreprocessKey, ...] = tuple(sorted(set(keys)))
        if not self.keys:
            raise ValueError("a Preprocessor needs at least one key")
        self.face_keys: tuple[PreprocessKey, ...] = tuple(sorted(set(face_keys)))
        self.finder = finder
        self.max_pixels = int(max_pixels)
        # Tiled experts read native pixels: no reduced-scale JPEG decoding when one is present.
        tiled = any(parse_mode(k[1])[0] == "tiles" for k in self.keys)
        self.min_decode_size: int | None = None if tiled else max(k[0] for k in self.keys)

    def load(self, src: Source, name: str | None = None) -> Image.Image:
        """Decode ``src`` to RGB, at reduced JPEG scale when the experts' sizes allow."""
        return self.load_scaled(src, name=name)[0]

    def load_scaled(self, src: Source, name: str | None = None) -> tuple[Image.Image, tuple[int, int]]:
        """:meth:`load`, and the size of the image in full (for a face search that can read the same decode)."""
        return load_image_scaled(src, max_pixels=self.max_pixels, min_size=self.min_decode_size, name=name)

    def transform_face(self, crop: Image.Image) -> dict[PreprocessKey, torch.Tensor]:
        """A face crop → its inputs: for the experts that read faces (:class:`FaceInputs`) when the bundle has
        them, else for every expert (``--faces`` on a bundle without face experts: each expert scores each face)."""
        return FaceInputs(self.transform(crop, self.face_keys)) if self.face_keys else self.transform(crop)

    def transform(self, img: Image.Image, keys: tuple[PreprocessKey, ...] | None = None) -> dict[PreprocessKey, torch.Tensor]:
        """RGB image → one normalised tensor per key (default: :attr:`keys`), sharing resizes between keys:
        ``(3, S, S)``, or ``(crops, 3, S, S)`` for a ``tiles`` key."""
        resized: dict[tuple[int, str], Image.Image | list[Image.Image]] = {}
        out: dict[PreprocessKey, torch.Tensor] = {}
        for key in self.keys if keys is None else keys:
            size, mode, mean, std = key
            if (size, mode) not in resized:
                name, crops = parse_mode(mode)
                resized[(size, mode)] = tiles_for(img, size, crops) if name == "tiles" else resize_for(img, size, mode)
            done = resized[(size, mode)]
            if isinstance(done, list):
                out[key] = torch.stack([normalise(t, mean, std) for t in done])
            else:
                out[key] = normalise(done, mean, std)
        return out

    def prepare(self, src: Source | Image.Image, name: str | None = None) -> dict[PreprocessKey, torch.Tensor]:
        """``load`` then ``transform``; an already decoded ``PIL.Image`` is converted to RGB first."""
        if isinstance(src, Image.Image):
            img = src if src.mode == "RGB" else src.convert("RGB")
        else:
            img = self.load(src, name=name)
        return self.transform(img)
