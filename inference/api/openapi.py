"""The OpenAPI 3 description of the JSON API (served at ``GET /openapi.json``)."""

from __future__ import annotations

from typing import Any

ERROR = {"$ref": "#/components/schemas/Error"}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "bad request (JSON, field, base64)", 401: "missing or wrong API key",
            413: "body, image or batch over its limit", 415: "unsupported content type",
            422: "not an image, or a corrupt one", 500: "failure inside the model (logged)",
            503: "model loading or unavailable"}
    return {str(c): {"description": text[c], "content": {"application/json": {"schema": ERROR}}} for c in codes}


B64 = {"type": "string", "description": "base64 image bytes, or a data:image/...;base64, URL"}
FACES = {"type": "boolean", "description": "also find faces and score each one; the image's score is the "
                                          "maximum of the whole image's and its faces'"}
EXPLAIN = {"type": "boolean", "description": "also answer 'heatmap': a PNG data URL of the image tinted by where "
                                            "the ensemble found it fake (patch and tiled experts), or "
                                            "'explain_unavailable' when no expert has a map"}


PROVENANCE = {"type": "boolean", "default": True,
              "description": "read what the file says about its origin (C2PA, IPTC/XMP, generator records) and "
                             "answer it as 'provenance' (default true; false skips it)"}


def _paths(config: Any) -> dict[str, Any]:
    """The endpoints; the batch limit comes from the running configuration."""
    b64, faces, explain, provenance = B64, FACES, EXPLAIN, PROVENANCE
    return {
        "/predict": {"post": {
            "operationId": "predict",
            "summary": "Score one image",
            "parameters": [{"name": "faces", "in": "query", "required": False, "schema": {"type": "boolean"},
                            "description": "also score each face (for multipart and raw image bodies): 1, 0, true or false; any other value is a 400"},
                           {"name": "explain", "in": "query", "required": False, "schema": {"type": "boolean"},
                            "description": "also answer a heatmap (for multipart and raw image bodies): 1, 0, true or false; any other value is a 400"},
                           {"name": "provenance", "in": "query", "required": False,
                            "schema": {"type": "boolean", "default": True},
                            "description": "read the file's evidence about itself (default 1; 0 skips it): 1, 0, true or false; any other value is a 400"}],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"type": "object", "required": ["image"],
                                                "properties": {"image": b64, "faces": faces,
                                                               "explain": explain, "provenance": provenance}}},
                "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                                   "properties": {"image": {"type": "string", "format": "binary"}}}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            }},
            "responses": {"200": {"description": "the verdict", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Prediction"}}}},
                **_errors(400, 401, 413, 415, 422, 500, 503)},
        }},
        "/predict/batch": {"post": {
            "operationId": "predictBatch",
            "summary": f"Score up to {config.max_batch} images; a bad image is an error entry",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["images"],
                "properties": {"images": {"type": "array", "items": b64, "minItems": 1,
                                          "maxItems": config.max_batch}, "faces": faces,
                               "explain": explain, "provenance": provenance}}}}},
            "responses": {"200": {"description": "one entry per image, in order", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/BatchResult"}}}},
                **_errors(400, 401, 413, 415, 500, 503)},
        }},
        "/healthcheck": {"get": {
            "operationId": "healthcheck", "summary": "Whether the model is loaded", "security": [],
            "responses": {"200": {"description": "ready", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"healthy": {"type": "boolean"}, "model": {"type": "string"}}}}}},
                "503": {"description": "loading or failed", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"healthy": {"type": "boolean"}, "status": {"type": "string"},
                                                     "error": {"type": "string", "nullable": True}}}}}}},
        }},
        "/model": {"get": {
            "operationId": "model", "summary": "The bundle: experts, threshold, provenance",
            "responses": {"200": {"description": "the bundle's description",
                                  "content": {"application/json": {"schema": {"type": "object"}}}},
                          **_errors(401, 503)},
        }},
        "/openapi.json": {"get": {
            "operationId": "openapi", "summary": "This document",
            "responses": {"200": {"description": "OpenAPI 3 document",
                                  "content": {"application/json": {"schema": {"type": "object"}}}},
                          **_errors(401)},
        }},
    }


FACT = {"type": "object", "required": ["declares", "fact", "source", "signed"], "properties": {
    "declares": {"type": "string", "enum": ["ai_generated", "ai_edited", "edited", "captured", "none"]},
    "fact": {"type": "string", "description": "for people: what was found"},
    "source": {"type": "string", "description": "where: 'C2PA manifest', 'XMP (IPTC)', \"PNG text 'parameters'\", "
                                                "'EXIF Software', ..."},
    "signed": {"type": "boolean", "description": "read from a signed C2PA manifest (see valid, trusted)"}}}
