"""Face landmarks for self-blending: where a face's hull is.

Two sources, one interface (:class:`Landmarker`):

- **dlib's 68-point shape predictor** (``dlib-bin`` + ``face-recognition-models``, both on PyPI; the ``faces``
  extra). It is run inside the box MTCNN found, so the faces blended are exactly the faces
  ``dfx prepare faces`` and ``dfx predict --faces`` crop. Licence: the package and dlib are MIT / Boost, but the
  68-point model was trained on iBUG 300-W, whose terms exclude commercial use: fakes made with it, and models
  trained on them, inherit that restriction (recorded in every row's ``landmarks`` column).
- **MTCNN's five points** (eyes, nose, mouth corners; MIT weights, always there when faces are found with
  MTCNN): a face outline is drawn around them from the face's own proportions (eye distance, eye-to-mouth
  distance, the eyes' angle). Coarser than 68 points (no jaw line), free of the 300-W restriction.

``auto`` takes dlib when installed, else the five points. The package ``face_recognition_models`` is never
imported (its ``__init__`` needs ``pkg_resources``, gone from new setuptools): its model files are found on disk.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np

from inference.faces import Face

DLIB_PIP = "pip install dlib-bin==20.0.1.post1 face-recognition-models==0.3.0"
DLIB68_TERMS = "dlib68 (shape_predictor_68_face_landmarks, trained on iBUG 300-W: non-commercial terms)"
MTCNN5_TERMS = "mtcnn5 (MTCNN five points, MIT)"


def dlib68_model() -> Path | None:
    """The 68-point predictor file of ``face-recognition-models``, when it and dlib are installed."""
    if importlib.util.find_spec("dlib") is None:
        return None
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
    return path if path.is_file() else None


class Landmarker:
    """Landmarks of a face found by :class:`inference.faces.FaceFinder`: ``(68, 2)`` from dlib or ``(K, 2)``
    outline points built from MTCNN's five. Picklable (dlib's predictor is loaded on first use)."""

    def __init__(self, method: str = "auto") -> None:
        if method not in ("auto", "dlib68", "mtcnn5"):
            raise ValueError(f"landmarks must be auto, dlib68 or mtcnn5, got '{method}'")
        model = dlib68_model()
        if method == "dlib68" and model is None:
            raise FileNotFoundError(f"dlib's 68-point model is not installed: {DLIB_PIP}")
        self.method = "dlib68" if method in ("auto", "dlib68") and model is not None else "mtcnn5"
        self.model = model if self.method == "dlib68" else None
        self._predictor: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_predictor": None}

    def describe(self) -> str:
        """What made the landmarks, with the terms its model carries (written in every fake's row)."""
        return DLIB68_TERMS if self.method == "dlib68" else MTCNN5_TERMS

    def points(self, img: np.ndarray, face: Face) -> np.ndarray | None:
        """The face's landmarks in pixels of ``img`` (H, W, 3 uint8); None when the face has none to use
        (a Haar box has no five points to draw an outline from)."""
        if self.method == "dlib68":
            return self._dlib(img, face)
        return outline_from_five(face)

    def _dlib(self, img: np.ndarray, face: Face) -> np.ndarray:
        import dlib

        if self._predictor is None:
            self._predictor = dlib.shape_predictor(str(self.model))
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        shape = self._predictor(np.ascontiguousarray(img), dlib.rectangle(x1, y1, x2, y2))
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)


def outline_from_five(face: Face, n: int = 24) -> np.ndarray | None:
    """A face outline (``n`` points of an ellipse, in the face's own upright frame) from MTCNN's five points.

    Proportions from a mean face: the outline's centre lies a little below the midpoint of eyes and mouth, its
    half-width is 1.0 eye distance and its half-height 1.25 eye-to-mouth distances plus a little, so it runs from
    just above the brows to the chin and from cheek to cheek."""
    if not face.landmarks or len(face.landmarks) < 5:
        return None
    pts = np.asarray(face.landmarks, dtype=np.float32)
    eyes, mouth = pts[:2].mean(axis=0), pts[3:5].mean(axis=0)
    eye_dist = float(np.linalg.norm(pts[1] - pts[0]))
    down = mouth - eyes
    eye_mouth = float(np.linalg.norm(down))
    if eye_dist < 2 or eye_mouth < 2:
        return None
    angle = math.atan2(float(pts[1][1] - pts[0][1]), float(pts[1][0] - pts[0][0]))
    centre = eyes + down * 0.6
    half_w, half_h = 1.0 * eye_dist, 1.35 * eye_mouth
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    local = np.stack([half_w * np.cos(t), half_h * np.sin(t)], axis=1)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=np.float32)
    return (local @ rot.T + centre).astype(np.float32)
