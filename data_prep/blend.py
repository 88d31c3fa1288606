"""``dfx prepare blend``: self-blended fakes (SBI), face swaps made from real faces alone.

Shiohara & Yamasaki, "Detecting Deepfakes with Self-Blended Images" (CVPR 2022): a face swap leaves blending
traces — a boundary where two faces meet, a colour and sharpness mismatch between inside and outside, a small
misalignment of features — whatever network made the inner face. So a detector can learn them from fakes made
by blending a real face *onto itself*: the inner face is the same face after colour, frequency and small
geometric jitter, the blending mask is the face's landmark hull after random deformation and blur. No generator
is learnt, so nothing generator-specific is (their EfficientNet-B4, trained on FF++ reals only, reached 0.93
AUC on Celeb-DF).

The recipe, per face (every face the finder finds is blended, so no crop of a blend shows an untouched face):

1. **Source** = the face's window after (a) colour jitter: RGB shift (p 0.3), hue/saturation/value, brightness
   and contrast; (b) one frequency change: down-then-up sampling by 2-4x, or sharpening; (c) an affine jitter of
   the source and its mask together (translate up to 3 % / 1.5 %, scale 0.95-1.05). Only the source is jittered,
   never the surrounding target, so the image outside the mask is the original, pixel for pixel.
2. **Mask** = the convex hull of the landmarks (whole face, inner face or lower face, chosen at random), deformed
   elastically, eroded or dilated, blurred twice with random kernels, times a blend ratio (0.25-1, 1 most often).
3. **Blend** = mask·source + (1 − mask)·target. The saved mask is exactly the pixels that changed.

Landmarks: dlib's 68 points when installed (non-commercial model terms, see data_prep/landmarks.py), else an
outline from MTCNN's five. Faces: :class:`inference.faces.FaceFinder` (MTCNN), the same faces
``dfx prepare faces`` and ``dfx predict --faces`` crop, so running ``dfx prepare faces`` on the output gives face
crops framed exactly as the reals' crops (the face expert must not learn "a crop = fake").

Outputs (data_prep/items.py: resumable, atomic, deterministic by seed): ``images/<id>.png`` (lossless, the
parent's size), ``images/<id>_mask.png``, a manifest row with ``kind=faceswap_sbi``, ``parent``, ``faces``,
``landmarks`` and the recipe's draws, ``skipped.json`` (unreadable), ``no_faces.csv`` (photos without a face:
skipped and counted) and ``contact_sheet.png`` (real | blend | mask, for a person to look at).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from inference.faces import Face, FaceFinder, face_square
from inference.images import ImageError, load_image
from inference.manifest import read_manifest

from .items import ItemStore, item_id, item_seed
from .landmarks import Landmarker
from .manifests import child_split, read_reals, write_manifest

log = logging.getLogger("dfx.prep.blend")
KIND = "faceswap_sbi"
SOURCE = "sbi"
MIN_FACE = 32          #: faces smaller than this (box side, pixels) are blended too small to teach anything: skipped
BLEND_RATIOS = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)  #: as the paper's code draws them
HULLS = ("full", "inner", "lower")


# -- the source: colour, frequency, geometry --------------------------------------------------------------------

def jitter_colour(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """RGB shift (p 0.3), hue/saturation/value shift, brightness/contrast: the inner face's colour no longer
    matches its surroundings exactly, as a swapped face's rarely does."""
    import cv2

    out = img.astype(np.float32)
    params: dict[str, Any] = {}
    if rng.random() < 0.3:
        shift = rng.uniform(-20, 20, size=3)
        out = out + shift
        params["rgb_shift"] = [round(float(v), 2) for v in shift]
    hsv = cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
    dh, ds, dv = float(rng.uniform(-6, 6)), float(rng.uniform(-0.15, 0.15)), float(rng.uniform(-0.1, 0.1))
    hsv[..., 0] = np.mod(hsv[..., 0] + dh, 180)
    hsv[..., 1] = np.clip(hsv[..., 1] * (1 + ds), 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] * (1 + dv), 0, 255)
    out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    b, c = float(rng.uniform(-0.1, 0.1)), float(rng.uniform(-0.1, 0.1))
    out = (out - 127.5) * (1 + c) + 127.5 + 255 * b
    params.update(hue=round(dh, 2), saturation=round(ds, 3), value=round(dv, 3), brightness=round(b, 3),
                  contrast=round(c, 3))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), params


