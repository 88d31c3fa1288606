"""Training data: manifest rows → a weak and a strong view of each image, decoded in DataLoader workers.

Determinism is by construction, which is what makes a killed run resume to the same weights:
the sampler's order is a function of (seed, epoch); each sample's augmentation is seeded by
(seed, epoch, position in the epoch), so it does not depend on which worker decoded it or on how many
batches were skipped on resume.

Both views end in the same resize and normalisation that inference uses (inference.preprocess), so the
model is trained on exactly the pixel pipeline it is served with. JPEG at random quality and random
rescaling reach both views: reals in the wild are mostly JPEG and large, many public fakes PNG and
small, and neither cue may be learnable.

``tiles`` experts train on one random size×size crop at native resolution (corner on a multiple of
inference.preprocess.TILE_ALIGN, the same crop for both views) and their views never rescale: resizing
would wipe out, or forge, exactly the pixel relations they learn from. The crop itself takes away the
image-size cue.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from inference.images import ImageError, load_image
from inference.preprocess import TILE_ALIGN, Preprocessor, crop_upscaled, normalise, resize_for, upscaled_size

from .config import AugmentConfig

log = logging.getLogger(__name__)


def build_views(aug: AugmentConfig, *, rescale: bool = True):
    """(weak, strong) albumentations pipelines on 8-bit RGB arrays (``rescale=False``: no RandomScale)."""
    import albumentations as A

    lo, hi = aug.rescale if rescale else (1.0, 1.0)
    scale = (lo - 1.0, hi - 1.0)
    weak = A.Compose([
        A.HorizontalFlip(p=aug.hflip_p),
        A.RandomScale(scale_limit=scale, interpolation=1, p=aug.strong_rescale_p * 0.5),
        A.ImageCompression(quality_range=aug.jpeg_quality, p=aug.weak_jpeg_p),
    ])
    strong = A.Compose([
        A.HorizontalFlip(p=aug.hflip_p),
        A.RandomScale(scale_limit=scale, interpolation=1, p=aug.strong_rescale_p),
        A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.2, 1.5), p=aug.blur_p),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, p=aug.color_p),
        A.GaussNoise(std_range=(0.01, 0.05), p=aug.noise_p),
        A.ImageCompression(quality_range=aug.jpeg_quality, p=1.0),
    ])
    return weak, strong


def sample_seed(*parts: int) -> int:
    """A stable 31-bit seed from integers (the same in every process and on every run)."""
    return zlib.crc32(np.asarray(parts, dtype=np.int64).tobytes()) & 0x7FFFFFFF


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(row_index, epoch, position)``; the order depends only on (seed, epoch).

    ``balanced``: draws real and fake rows equally often (with replacement), so a collection with
    many more fakes than reals does not teach 'say fake'. ``set_epoch`` chooses the epoch.
    """

    def __init__(self, labels: list[int], *, seed: int, balanced: bool, num_samples: int | None = None) -> None:
        self.labels = np.asarray(labels)
        self.seed, self.balanced = seed, balanced
        self.num_samples = num_samples or len(labels)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        rng = np.random.default_rng(sample_seed(self.seed, self.epoch, 7))
        if self.balanced and 0 < self.labels.sum() < len(self.labels):
            weights = np.where(self.labels == 1, 1.0 / self.labels.sum(), 1.0 / (len(self.labels) - self.labels.sum()))
            order = rng.choice(len(self.labels), size=self.num_samples, replace=True, p=weights / weights.sum())
        else:
            order = rng.permutation(len(self.labels))[: self.num_samples]
        for pos, idx in enumerate(order.tolist()):
            yield (idx, self.epoch, pos)


@dataclass
class Row:
    path: str
    label: int
    source: str
    mask: str | None = None  #: an edit fake's mask (white = changed pixels), for patch experts


def read_mask(path: str, size: tuple[int, int]) -> np.ndarray:
    """A mask file as 8-bit (0 or 255 per pixel) at ``size`` (the image as decoded, which may be at reduced
    JPEG scale): nearest-neighbour, so it stays a mask."""
    with Image.open(path) as m:
        m = m.convert("L")
        if m.size != size:
            m = m.resize(size, Image.Resampling.NEAREST)
        return np.where(np.asarray(m) > 127, 255, 0).astype(np.uint8)


