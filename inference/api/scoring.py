"""Scoring a request's images: decode in the request's thread, forward through the micro-batcher, faces
combined, heatmaps drawn after the score; one image's failure stays its own."""

from __future__ import annotations

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

        body.update(face_fields(pred.faces, pred.whole_score, pred.face_rule))
    if pred.provenance is not None:
        body.update(label_by=pred.label_by, provenance=pred.provenance)
    body.update(pred.explain or {})
    return body


def score(det: Detector, payloads: list[tuple[bytes, str]], faces: bool = False,
          explain: bool = False, provenance: bool = True) -> list[Prediction | ApiError]:
    """Decode each payload in this thread (errors kept per item; inference/pipeline.py), then score the good ones
    through the micro-batcher, together with whatever other requests are ready (inference/microbatch.py): face
    crops in the same forward, combined by the Detector. With ``explain``, each prediction gains ``explain``
    fields (:func:`_explain_fields`): its maps are computed after the score, under the forward lock. With
    ``provenance``, what each file says about itself is read from its bytes and set beside its score."""
    from ..pipeline import decode

    model, _ = current()
    decoded, results = [], []
    model.batcher.decoding(+1)
    try:
        for data, what in payloads:
            try:
                decoded.append(decode(det.preprocessor, data, name=what, keep_image=explain,
                                      finder=model.face_finder() if faces else None,
                                      provenance=model.provenance if provenance else None))
                results.append(None)
            except ImageError as exc:
                status, code = IMAGE_ERROR_STATUS.get(exc.code, (422, "invalid_image"))
                results.append(ApiError(status, code, exc.message))
    finally:
        model.batcher.decoding(-1)
    if decoded:
        preds = det.score_decoded(decoded, forward=model.batcher.submit)
        if explain:
            preds = [replace(p, explain=_explain_fields(det, d, p)) for d, p in zip(decoded, preds)]
        scored = iter(preds)
        results = [r if r is not None else next(scored) for r in results]
        results = [ApiError(500, *NON_FINITE) if isinstance(r, Prediction) and not r.finite else r
                   for r in results]
    return results


def _explain_fields(det: Detector, decoded: Any, pred: Prediction) -> dict[str, Any]:
    """``heatmap`` (a PNG data URL: the image tinted by the ensemble's map, colour bar, score, label; face boxes
    when faces were scored), ``heatmap_layer`` (the coloured map alone, transparent where no expert looked, at the
    image's aspect: for laying over the image), ``heatmap_colours`` (the colour scale, 0 to 1) and
    ``explained_by`` (the experts with maps), or ``explain_unavailable``."""
    from ..explain import COLOUR_STOPS, data_url, map_layer, png_bytes
    from ..pipeline import analyse

    model, config = current()
    try:
        with model.forward_lock:
            analysis = analyse(det, decoded, pred)
        expl = analysis.explanation
        if expl.ensemble is None:
            return {"explain_unavailable": expl.unavailable}
        picture = analysis.picture(label=pred.label, threshold=det.spec.threshold, max_side=config.explain_max_side)
        layer = map_layer(expl, config.explain_max_side)
        return {"heatmap": data_url(png_bytes(picture)), "explained_by": sorted(expl.maps),
                "heatmap_layer": data_url(png_bytes(layer)), "heatmap_colours": COLOUR_STOPS}
    except Exception:  # the score stands; one image's map never fails its batch (issue 26, item 2)
        incident = uuid.uuid4().hex[:12]
        log.exception("drawing the heatmap failed (incident %s)", incident)
        return {"explain_unavailable": f"the heatmap of this image could not be drawn; the error is logged "
                                       f"as incident {incident}"}
