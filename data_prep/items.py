"""Resumable generation jobs: one output item = an image (+ mask) + its manifest row, written atomically.

Each item has a stable id derived from its parent and its index, so a rerun recognises finished work
(image and row both present) and skips it; a run killed half way leaves at most temporary files, which
are ignored and replaced. The output manifest is assembled from the per-item rows at the end, so
several processes (``accelerate launch``) can write items side by side and one assembles.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from inference.manifest import write_manifest
from inference.files import atomic_path, write_atomic


def item_id(prefix: str, parent: str, k: int) -> str:
    return f"{prefix}_{hashlib.sha1(parent.encode()).hexdigest()[:12]}_{k}"


def item_seed(seed: int, ident: str) -> int:
    """A per-item seed: the same item gets the same seed on every run, on every process."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{ident}".encode()).digest()[:4], "little") & 0x7FFFFFFF


class ItemStore:
    def __init__(self, out_dir: str | os.PathLike[str], image_format: str = "png", jpeg_quality: int = 95) -> None:
        self.root = Path(out_dir)
        self.images = self.root / "images"
        self.rows = self.root / "items"
        self.images.mkdir(parents=True, exist_ok=True)
        self.rows.mkdir(parents=True, exist_ok=True)
        self.ext = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg"}[image_format.lower()]
        self.jpeg_quality = jpeg_quality

    def done(self, ident: str) -> bool:
        """The item's row and the image it names are both on disk (the row is written last)."""
        row = self.rows / f"{ident}.json"
        if not row.is_file():
            return False
        if (self.images / f"{ident}{self.ext}").is_file():
            return True
        try:  # an item saved in another format than the store's default records its own path
            path = json.loads(row.read_text()).get("path", "")
        except (OSError, ValueError):
            return False
        return bool(path) and (self.root / path).is_file()

    def _save_image(self, img: Image.Image, path: Path, lossless: bool = False) -> None:
        with atomic_path(path, suffix=path.suffix) as tmp:
            if path.suffix == ".jpg" and not lossless:
                img.convert("RGB").save(tmp, "JPEG", quality=self.jpeg_quality)
            else:
                img.save(tmp, "PNG")

    def save(self, ident: str, image: Image.Image, row: dict[str, Any], mask: np.ndarray | Image.Image | None = None,
             image_format: str | None = None) -> None:
        """Mask first, then image, then the row: the row's presence marks the item finished.
        ``image_format`` (png/jpg) overrides the store's default for this item."""
        row = dict(row)
        ext = self.ext if image_format is None else {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg"}[image_format.lower()]
        if mask is not None:
            m = mask if isinstance(mask, Image.Image) else Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
            self._save_image(m.convert("L"), self.images / f"{ident}_mask.png", lossless=True)
            row["mask"] = f"images/{ident}_mask.png"
        self._save_image(image, self.images / f"{ident}{ext}")
        row["path"] = f"images/{ident}{ext}"
        write_atomic(self.rows / f"{ident}.json", json.dumps(row))

    def assemble(self, manifest_name: str = "manifest.csv") -> Path:
        """Write the manifest of every finished item (sorted by id), atomically."""
        rows = []
        for p in sorted(self.rows.glob("*.json")):
            if self.done(p.stem):
                rows.append(json.loads(p.read_text()))
        return write_manifest(self.root / manifest_name, rows)