class TrainDataset(torch.utils.data.Dataset):
    """Two augmented views of one manifest row; a row that cannot be decoded yields an error item."""

    def __init__(self, rows: list[Row], *, size: int, mode: str, mean, std, aug: AugmentConfig, seed: int,
                 max_pixels: int, masks: bool = False) -> None:
        """``masks``: also give each view its per-pixel fake share (``mask_weak``/``mask_strong``, size×size floats):
        the row's mask moved by the same flips, scales and crops as the image, or its label everywhere."""
        self.rows, self.size, self.mode = rows, size, mode
        self.mean, self.std = tuple(mean), tuple(std)
        self.aug, self.seed, self.max_pixels, self.masks = aug, seed, max_pixels, masks
        self._views = None

    def __len__(self) -> int:
        return len(self.rows)

    def _view(self, pipeline, arr: np.ndarray, seed: int,
              mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        pipeline.set_random_seed(seed)
        done = pipeline(image=arr) if mask is None else pipeline(image=arr, mask=mask)
        mode = "squash" if self.mode == "tiles" else self.mode  # a tile is already size×size: a no-op
        x = normalise(resize_for(Image.fromarray(done["image"]), self.size, mode), self.mean, self.std)
        if mask is None:
            return x, None
        m = np.asarray(resize_for(Image.fromarray(done["mask"]), self.size, mode), dtype=np.float32) / 255.0
        return x, torch.from_numpy(np.clip(m, 0.0, 1.0))

    def _random_tile(self, img: Image.Image, seed: int) -> tuple[int, int, int, int]:
        """One native-resolution crop's box, its corner on the TILE_ALIGN grid (seeded: same on every run)."""
        width, height = upscaled_size(img.width, img.height, self.size)  # small images: up-scaled virtually
        rng = np.random.default_rng(seed)
        x = int(rng.integers(0, (width - self.size) // TILE_ALIGN + 1)) * TILE_ALIGN
        y = int(rng.integers(0, (height - self.size) // TILE_ALIGN + 1)) * TILE_ALIGN
        return (x, y, x + self.size, y + self.size)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        idx, epoch, pos = key
        row = self.rows[idx]
        tiles = self.mode == "tiles"
        if self._views is None:  # built lazily: once per worker process
            self._views = build_views(self.aug, rescale=not tiles)
        try:
            img = load_image(row.path, max_pixels=self.max_pixels, min_size=None if tiles else self.size)
            s = sample_seed(self.seed, epoch, pos)
            mask = None
            if self.masks:  # the edit's mask, or the label everywhere
                mask = read_mask(row.mask, img.size) if row.mask else \
                    np.full((img.height, img.width), 255 * row.label, dtype=np.uint8)
            if tiles:
                box = self._random_tile(img, s + 2)
                arr = np.asarray(crop_upscaled(img, box))
                if mask is not None:
                    mask = np.asarray(crop_upscaled(Image.fromarray(mask), box))
            else:
                arr = np.asarray(img)
            weak, mask_weak = self._view(self._views[0], arr, s, mask)
            strong, mask_strong = self._view(self._views[1], arr, s + 1, mask)
            item = {"weak": weak, "strong": strong, "label": row.label, "index": idx}
            if mask is not None:
                item |= {"mask_weak": mask_weak, "mask_strong": mask_strong}
            return item
        except ImageError as exc:
            return {"error": exc.message, "index": idx}
        except Exception as exc:  # an augmentation failure on a strange image must not end the epoch
            return {"error": f"{row.path}: failed in augmentation ({exc!r})", "index": idx}


def collate_views(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the good items; pass the errors along so the loop can report skipped images."""
    good = [it for it in items if "error" not in it]
    errors = [(it["index"], it["error"]) for it in items if "error" in it]
    if not good:
        return {"weak": None, "strong": None, "label": None, "index": None, "errors": errors}
    out = {
        "weak": torch.stack([it["weak"] for it in good]),
        "strong": torch.stack([it["strong"] for it in good]),
        "label": torch.tensor([it["label"] for it in good], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
        "errors": errors,
    }
    if "mask_weak" in good[0]:
        out |= {k: torch.stack([it[k] for it in good]) for k in ("mask_weak", "mask_strong")}
    return out


class EvalDataset(torch.utils.data.Dataset):
    """Rows preprocessed exactly as the Detector does (the same Preprocessor), for validation."""

    def __init__(self, rows: list[Row], pre: Preprocessor) -> None:
        self.rows, self.pre = rows, pre
        self.key = pre.keys[0]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        try:
            return {"x": self.pre.prepare(self.rows[idx].path)[self.key], "index": idx}
        except ImageError as exc:
            return {"error": exc.message, "index": idx}


def collate_eval(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [it for it in items if "error" not in it]
    return {"x": torch.stack([it["x"] for it in good]) if good else None,
            "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
            "errors": [(it["index"], it["error"]) for it in items if "error" in it]}
