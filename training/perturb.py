"""Everyday image processing, as a detector meets it: re-encoding, resizing, cropping, blur, noise,
screenshots and social-media uploads. ``dfx evaluate --perturb`` scores a manifest under each one.

A spec is ``NAME`` or ``NAME:VALUE``:

==============  =====================================================================================
``none``        the file as it is (the identity: must flip nothing)
``jpeg:Q``      re-encoded as JPEG at quality Q (Pillow's default 4:2:0 chroma subsampling)
``webp:Q``      re-encoded as lossy WebP at quality Q
``resize:F``    both sides scaled by F (antialiased Lanczos), e.g. 0.5 halves them
``crop:F``      the centred crop keeping F of each side
``blur:S``      Gaussian blur with standard deviation S pixels
``noise:S``     additive Gaussian noise, standard deviation S in 8-bit levels, clipped to 0..255
``screenshot``  re-rendered at 0.8× (bilinear), gamma 1.1, saved as PNG: what a screen grab of a scaled view gives
``social``      long side down to 1080 if larger (Lanczos), JPEG quality 85, no metadata: a typical upload
``all``         the standard set: :data:`STANDARD`
==============  =====================================================================================

Perturbations work on the fully decoded image (EXIF rotation applied) and hand the detector either the
new pixels or the new file's bytes, which it decodes as it would an upload. Randomness (``noise``) is
seeded per file from the run's seed and the file's path, so a result never depends on the order, the
batching or the number of processes. Perturbed images live in memory unless a folder is given to save them.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageFilter

#: name → (needs a value, (lowest, highest) for the value, what it does)
KINDS: dict[str, tuple[bool, tuple[float, float], str]] = {
    "none": (False, (0, 0), "the file as it is"),
    "jpeg": (True, (1, 100), "JPEG re-encoding at quality Q"),
    "webp": (True, (1, 100), "lossy WebP re-encoding at quality Q"),
    "resize": (True, (0.01, 4.0), "both sides scaled by F (antialiased)"),
    "crop": (True, (0.05, 1.0), "centre crop keeping F of each side"),
    "blur": (True, (0.0, 50.0), "Gaussian blur, sigma in pixels"),
    "noise": (True, (0.0, 128.0), "Gaussian noise, sigma in 8-bit levels"),
    "screenshot": (False, (0, 0), "0.8x bilinear, gamma 1.1, PNG"),
    "social": (False, (0, 0), "long side to 1080, JPEG 85, metadata stripped"),
}
#: What ``all`` means: the robustness table of every model card.
STANDARD: tuple[str, ...] = ("jpeg:95", "jpeg:75", "webp:80", "resize:0.5", "crop:0.8", "blur:1", "noise:3",
                             "screenshot", "social")


def _valid() -> str:
    return ", ".join(f"{k}:VALUE" if need else k for k, (need, _, _) in KINDS.items()) + ", all"


@dataclass(frozen=True)
class Perturbation:
    """One perturbation; picklable, so DataLoader workers apply it where they decode."""

    kind: str
    value: float | None = None
    seed: int = 0
    save_dir: str | None = None  #: write each perturbed image here too (``--save-perturbed``)

    @property
    def spec(self) -> str:
        """The spec as written: ``jpeg:75``, ``resize:0.5``, ``social``."""
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"

    @property
    def slug(self) -> str:
        """A file-name-safe form of the spec: ``jpeg_75``, ``resize_0.5``."""
        return self.spec.replace(":", "_")

    @property
    def identity(self) -> bool:
        return self.kind == "none"

    def apply(self, img: Image.Image, key: str) -> Image.Image | bytes:
        """The perturbed image: new pixels, or the bytes of the re-encoded file. ``key`` (the file's path)
        seeds the randomness."""
        rng = np.random.default_rng([self.seed, zlib.crc32(key.encode("utf-8", "surrogatepass"))])
        return _APPLY[self.kind](img.convert("RGB"), self.value, rng)

    def prepare(self, path: Path, pre: Any) -> Any:
        """Decode ``path``, perturb it and preprocess it with ``pre`` (an inference Preprocessor): the hook
        :meth:`inference.Detector.predict_paths` calls in its decoding workers. The identity takes the
        usual path, so its scores equal the clean run's exactly."""
        from inference.images import load_image

        if self.identity:
            return pre.prepare(path)
        out = self.apply(load_image(path, max_pixels=pre.max_pixels), str(path))
        if self.save_dir is not None:
            self._save(out, path)
        return pre.prepare(io.BytesIO(out) if isinstance(out, bytes) else out, name=str(path))

    def _save(self, out: Image.Image | bytes, path: Path) -> None:
        from inference.files import write_atomic

        folder = Path(self.save_dir or ".") / self.slug
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{zlib.crc32(str(path).encode('utf-8', 'surrogatepass')):08x}_{path.stem}"
        if isinstance(out, bytes):
            ext = {"jpeg": ".jpg", "webp": ".webp", "social": ".jpg", "screenshot": ".png"}[self.kind]
            write_atomic(folder / (stem + ext), out)
        else:
            buf = io.BytesIO()
            out.save(buf, format="PNG")
            write_atomic(folder / (stem + ".png"), buf.getvalue())


def parse_perturbations(text: str, *, seed: int = 0, save_dir: str | None = None) -> list[Perturbation]:
    """``"jpeg:75,resize:0.5"`` / ``"all"`` → perturbations, in order, without repeats. Raises ValueError
    naming the valid specs for anything unknown or out of range."""
    out: list[Perturbation] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item == "all":
            out.extend(parse_perturbations(",".join(STANDARD), seed=seed, save_dir=save_dir))
            continue
        name, colon, raw = item.partition(":")
        if name not in KINDS:
            raise ValueError(f"unknown perturbation '{item}' (valid: {_valid()})")
        needs, (lo, hi), _ = KINDS[name]
        if needs != bool(colon):
            raise ValueError(f"perturbation '{name}' {'needs a value, e.g. ' + name + ':' + str(hi) if needs else 'takes no value'}"
                             f" (valid: {_valid()})")
        value = None
        if needs:
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"perturbation '{item}': '{raw}' is not a number") from None
            if name in ("jpeg", "webp") and not value.is_integer():
                raise ValueError(f"perturbation '{item}': quality must be a whole number")
            if not lo <= value <= hi:
                raise ValueError(f"perturbation '{item}': value must be in {lo:g}..{hi:g}")
        out.append(Perturbation(name, value, seed, save_dir))
    if not out:
        raise ValueError(f"no perturbation given (valid: {_valid()})")
    return list({p.spec: p for p in out}.values())


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)  # from pixels: no EXIF, ICC or other metadata is carried over
    return buf.getvalue()