PROVENANCE_SCHEMA = {
    "type": "object", "required": ["declared", "evidence", "signed", "valid", "trusted"],
    "description": "What the file says about its own origin. Absence proves nothing (metadata is easily stripped); "
                   "a valid signature proves who signed, not that the content is true; an untrusted signer is only "
                   "a claim. The label is the pixels' unless label_by says 'provenance'.",
    "properties": {
        "declared": {"type": "string", "enum": ["ai_generated", "ai_edited", "edited", "captured", "none"],
                     "description": "the strongest class any evidence declares"},
        "declared_by": {"type": "string", "nullable": True, "description": "the source of that declaration"},
        "evidence": {"type": "array", "items": FACT},
        "signed": {"type": "boolean", "description": "a C2PA manifest is embedded"},
        "valid": {"type": "boolean", "nullable": True,
                  "description": "its signature and hashes hold (null: no manifest)"},
        "trusted": {"type": "boolean", "description": "its signer chains to a trust anchor the operator gave"},
        "c2pa": {"type": "object", "nullable": True, "properties": {
            "validation_state": {"type": "string", "enum": ["Trusted", "Valid", "Invalid"]},
            "claim_generator": {"type": "string"}, "signer": {"type": "string"},
            "signed_at": {"type": "string", "nullable": True},
            "failures": {"type": "array", "items": {"type": "string"}},
            "actions": {"type": "array", "items": {"type": "object"}},
            "ingredients": {"type": "array", "items": {"type": "object"}}}},
        "unreadable": {"type": "array", "items": {"type": "string"},
                       "description": "what could not be read, and why (bounds, damaged metadata)"}}}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
    "Prediction": {"type": "object", "required": ["result", "label", "experts"], "properties": {
        "result": {"type": "number", "minimum": 0, "maximum": 1, "description": "fake probability"},
        "label": {"type": "string", "enum": ["fake", "real", "uncertain"]},
        "experts": {"type": "object", "additionalProperties": {"type": "number"}},
        "threshold": {"type": "number"}, "model": {"type": "string"}, "elapsed_ms": {"type": "number"},
        "whole_score": {"type": "number", "description": "with faces: the whole image's score"},
        "face_count": {"type": "integer"}, "face_rule": {"type": "string"},
        "heatmap": {"type": "string", "description": "with explain: data:image/png;base64,... (image, "
                                                     "colour map, colour bar, score, label)"},
        "heatmap_layer": {"type": "string", "description": "with explain: data:image/png;base64,... the coloured map "
                                                           "alone (RGBA, transparent where no expert looked), at the "
                                                           "image's aspect, to lay over the image"},
        "heatmap_colours": {"type": "array", "items": {"type": "string"},
                            "description": "with explain: the colour scale's stops from 0 (real) to 1 (fake)"},
        "explained_by": {"type": "array", "items": {"type": "string"},
                         "description": "with explain: the experts whose maps the heatmap averages"},
        "explain_unavailable": {"type": "string", "description": "with explain: why there is no heatmap"},
        "label_by": {"type": "string", "enum": ["model", "provenance"],
                     "description": "with provenance: who decided the label; 'provenance' only under the operator's "
                                    "rule trusted_c2pa, for a valid AI declaration by a trusted signer"},
        "provenance": PROVENANCE_SCHEMA,
        "faces": {"type": "array", "items": {"type": "object", "properties": {
            "box": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                    "description": "x1, y1, x2, y2 in pixels of the image as shown (EXIF rotation applied)"},
            "confidence": {"type": "number"}, "score": {"type": "number"},
            "label": {"type": "string"},
            "landmarks": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
            "experts": {"type": "object", "additionalProperties": {"type": "number"}}}}}}},
    "BatchResult": {"type": "object", "required": ["results"], "properties": {
        "results": {"type": "array", "items": {"oneOf": [
            {"$ref": "#/components/schemas/Prediction"}, {"$ref": "#/components/schemas/Error"}]}},
        "threshold": {"type": "number"}, "model": {"type": "string"}, "elapsed_ms": {"type": "number"}}},
}


def openapi_spec(config: Any) -> dict[str, Any]:
    """Build the document; limits come from the running configuration."""
    secured = bool(getattr(config, "api_key", None))
    spec: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "deepfake-experts API", "version": "1",
                 "description": "Scores images: the probability that each is generated or manipulated. "
                                "POST /predict {\"image\": \"<base64>\"} answers {\"result\": p, ...}."},
        "paths": _paths(config),
        "components": {"schemas": SCHEMAS},
    }
    if secured:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{"bearer": []}]
    return spec
