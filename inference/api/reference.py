"""The API reference as Markdown, rendered from the OpenAPI document the API serves (``GET /openapi.json``).

The docs site's "API reference" page is :func:`api_reference` of :func:`inference.api.openapi.openapi_spec`, the
very function behind ``/openapi.json`` (``mkdocs_hooks.py``), so the page cannot drift from the API; a running API
also renders it for people at ``/docs`` (Swagger UI).
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

METHODS = ("get", "post", "put", "patch", "delete")


def _ref_name(schema: dict[str, Any]) -> str | None:
    ref = schema.get("$ref", "")
    return ref.rsplit("/", 1)[-1] if ref else None


def _type(schema: dict[str, Any]) -> str:
    """A schema in a few words: ``Prediction``, ``string (binary)``, ``array of Prediction``, ..."""
    if name := _ref_name(schema):
        return f"[{name}](#{name.lower()})"
    if "oneOf" in schema:
        return " or ".join(_type(s) for s in schema["oneOf"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if schema.get("format"):
        return f"{kind} ({schema['format']})"
    return kind


def _text(value: Any) -> str:
    """Prose from the document as Markdown shows it literally (``<base64>`` is text, not a tag; no table breaks)."""
    return escape(str(value or ""), quote=False).replace("|", "/").replace("\n", " ")


def _properties(schema: dict[str, Any]) -> list[str]:
    props, required = schema.get("properties", {}), set(schema.get("required", []))
    if not props:
        return []
    rows = ["| field | type | required | description |", "| --- | --- | --- | --- |"]
    for name, p in props.items():
        text = _text(p.get("description"))
        if "default" in p:
            text = f"{text} (default {json.dumps(p['default'])})".strip()
        rows.append(f"| `{name}` | {_type(p)} | {'yes' if name in required else ''} | {text} |")
    return rows


def api_reference(spec: dict[str, Any]) -> str:
    """Markdown for every path and method of ``spec`` (parameters, bodies by content type, responses), then every
    schema under ``components``."""
    info = spec.get("info", {})
    lines = [f"# API reference: {info.get('title', 'API')}", "",
             f"Rendered from the OpenAPI {spec.get('openapi', '')} document the API serves at `GET /openapi.json` "
             "(the same function builds both); a running API shows it interactively at `/docs`.", "",
             _text(info.get("description")), ""]
    if spec.get("security"):
        lines += ["Every endpoint but `/healthcheck` needs `Authorization: Bearer <key>`.", ""]
    lines += ["| method | path | summary |", "| --- | --- | --- |"]
    for path, ops in spec.get("paths", {}).items():
        for method in METHODS:
            if method in ops:
                op = ops[method]
                lines.append(f"| {method.upper()} | [`{path}`](#{op.get('operationId', path).lower()}) | "
                             f"{_text(op.get('summary'))} |")
    lines.append("")
    for path, ops in spec.get("paths", {}).items():
        for method in METHODS:
            if method not in ops:
                continue
            op = ops[method]
            lines += [f"## `{method.upper()} {path}` {{#{op.get('operationId', path).lower()}}}", "",
                      _text(op.get("summary")), ""]
            if op.get("description"):
                lines += [_text(op["description"]), ""]
            params = op.get("parameters", [])
            if params:
                lines += ["| parameter | in | type | description |", "| --- | --- | --- | --- |"]
                lines += [f"| `{p['name']}` | {p['in']} | {_type(p.get('schema', {}))} | "
                          f"{_text(p.get('description'))} |" for p in params]
                lines.append("")
            body = op.get("requestBody")
            if body:
                lines += ["**Request body**" + (" (required)" if body.get("required") else "") + ":", ""]
                for ctype, media in body.get("content", {}).items():
                    schema = media.get("schema", {})
                    lines += [f"- `{ctype}`: {_type(schema)}"]
                    rows = _properties(schema)
                    if rows:
                        lines += ["", *["  " + r for r in rows], ""]
                lines.append("")
            lines += ["**Responses**:", "", "| status | description | body |", "| --- | --- | --- |"]
            for status, resp in op.get("responses", {}).items():
                media = resp.get("content", {})
                shown = ", ".join(f"`{c}` {_type(m.get('schema', {}))}" for c, m in media.items())
                lines.append(f"| {status} | {_text(resp.get('description'))} | {shown} |")
            lines.append("")
    schemas = spec.get("components", {}).get("schemas", {})
    if schemas:
        lines += ["## Schemas", ""]
        for name, schema in schemas.items():
            lines += [f"### {name} {{#{name.lower()}}}", ""]
            if schema.get("description"):
                lines += [_text(schema["description"]), ""]
            rows = _properties(schema)
            lines += (rows + [""]) if rows else [f"{_type(schema)}", ""]
    return "\n".join(lines)