def _scaled(img: Image.Image, factor: float, resample: Image.Resampling) -> Image.Image:
    w, h = img.size
    return img.resize((max(1, round(w * factor)), max(1, round(h * factor))), resample)


def _crop(img: Image.Image, keep: float) -> Image.Image:
    w, h = img.size
    cw, ch = max(1, round(w * keep)), max(1, round(h * keep))
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def _noise(img: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, sigma, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def _screenshot(img: Image.Image) -> bytes:
    lut = [round(255 * (i / 255) ** (1 / 1.1)) for i in range(256)] * 3
    return _encode(_scaled(img, 0.8, Image.Resampling.BILINEAR).point(lut), "PNG")


def _social(img: Image.Image) -> bytes:
    w, h = img.size
    if max(w, h) > 1080:
        img = _scaled(img, 1080 / max(w, h), Image.Resampling.LANCZOS)
    return _encode(img, "JPEG", quality=85)


_APPLY: dict[str, Callable[[Image.Image, Any, np.random.Generator], Image.Image | bytes]] = {
    "none": lambda img, v, rng: img,
    "jpeg": lambda img, v, rng: _encode(img, "JPEG", quality=int(v)),
    "webp": lambda img, v, rng: _encode(img, "WEBP", quality=int(v), method=4),
    "resize": lambda img, v, rng: _scaled(img, v, Image.Resampling.LANCZOS),
    "crop": lambda img, v, rng: _crop(img, v),
    "blur": lambda img, v, rng: img.filter(ImageFilter.GaussianBlur(radius=v)) if v > 0 else img,
    "noise": lambda img, v, rng: _noise(img, v, rng),
    "screenshot": lambda img, v, rng: _screenshot(img),
    "social": lambda img, v, rng: _social(img),
}
