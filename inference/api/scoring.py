"""Scoring a request's images: decode in the request's thread, forward through the micro-batcher, faces
combined, heatmaps drawn after the score; one image's failure stays its own."""

from __future__ import annotations

import io
import logging
import uuid
from dataclasses import replace
from typing import Any

from ..detector import NON_FINITE, Detector, Prediction
from ..images import ImageError
from .config import IMAGE_ERROR_STATUS, ApiError
from .worker import current

log = logging.getLogger("dfx.api")


def prediction_json(det: Detector, pred: Prediction) -> dict[str, Any]:
    body: dict[str, Any] = {"result": pred.score, "label": pred.label, "experts": pred.experts}
    if pred.faces is not None:
        from ..faces import face_fields

        body.update(face_fields(pred.faces, pred.whole_score))
    body.update(pred.explain or {})
    return body


def score(det: Detector, payloads: list[tuple[bytes, str]], faces: bool = False,
           explain: bool = False) -> list[Prediction | ApiError]:
    """Decode each payload in this thread (errors kept per item), then score the good ones through the
    micro-batcher, together with whatever other requests are ready (inference/microbatch.py). With
    ``faces``, each image's face crops are scored in the same forward and combined (Detector.combine_faces).
    With ``explain``, each prediction gains ``explain`` fields (:func:`_explain_fields`): its maps are
    computed after the score, under the forward lock."""
    from ..detector import prepare_faces

    model, _ = current()
    prepared: list = []
    groups: list[tuple[int, list, Any]] = []  # per good image: prepared items, its faces, its decoded image
    results: list = []
    model.batcher.decoding(+1)
    try:
        for data, what in payloads:
            try:
                img = det.preprocessor.load(data, name=what) if explain else None
                if faces:
                    items, found = prepare_faces(det.preprocessor, model.face_finder(), data, name=what)
                else:
                    items, found = [det.preprocessor.transform(img) if img is not None
                                    else det.prepare(data, name=what)], []
                prepared += items
                groups.append((len(items), found, (img, items[0], data)))
                results.append(None)
            except ImageError as exc:
                status, code = IMAGE_ERROR_STATUS.get(exc.code, (422, "invalid_image"))
                results.append(ApiError(status, code, exc.message))
    finally:
        model.batcher.decoding(-1)
    if prepared:
        preds = model.batcher.submit(prepared)
        combined, at = [], 0
        for n, found, (img, whole, data) in groups:
            pred = det.combine_faces(found, preds[at:at + n]) if faces else preds[at]
            if explain:
                pred = replace(pred, explain=_explain_fields(det, img, whole, preds[at], pred, data))
            combined.append(pred)
            at += n
        scored = iter(combined)
        results = [r if r is not None else next(scored) for r in results]
        results = [ApiError(500, *NON_FINITE) if isinstance(r, Prediction) and not r.finite else r
                   for r in results]
    return results

def _explain_fields(det: Detector, img: Any, whole: Any, whole_pred: Prediction, pred: Prediction,
                    data: bytes) -> dict[str, Any]:
    """``heatmap`` (a PNG data URL: the image tinted by the ensemble's map, colour bar, score, label; face
    boxes when faces were scored) and ``explained_by`` (the experts with maps), or ``explain_unavailable``."""
    from ..explain import explain_prepared

    model, _ = current()
    try:
        with model.forward_lock:
            expl = explain_prepared(det, img.size, whole, whole_pred)
        return _heatmap_fields(det, expl, img, pred, data)
    except Exception:  # the score stands; one image's map never fails its batch (issue 26, item 2)
        incident = uuid.uuid4().hex[:12]
        log.exception("drawing the heatmap failed (incident %s)", incident)
        return {"explain_unavailable": f"the heatmap of this image could not be drawn; the error is logged "
                                       f"as incident {incident}"}

def _heatmap_fields(det: Detector, expl: Any, img: Any, pred: Prediction, data: bytes) -> dict[str, Any]:
    from ..explain import data_url, original_size, overlay, png_bytes

    _, config = current()
    if expl.ensemble is None:
        return {"explain_unavailable": expl.unavailable}
    expl.prediction = pred
    boxes = []
    if pred.faces:
        full = original_size(io.BytesIO(data)) or img.size
        sx = img.width / full[0]
        boxes = [([v * sx for v in f["box"]], f["score"]) for f in pred.faces]
    picture = overlay(img, expl, label=pred.label, threshold=det.spec.threshold,
                      max_side=config.explain_max_side, boxes=boxes)
    return {"heatmap": data_url(png_bytes(picture)), "explained_by": sorted(expl.maps)}
