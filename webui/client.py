"""The API as the site sees it: a small HTTP client (standard library, with a timeout) that distrusts every answer."""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from .config import UserError, WebConfig

log = logging.getLogger("dfx.webui")


API_ERROR_TEXT = {
    "not_an_image": "This file is not an image the service can read (JPEG, PNG, WEBP, BMP, GIF or TIFF).",
    "corrupt_image": "This image is damaged or incomplete, so it cannot be checked. Try the original file.",
    "empty_image": "The file is empty.",
    "image_too_large": "The image has too many pixels for the detection service.",
    "payload_too_large": "The file is too large for the detection service.",
    "unauthorized": "The site could not sign in to the detection service (API key). Tell the site's operator.",
    "model_loading": "The detection model is still starting. Try again in a few seconds.",
    "model_unavailable": "The detection model is not available right now. Tell the site's operator.",
}


#: The most the site reads of one API answer; a hostile or broken API cannot make it buffer more.
MAX_API_ANSWER_BYTES = 8 * 1024 * 1024
#: The most faces a verdict may list (the API scores at most 16).
MAX_FACES = 16
#: The most experts a verdict may list (the page and the report show each one).
MAX_EXPERTS = 64
LABELS = ("fake", "real", "uncertain")
MODEL_TTL_S = 60.0  #: how long the site keeps the API's ``/model`` answer
MODEL_RETRY_S = 10.0  #: how soon it asks again when ``/model`` failed
HEX_COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")


class ApiClient:
    """POSTs to the JSON API with a timeout; turns every failure into a :class:`UserError`."""

    def __init__(self, cfg: WebConfig) -> None:
        self.cfg = cfg
        self._model: dict[str, Any] | None = None
        self._model_at = 0.0
        self._model_lock = threading.Lock()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.cfg.api_url.rstrip("/") + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.cfg.api_key:
            req.add_header("Authorization", f"Bearer {self.cfg.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.cfg.timeout) as resp:
                raw = resp.read(MAX_API_ANSWER_BYTES + 1)
                if len(raw) > MAX_API_ANSWER_BYTES:
                    raise UserError(502, "api_bad_answer", "The detection service gave an answer the site cannot read.")
                answer = json.loads(raw.decode())
                if not isinstance(answer, dict):
                    raise ValueError("the answer is not a JSON object")
                return answer
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read(64 * 1024).decode()).get("error", {})
            except (ValueError, AttributeError, OSError):
                err = {}
            if not isinstance(err, dict):  # e.g. a string: read nothing from it
                err = {}
            code = err.get("code") if isinstance(err.get("code"), str) else "api_error"
            message = err.get("message") if isinstance(err.get("message"), str) else None
            text = API_ERROR_TEXT.get(code) or (message or "")[:300] or f"The detection service answered {exc.code}."
            status = exc.code if exc.code in (400, 413, 415, 422) else 502
            raise UserError(status, code, text) from exc
        except (TimeoutError, socket.timeout) as exc:
            raise UserError(504, "api_timeout", f"The detection service did not answer within {self.cfg.timeout:g} "
                                                "seconds. Try again, or try a smaller image.") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise UserError(504, "api_timeout", f"The detection service did not answer within "
                                                    f"{self.cfg.timeout:g} seconds. Try again later.") from exc
            raise UserError(502, "api_unreachable", "The detection service cannot be reached right now. "
                                                    "Try again in a minute; if it persists, tell the site's operator.") from exc
        except (ValueError, OSError) as exc:
            raise UserError(502, "api_bad_answer", "The detection service gave an answer the site cannot read.") from exc

    def predict(self, image: bytes, faces: bool = False, explain: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"image": base64.b64encode(image).decode()}
        if faces:
            body["faces"] = True
        if explain:
            body["explain"] = True
        return clean_result(self._call("POST", "/predict", body))

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/healthcheck", timeout=min(5.0, self.cfg.timeout))

    def model(self) -> dict[str, Any]:
        """The bundle's description (:func:`clean_model`), asked of ``/model`` at most once a minute; ``{}`` when
        the API cannot say (the verdicts still show, without expert descriptions)."""
        with self._model_lock:
            if self._model is not None and time.monotonic() - self._model_at < MODEL_TTL_S:
                return self._model
        try:
            info = clean_model(self._call("GET", "/model", timeout=min(10.0, self.cfg.timeout)))
            at = time.monotonic()
        except UserError as err:  # asked again after a short while, not on every check of a struggling API
            log.info("no model description from the API: %s", err.code)
            info, at = {}, time.monotonic() - MODEL_TTL_S + MODEL_RETRY_S
        with self._model_lock:
            self._model, self._model_at = info, at
        return info