def jitter_frequency(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """One of: down-sample by 2-4x and back (a generator's lower resolution), or sharpen (a restorer's)."""
    import cv2

    h, w = img.shape[:2]
    if rng.random() < 0.5:
        factor = float(rng.choice([2.0, 3.0, 4.0]))
        small = cv2.resize(img, (max(2, int(w / factor)), max(2, int(h / factor))), interpolation=cv2.INTER_LINEAR)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR), {"frequency": "downscale",
                                                                          "factor": factor}
    alpha = float(rng.uniform(0.2, 0.5))
    kernel = np.array([[-1, -1, -1], [-1, 9, -1], [-1, -1, -1]], dtype=np.float32)
    sharp = cv2.filter2D(img.astype(np.float32), -1, kernel)
    out = img.astype(np.float32) * (1 - alpha) + sharp * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), {"frequency": "sharpen", "alpha": round(alpha, 3)}


def affine_jitter(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                  face_side: float) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The source and its mask moved together by a small translation and scale about the face's centre."""
    import cv2

    h, w = img.shape[:2]
    tx, ty = float(rng.uniform(-0.03, 0.03)) * face_side, float(rng.uniform(-0.015, 0.015)) * face_side
    scale = float(rng.uniform(0.95, 1 / 0.95))
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 0.0, scale)
    m[:, 2] += (tx, ty)
    warped = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    moved = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return warped, moved, {"translate": [round(tx, 2), round(ty, 2)], "scale": round(scale, 4)}


# -- the mask ---------------------------------------------------------------------------------------------------

def hull_points(points: np.ndarray, kind: str) -> np.ndarray:
    """The landmarks whose convex hull is the mask: the whole face, the inner face (brows, eyes, nose, mouth) or
    the lower face (below the eyes). For a five-point outline (not 68 points) the outline is shrunk or cut."""
    if len(points) == 68:
        if kind == "inner":
            return points[17:68]
        if kind == "lower":
            return np.concatenate([points[1:16], points[29:36]])
        return points
    centre = points.mean(axis=0)
    if kind == "inner":
        return centre + (points - centre) * 0.75
    if kind == "lower":
        return points[points[:, 1] >= np.median(points[:, 1]) - 1e-3]
    return points


def elastic(mask: np.ndarray, rng: np.random.Generator, alpha: float, sigma: float) -> np.ndarray:
    """Mask warped by a smooth random displacement field (Simard et al.'s elastic deformation)."""
    import cv2

    h, w = mask.shape
    k = int(sigma * 6) | 1
    dx = cv2.GaussianBlur(rng.uniform(-1, 1, size=(h, w)).astype(np.float32), (k, k), sigma) * alpha
    dy = cv2.GaussianBlur(rng.uniform(-1, 1, size=(h, w)).astype(np.float32), (k, k), sigma) * alpha
    xx, yy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(mask, xx + dx, yy + dy, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def blend_mask(shape: tuple[int, int], points: np.ndarray, rng: np.random.Generator,
               face_side: float) -> tuple[np.ndarray, dict[str, Any]]:
    """The soft blending mask in [0, 1]: hull → elastic deformation → erode/dilate → two blurs → ratio.
    Sizes are the paper's (for ~256-px faces), scaled to this face."""
    import cv2

    s = max(face_side / 256.0, 0.25)
    kind = str(rng.choice(HULLS))
    hull = cv2.convexHull(np.rint(hull_points(points, kind)).astype(np.int32))
    mask = np.zeros(shape, dtype=np.float32)
    cv2.fillConvexPoly(mask, hull, 1.0)
    mask = elastic(mask, rng, alpha=50 * s, sigma=7 * s)
    morph = int(rng.integers(-1, 2))  # -1 erode, 0 none, 1 dilate
    ksize = max(1, int(round(rng.uniform(2, 8) * s))) * 2 + 1
    if morph:
        element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (ksize, ksize))
        mask = cv2.dilate(mask, element) if morph > 0 else cv2.erode(mask, element)
    blurs = []
    for _ in range(2):
        k = max(1, int(round(rng.uniform(2.5, 13.5) * s))) * 2 + 1
        mask = cv2.GaussianBlur(mask, (k, k), 0)
        blurs.append(k)
        top = float(mask.max())
        if top > 0:
            mask = mask / top
    ratio = float(rng.choice(BLEND_RATIOS))
    return mask * ratio, {"hull": kind, "morph": ["erode", "none", "dilate"][morph + 1], "morph_kernel": ksize,
                          "blur_kernels": blurs, "ratio": ratio}


