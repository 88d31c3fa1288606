"""Turn a decoded image into the tensors an ensemble's experts read.

One :class:`Preprocessor` serves a whole ensemble: it decodes each image once (at reduced JPEG scale
when the largest input size allows), resizes once per distinct (size, mode) and normalises once per
distinct (size, mode, mean, std). Resizing happens on 8-bit pixels *before* normalising, which is
both faster and what the training pipeline does. Preprocessors are plain picklable objects, so the
same code runs in DataLoader workers and in the request thread of the API: a score never depends on
where an image was decoded.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from PIL import Image

from .images import DEFAULT_MAX_PIXELS, Source, load_image

PreprocessKey = tuple[int, str, tuple[float, ...], tuple[float, ...]]


def resize_for(img: Image.Image, size: int, mode: str) -> Image.Image:
    """``squash``: the whole image to size×size (aspect ratio not kept, as the winning recipe does);
    ``crop``: shorter side to ``size`` then a centred size×size crop."""
    if mode == "squash":
        if img.size == (size, size):
            return img
        return img.resize((size, size), Image.Resampling.BICUBIC)
    if mode == "crop":
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        return img.crop((left, top, left + size, top + size))
    raise ValueError(f"unknown preprocess mode '{mode}'")


def normalise(img: Image.Image, mean: Iterable[float], std: Iterable[float]) -> torch.Tensor:
    """8-bit RGB → float32 CHW tensor, ``(x/255 - mean) / std``."""
    arr = np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)
    arr = (arr - np.asarray(tuple(mean), dtype=np.float32)) / np.asarray(tuple(std), dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class Preprocessor:
    """Decode + resize + normalise for a set of preprocessing keys (see module docstring)."""

    def __init__(self, keys: Iterable[PreprocessKey], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.keys: tuple[PreprocessKey, ...] = tuple(sorted(set(keys)))
        if not self.keys:
            raise ValueError("a Preprocessor needs at least one key")
        self.max_pixels = int(max_pixels)
        self.min_decode_size = max(k[0] for k in self.keys)

    def load(self, src: Source, name: str | None = None) -> Image.Image:
        """Decode ``src`` to RGB, at reduced JPEG scale when the experts' sizes allow."""
        return load_image(src, max_pixels=self.max_pixels, min_size=self.min_decode_size, name=name)

    def transform(self, img: Image.Image) -> dict[PreprocessKey, torch.Tensor]:
        """RGB image → one normalised tensor per key, sharing resizes between keys."""
        resized: dict[tuple[int, str], Image.Image] = {}
        out: dict[PreprocessKey, torch.Tensor] = {}
        for key in self.keys:
            size, mode, mean, std = key
            if (size, mode) not in resized:
                resized[(size, mode)] = resize_for(img, size, mode)
            out[key] = normalise(resized[(size, mode)], mean, std)
        return out

    def prepare(self, src: Source | Image.Image, name: str | None = None) -> dict[PreprocessKey, torch.Tensor]:
        """``load`` then ``transform``; an already decoded ``PIL.Image`` is converted to RGB first."""
        if isinstance(src, Image.Image):
            img = src if src.mode == "RGB" else src.convert("RGB")
        else:
            img = self.load(src, name=name)
        return self.transform(img)