def clean_result(answer: dict[str, Any]) -> dict[str, Any]:
    """Only the fields the page shows, with their types and sizes checked: the site never trusts the
    API's answer to be small or well-formed (200 000 experts would size the report at gigabytes)."""
    bad = UserError(502, "api_bad_answer", "The detection service gave an answer the site cannot read.")
    try:
        score = float(answer["result"])
    except (KeyError, TypeError, ValueError):
        raise bad from None
    if not 0.0 <= score <= 1.0:
        raise bad
    experts = answer.get("experts") or {}
    if not isinstance(experts, dict) or len(experts) > MAX_EXPERTS:
        raise bad
    try:
        experts = {str(k)[:80]: float(v) for k, v in experts.items()}
        threshold = float(answer.get("threshold", 0.5))
    except (TypeError, ValueError):
        raise bad from None
    label = answer.get("label") if answer.get("label") in LABELS else "uncertain"
    heatmap, layer = (v if isinstance(v, str) and v.startswith("data:image/png;base64,") else None
                      for v in (answer.get("heatmap"), answer.get("heatmap_layer")))
    colours = answer.get("heatmap_colours")
    if not (isinstance(colours, list) and 2 <= len(colours) <= 16 and all(isinstance(c, str) and HEX_COLOUR.match(c)
                                                                       for c in colours)):
        colours = None
    faces = None
    if answer.get("faces") is not None:
        raw = answer["faces"]
        if not isinstance(raw, list):
            raise bad
        faces = []
        try:
            for f in raw[:MAX_FACES]:
                box = [float(v) for v in f["box"]][:4]
                fscore = float(f["score"])
                if len(box) != 4 or not 0.0 <= fscore <= 1.0:
                    raise bad
                faces.append({"box": box, "score": fscore, "confidence": float(f.get("confidence", 0.0)),
                              "label": f.get("label") if f.get("label") in LABELS else "uncertain"})
            whole = float(answer.get("whole_score", score))
        except (KeyError, TypeError, ValueError):
            raise bad from None
    return {"result": score, "label": label, "experts": experts, "threshold": threshold,
            "model": str(answer.get("model", "?"))[:200], "heatmap": heatmap, "faces": faces,
            "heatmap_layer": layer, "heatmap_colours": colours,
            **({"whole_score": whole} if faces is not None else {}),
            "provenance": clean_provenance(answer.get("provenance")),
            "label_by": "provenance" if answer.get("label_by") == "provenance" else "model"}


def clean_model(answer: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of ``/model``: each expert's description (by name), the threshold, the uncertain band
    and how they were chosen; every string and list bounded."""
    out: dict[str, Any] = {"descriptions": {}}
    experts = answer.get("experts")
    if isinstance(experts, list):
        for e in experts[:MAX_EXPERTS]:
            if isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("description"), str):
                out["descriptions"][e["name"][:80]] = e["description"][:300]
    try:
        lo, hi = (float(v) for v in answer.get("uncertain_band", [])[:2])
        threshold = float(answer["threshold"])
        if 0.0 <= lo <= threshold <= hi <= 1.0:
            out["band"], out["threshold"] = [lo, hi], threshold
    except (KeyError, TypeError, ValueError):
        pass
    if isinstance(answer.get("threshold_rule"), str):
        out["threshold_rule"] = answer["threshold_rule"][:300]
    return out


MAX_FACTS = 20
DECLARED = {"ai_generated": "says it was generated by AI", "ai_edited": "says it was edited with AI",
            "edited": "says it was edited", "captured": "says it was captured by a camera",
            "none": "says nothing about its origin"}


def clean_provenance(raw: Any) -> dict[str, Any] | None:
    """The API's ``provenance`` object, reduced to what the page shows, every string and list bounded; None when
    the API sent none (or something the page cannot read: the verdict still shows)."""
    if not isinstance(raw, dict):
        return None
    declared = raw.get("declared") if raw.get("declared") in DECLARED else "none"
    facts = []
    for f in (raw.get("evidence") if isinstance(raw.get("evidence"), list) else [])[:MAX_FACTS]:
        if isinstance(f, dict):
            facts.append({"fact": str(f.get("fact", ""))[:300], "source": str(f.get("source", ""))[:80],
                          "signed": f.get("signed") is True})
    c2pa = raw.get("c2pa") if isinstance(raw.get("c2pa"), dict) else None
    unreadable = [str(u)[:300] for u in (raw.get("unreadable") if isinstance(raw.get("unreadable"), list)
                                         else [])[:MAX_FACTS]]
    return {"declared": declared, "says": DECLARED[declared], "evidence": facts,
            "signed": raw.get("signed") is True, "valid": raw.get("valid") if isinstance(raw.get("valid"), bool)
            else None, "trusted": raw.get("trusted") is True,
            "signer": str(c2pa.get("signer", ""))[:200] if c2pa else None,
            "claim_generator": str(c2pa.get("claim_generator", ""))[:200] if c2pa else None,
            "unreadable": unreadable}
