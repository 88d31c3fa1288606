"""``dfx prepare edit``: fakes made from reals without a generator, each with its mask.

Operations (each changes only the pixels of its saved mask; everything outside is the original):
- ``splice``: a region of another real image pasted in with a feathered edge;
- ``copy_move``: a region of the same image copied elsewhere in it (feathered);
- ``inpaint``: object removal, a random blob filled by OpenCV inpainting (Telea, or Navier-Stokes);
- ``resample``: a region (a face found by OpenCV's Haar cascade when there is one, else a random
  rectangle) down-sampled and up-sampled back, as face-swap and region-retouching pipelines leave;
- ``blur_region``: a region smoothed as a beauty filter or a content-aware clean-up leaves it.

Benign whole-image post-processing (JPEG, resize) is augmentation in training, not an edit. Outputs are
PNG by default so the mask stays exact; ``--format jpg`` matches the reals' format but re-compression
touches every pixel slightly.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from inference.images import ImageError, load_image

from .diffuse import random_blob_mask
from .items import ItemStore, item_id, item_seed
from .manifests import child_split, read_reals

log = logging.getLogger("dfx.prep.edit")
MIN_SIDE = 64


def _rect(h: int, w: int, rng: np.random.Generator, frac: tuple[float, float] = (0.15, 0.4)) -> tuple[int, int, int, int]:
    rh, rw = int(h * rng.uniform(*frac)), int(w * rng.uniform(*frac))
    rh, rw = max(8, rh), max(8, rw)
    y, x = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
    return y, x, rh, rw


def _feather(h: int, w: int, box: tuple[int, int, int, int], radius: int) -> np.ndarray:
    """Alpha in [0, 1]: 1 inside the box, a linear ramp of ``radius`` px inside its border, 0 outside."""
    y, x, rh, rw = box
    alpha = np.zeros((h, w), dtype=np.float32)
    yy, xx = np.mgrid[0:rh, 0:rw]
    dist = np.minimum(np.minimum(yy + 1, rh - yy), np.minimum(xx + 1, rw - xx)).astype(np.float32)
    alpha[y:y + rh, x:x + rw] = np.clip(dist / max(1, radius), 0, 1)
    return alpha


def _blend(base: np.ndarray, top: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    out = base.astype(np.float32) * (1 - alpha[..., None]) + top.astype(np.float32) * alpha[..., None]
    return np.where(alpha[..., None] > 0, np.clip(np.rint(out), 0, 255), base).astype(np.uint8)


def _paste(img: np.ndarray, src: np.ndarray, rng: np.random.Generator, frac: tuple[float, float],
           max_radius: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """A random box of ``src`` (same size as ``img``) pasted at a random place of ``img``, feathered."""
    h, w = img.shape[:2]
    box = _rect(h, w, rng, frac)
    sy, sx = int(rng.integers(0, h - box[2] + 1)), int(rng.integers(0, w - box[3] + 1))
    top = img.copy()
    top[box[0]:box[0] + box[2], box[1]:box[1] + box[3]] = src[sy:sy + box[2], sx:sx + box[3]]
    alpha = _feather(h, w, box, radius=int(rng.integers(1, max_radius)))
    return _blend(img, top, alpha), alpha > 0, {"box": list(box), "source_box": [sy, sx]}


def splice(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    h, w = img.shape[:2]
    donor = np.asarray(Image.fromarray(donor).resize((w, h), Image.Resampling.BICUBIC))
    return _paste(img, donor, rng, (0.15, 0.4), max_radius=6)


def copy_move(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    return _paste(img, img, rng, (0.12, 0.3), max_radius=4)


def inpaint(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    import cv2

    h, w = img.shape[:2]
    side = min(h, w)
    blob = random_blob_mask(side, rng, coverage=(0.04, 0.15))
    mask = np.zeros((h, w), dtype=bool)
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    mask[y:y + side, x:x + side] = blob
    method = cv2.INPAINT_TELEA if rng.random() < 0.5 else cv2.INPAINT_NS
    out = cv2.inpaint(np.ascontiguousarray(img[..., ::-1]), mask.astype(np.uint8) * 255, 5, method)[..., ::-1]
    out = np.where(mask[..., None], out, img)
    return out.astype(np.uint8), mask, {"method": "telea" if method == cv2.INPAINT_TELEA else "navier-stokes",
                                        "coverage": round(float(mask.mean()), 4)}


def _face_box(img: np.ndarray) -> tuple[int, int, int, int] | None:
    import cv2

    cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    faces = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
    if len(faces) == 0:
        return None
    x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
    return int(y), int(x), int(h), int(w)


def resample(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    h, w = img.shape[:2]
    box = _face_box(img) if min(h, w) >= 96 else None
    where = "face" if box else "region"
    box = box or _rect(h, w, rng, (0.2, 0.45))
    y, x, rh, rw = box
    factor = float(rng.uniform(2.0, 4.0))
    region = Image.fromarray(img[y:y + rh, x:x + rw])
    small = region.resize((max(2, int(rw / factor)), max(2, int(rh / factor))), Image.Resampling.BILINEAR)
    back = np.asarray(small.resize((rw, rh), rng.choice([Image.Resampling.BICUBIC, Image.Resampling.NEAREST,
                                                         Image.Resampling.BILINEAR])))
    out = img.copy()
    out[y:y + rh, x:x + rw] = back
    mask = np.zeros((h, w), dtype=bool)
    mask[y:y + rh, x:x + rw] = True
    return out, mask, {"box": [y, x, rh, rw], "target": where, "factor": round(factor, 3)}


def blur_region(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    import cv2

    h, w = img.shape[:2]
    box = _rect(h, w, rng, (0.2, 0.5))
    y, x, rh, rw = box
    k = int(rng.choice([5, 7, 9]))
    out = img.copy()
    out[y:y + rh, x:x + rw] = cv2.bilateralFilter(np.ascontiguousarray(img[y:y + rh, x:x + rw]), k, 60, 60)
    mask = np.zeros((h, w), dtype=bool)
    mask[y:y + rh, x:x + rw] = True
    return out, mask, {"box": list(box), "kernel": k}


OPS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray, dict]]] = {
    "splice": splice, "copy_move": copy_move, "inpaint": inpaint, "resample": resample, "blur_region": blur_region,
}


def edit(reals_manifest: str, out_dir: str | os.PathLike[str], *, ops: list[str], per_image: int = 1, seed: int = 0,
         image_format: str = "png", max_side: int | None = 1024, progress: bool = True) -> dict[str, Any]:
    """Apply each op ``per_image`` times to each real (rows labelled fake are left out, so a folds manifest can be
    passed whole); resumable; writes ``<out_dir>/manifest.csv``."""
    from tqdm import tqdm

    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(unknown)} (known: {', '.join(OPS)})")
    reals, left_out = read_reals(reals_manifest)
    store = ItemStore(out_dir, image_format=image_format)
    paths = [reals.abspath(r) for r in reals.rows]
    skipped, made, already = [], 0, 0
    loaded: dict[int, np.ndarray | None] = {}

    def get(i: int) -> np.ndarray | None:
        if i not in loaded:
            try:
                img = load_image(paths[i])
                if max_side and max(img.size) > max_side:
                    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
                if min(img.size) < MIN_SIDE:
                    raise ImageError("too_small", f"{paths[i]}: too small ({img.size[0]}x{img.size[1]}; needs >= {MIN_SIDE} px)")
                loaded[i] = np.asarray(img)
            except ImageError as exc:
                skipped.append({"path": str(paths[i]), "reason": exc.message})
                log.warning("skipped %s", exc.message)
                loaded[i] = None
        return loaded[i]

    total = len(paths) * len(ops) * per_image
    bar = tqdm(total=total, desc="edit", unit="img", disable=not progress)
    for i, path in enumerate(paths):
        for op in ops:
            for k in range(per_image):
                ident = item_id(op, str(path), k)
                bar.update(1)
                if store.done(ident):
                    already += 1
                    continue
                img = get(i)
                if img is None:
                    continue
                s = item_seed(seed, ident)
                rng = np.random.default_rng(s)
                donor = None
                if op == "splice":
                    others = [j for j in range(len(paths)) if j != i]
                    for j in rng.permutation(others)[:5].tolist():
                        donor = get(int(j))
                        if donor is not None:
                            break
                    if donor is None:
                        skipped.append({"path": str(path), "reason": "splice needs a second readable real image"})
                        continue
                out, mask, params = OPS[op](img, rng, donor=donor)
                row = {"label": 1, "source": f"edit:{op}", "kind": "edit", "parent": str(path), "op": op, "seed": s,
                       "params": json.dumps(params), **child_split(reals.rows[i])}
                store.save(ident, Image.fromarray(out), row, mask=mask)
                made += 1
        if len(loaded) > 64:  # keep memory bounded on big manifests
            loaded.clear()
    bar.close()
    manifest = store.assemble()
    from inference.files import write_atomic

    write_atomic(store.root / "skipped.json", json.dumps(skipped, indent=2))
    return {"reals": len(paths), "fakes_left_out": left_out, "planned": total, "made": made, "already_done": already,
            "skipped": skipped, "manifest": str(manifest)}