# -- one face, one image ----------------------------------------------------------------------------------------

def self_blend_face(img: np.ndarray, face: Face, points: np.ndarray,
                    rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """``img`` with one face blended onto itself (a new array); the recipe's draws. Works in a window around
    the face (the face square at 50 % margin), so a face in a 12 MP photo costs what the face costs."""
    h, w = img.shape[:2]
    left, top, side = face_square(face, w, h, margin=0.5)
    x2, y2 = min(w, left + side), min(h, top + side)
    window = img[top:y2, left:x2]
    local = points - np.array([left, top], dtype=np.float32)
    face_side = float(max(face.box[2] - face.box[0], face.box[3] - face.box[1]))
    mask, mparams = blend_mask(window.shape[:2], local, rng, face_side)
    source, cparams = jitter_colour(window, rng)
    source, fparams = jitter_frequency(source, rng)
    source, mask, aparams = affine_jitter(source, mask, rng, face_side)
    alpha = mask[..., None]
    mixed = np.rint(source.astype(np.float32) * alpha + window.astype(np.float32) * (1 - alpha))
    out = img.copy()
    out[top:y2, left:x2] = np.clip(mixed, 0, 255).astype(np.uint8)
    return out, {**mparams, **cparams, **fparams, **aparams, "window": [left, top, x2 - left, y2 - top]}


def usable_faces(finder: FaceFinder, picture: Image.Image, min_face: int = MIN_FACE) -> list[Face]:
    """The faces a blend is made of: every face the finder reports of at least ``min_face`` pixels."""
    return [f for f in finder.find(picture)
            if min(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= min_face]


# -- the job ----------------------------------------------------------------------------------------------------

def blend(reals_manifest: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, per_image: int = 1,
          seed: int = 0, landmarks: str = "auto", max_faces: int = 4, min_face: int = MIN_FACE,
          max_side: int | None = None, sheet: int = 12, progress: bool = True) -> dict[str, Any]:
    """``per_image`` self-blended fakes of each real with a face (rows labelled fake are left out); resumable;
    writes ``<out_dir>/manifest.csv``.

    ``max_side``: shrink larger reals first (default: keep the parent's size, so a blend differs from its real
    only inside its mask). A photo with no usable face is skipped and listed in ``no_faces.csv``."""
    from tqdm import tqdm

    from inference.files import write_atomic

    # only reals are blended: a manifest of reals and fakes (e.g. after `dfx prepare cluster`) can be passed whole
    reals, left_out = read_reals(reals_manifest)
    store = ItemStore(out_dir, image_format="png")
    finder = FaceFinder()
    marker = Landmarker(landmarks)
    paths = [reals.abspath(r) for r in reals.rows]
    skipped: list[dict[str, str]] = []
    no_faces: list[dict[str, Any]] = []
    made = already = 0
    total = len(paths) * per_image
    bar = tqdm(total=total, desc=f"blend ({marker.method})", unit="img", disable=not progress)
    for row, path in zip(reals.rows, paths):
        idents = [item_id("sbi", str(path), k) for k in range(per_image)]
        none_marker = store.rows / f"{idents[0]}.noface"
        if none_marker.is_file() or all(store.done(i) for i in idents):
            already += sum(store.done(i) for i in idents)
            if none_marker.is_file():
                no_faces.append({**row, "path": str(path)})
            bar.update(per_image)
            continue
        try:
            picture = load_image(path)
            if max_side and max(picture.size) > max_side:
                picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        except ImageError as exc:
            skipped.append({"path": str(path), "reason": exc.message})
            log.warning("skipped %s", exc.message)
            bar.update(per_image)
            continue
        img = np.asarray(picture)
        faces = usable_faces(finder, picture, min_face)[:max_faces]
        marks = [(f, marker.points(img, f)) for f in faces]
        marks = [(f, p) for f, p in marks if p is not None]
        if not marks:
            write_atomic(none_marker, "")
            no_faces.append({**row, "path": str(path)})
            bar.update(per_image)
            continue
        for k, ident in enumerate(idents):
            bar.update(1)
            if store.done(ident):
                already += 1
                continue
            s = item_seed(seed, ident)
            rng = np.random.default_rng(s)
            out, draws = img, []
            for face, points in marks:
                out, params = self_blend_face(out, face, points, rng)
                draws.append(params)
            changed = np.any(out != img, axis=2)
            fake = {"label": 1, "source": SOURCE, "kind": KIND, "parent": str(path), "seed": s,
                    "faces": len(marks), "landmarks": marker.describe(), "params": json.dumps(draws)}
            fake.update(child_split(row))
            store.save(ident, Image.fromarray(out), fake, mask=changed)
            made += 1
    bar.close()
    manifest = store.assemble()
    write_manifest(store.root / "no_faces.csv", no_faces)
    write_atomic(store.root / "skipped.json", json.dumps(skipped, indent=2))
    sheet_path = contact_sheet(store.root, manifest, n=sheet) if sheet else None
    return {"reals": len(paths), "fakes_left_out": left_out, "planned": total, "made": made, "already_done": already,
            "no_faces": len(no_faces), "skipped": len(skipped), "landmarks": marker.describe(),
            "finder": finder.describe(), "manifest": str(manifest),
            "contact_sheet": str(sheet_path) if sheet_path else None}


def contact_sheet(root: Path, manifest: Path, n: int = 12, cell: int = 160) -> Path | None:
    """``contact_sheet.png``: the first ``n`` fakes, each as real | blend | mask around its first face, so a
    person can see what the fakes look like (and that the masks sit on the faces)."""
    from inference.files import atomic_path

    rows = read_manifest(manifest, require_labels=False)
    items = rows.rows[:n]
    if not items:
        return None
    sheet = Image.new("RGB", (cell * 3, cell * len(items)), "white")
    for r, row in enumerate(items):
        fake = load_image(rows.abspath(row))
        real = load_image(Path(row["parent"]) if os.path.isabs(row["parent"]) else root / row["parent"])
        mask = Image.open(root / row["mask"]).convert("RGB")
        if real.size != fake.size:  # the real was shrunk first (--max-side)
            real = real.resize(fake.size, Image.Resampling.LANCZOS)
        left, top, width, height = json.loads(row["params"])[0]["window"]
        box = (left, top, left + width, top + height)
        for c, pic in enumerate((real, fake, mask)):
            tile = pic.crop(box)
            tile.thumbnail((cell, cell), Image.Resampling.LANCZOS)
            sheet.paste(tile, (c * cell, r * cell))
    target = root / "contact_sheet.png"
    with atomic_path(target, suffix=".png") as tmp:
        sheet.save(tmp, "PNG")
    return target
