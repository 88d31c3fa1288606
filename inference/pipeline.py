"""One image → one answer, in the stages every caller shares: decode (and find faces), forward, combine, draw.

:func:`decode` turns a file, bytes or picture into what the experts read (:class:`Decoded`: the whole image, then
each face crop); :meth:`inference.detector.Detector.score_decoded` scores any number of them in one forward (or
through a caller's forward: the API's micro-batcher) and combines each image's faces; :func:`analyse` adds the
maps and knows how to draw them (:class:`Analysis`). ``dfx predict``/``submit``/``evaluate`` (decoding in worker
processes), sharded scoring, ``dfx explain`` and the API all go through these, so a face is found, an image is
scored and a box is drawn the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from PIL import Image

from .images import Source

if TYPE_CHECKING:
    from .detector import Detector, Prediction
    from .explain import Explanation
    from .preprocess import Prepared, Preprocessor
    from .provenance import Provenance, ProvenanceReader

MAX_FACES = 16  #: faces scored per image at most (the most confident ones)


@dataclass
class Decoded:
    """One image ready for the experts: its preprocessed inputs (the whole image first, then each face crop), the
    faces found (in the pixels of ``faces_size``, the image decoded in full), and, when a map will be drawn, the
    decoded picture the map is laid over."""

    items: list["Prepared"]
    faces: list[Any] | None = None   #: None: faces were not looked for; [] none found
    image: Image.Image | None = None
    faces_size: tuple[int, int] | None = None
    #: what the file says about its origin (inference/provenance), read from its bytes; None: not read
    provenance: "Provenance | None" = None


def decode(pre: "Preprocessor", src: Source | Image.Image, *, name: str | None = None, finder: Any = None,
           keep_image: bool = False, provenance: "ProvenanceReader | None" = None) -> Decoded:
    """Decode and preprocess one image; raises ImageError. The whole image is read exactly as a plain prediction
    reads it (a JPEG may be decoded at reduced scale), so its score is the same. ``finder`` (inference/faces.py):
    also its face crops, found and cut by :func:`inference.faces.find_and_cut` (at most :data:`MAX_FACES`; a bundle
    with experts that read faces always looks, with ``pre.finder``), as ``dfx prepare faces`` cuts training crops.
    ``keep_image``: keep the decoded picture, for maps. ``provenance``: also read what the file says about itself,
    from its bytes (never from the pixels the experts read, and never into them)."""
    from .faces import find_and_cut

    if hasattr(src, "read"):
        src = src.read()  # type: ignore[union-attr]  # read more than once below
    finder = finder if finder is not None else pre.finder  # a bundle with face experts always looks for faces
    if isinstance(src, Image.Image):
        picture = src if src.mode == "RGB" else src.convert("RGB")
        loaded = None
    else:
        loaded = pre.load_scaled(src, name=name)
        picture = loaded[0]
    whole = pre.transform(picture)
    cut = find_and_cut(picture if loaded is None else src, finder, max_faces=MAX_FACES, max_pixels=pre.max_pixels,
                       name=name, decoded=loaded) if finder is not None else None
    items = [whole] + [pre.transform_face(crop) for crop in (cut.crops if cut else [])]
    prov = provenance.read(src) if provenance is not None and not isinstance(src, Image.Image) else None
    return Decoded(items, cut.faces if cut else None, picture if keep_image else None, cut.size if cut else None,
                   prov)


@dataclass
class Analysis:
    """An image's prediction and, when asked, where it came from (the ensemble's and each expert's maps)."""

    prediction: "Prediction"
    explanation: "Explanation | None" = None
    decoded: Decoded | None = None

    def boxes(self) -> list[tuple[list[float], float]]:
        """Each scored face's box in the decoded picture's pixels (faces are reported in the file's own), and its
        score: what the picture draws."""
        d = self.decoded
        if not self.prediction.faces or d is None or d.image is None:
            return []
        sx = d.image.width / (d.faces_size or d.image.size)[0]
        return [([v * sx for v in f["box"]], f["score"]) for f in self.prediction.faces]

    def picture(self, *, label: str, threshold: float, max_side: int) -> Image.Image:
        """The picture a person reads (inference/explain.overlay): tinted by the map, faces boxed."""
        from .explain import overlay

        assert self.explanation is not None and self.decoded is not None
        return overlay(self.decoded.image, self.explanation, label=label, threshold=threshold, max_side=max_side,
                       boxes=self.boxes())


def analyse(det: "Detector", decoded: Decoded, prediction: "Prediction", max_side: int | None = None) -> Analysis:
    """The maps of an image already scored (``prediction``, from :meth:`Detector.score_decoded`): computed on its
    whole-image input, so they go with exactly the score the image got."""
    from .explain import MAX_SIDE, explain_prepared

    assert decoded.image is not None, "decode(..., keep_image=True) keeps what a map needs"
    expl = explain_prepared(det, decoded.image.size, decoded.items[0], prediction, max_side or MAX_SIDE)
    expl.image = decoded.image
    return Analysis(prediction, expl, decoded)


def flat_items(decoded: Sequence[Decoded]) -> list["Prepared"]:
    """Every input of ``decoded``, flat, in order (whole image, then its faces, per image)."""
    return [item for d in decoded for item in d.items]
