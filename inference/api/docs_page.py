"""``GET /docs``: Swagger UI over the API's own ``/openapi.json``, for people who want to click through the API.

The page and its scripts come from the ``swagger-ui-bundle`` package (Swagger UI's release files in a wheel) and
are served by the API itself: no CDN, and a Content-Security-Policy of ``'self'`` so the page cannot reach anything
but this server (Swagger UI's online validator badge is off). The page is static and holds no data, so it answers
without the API key; with ``DFX_API_KEY`` set it asks for the key, keeps it in the tab's sessionStorage and sends it
as ``Authorization: Bearer`` with the description and every "Try it out" request, exactly as any client must.
``dfx serve --no-docs`` (``DFX_DOCS=0``) turns it off for deployments that want no HTML on the API.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from flask import Response, request, send_from_directory

PREFIX = "/docs"
#: The Swagger UI release files the page uses (the package holds more: source maps, the ES bundles)
ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png", "favicon-16x16.png")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")

INIT_JS = """(function () {
  var page = document.getElementById("dfx-docs");
  var keyed = page.dataset.auth === "on";
  var root = page.dataset.root;
  function key() { return sessionStorage.getItem("dfx-api-key") || ""; }
  function start() {
    window.ui = SwaggerUIBundle({
      url: root + "/openapi.json", dom_id: "#swagger-ui", validatorUrl: null, deepLinking: true,
      requestInterceptor: function (req) {
        var k = key();
        if (k) { req.headers.Authorization = "Bearer " + k; }
        return req;
      }
    });
  }
  if (!keyed) { start(); return; }
  var form = document.getElementById("dfx-key");
  form.hidden = false;
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    sessionStorage.setItem("dfx-api-key", document.getElementById("dfx-key-input").value);
    start();
  });
  if (key()) { start(); }
})();
"""


def assets_dir() -> Path | None:
    """Where the installed ``swagger-ui-bundle`` keeps Swagger UI's files, or None when it is not installed."""
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    path = Path(swagger_ui_bundle.swagger_ui_path)
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def is_docs_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/static/")


def _secure(resp: Response) -> Response:
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    return resp


def page(auth: bool) -> Response:
    """The HTML page (Swagger UI mounts itself into ``#swagger-ui``)."""
    root = escape(request.script_root or "", quote=True)
    html = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>deepfake-experts API</title>
  <link rel="stylesheet" href="{root}{PREFIX}/static/swagger-ui.css">
  <link rel="icon" type="image/png" href="{root}{PREFIX}/static/favicon-32x32.png">
</head>
<body>
  <main id="dfx-docs" data-auth="{'on' if auth else 'off'}" data-root="{root}">
    <form id="dfx-key" hidden style="margin: 1em 2em">
      <label for="dfx-key-input">This API needs its key (sent as <code>Authorization: Bearer</code>):</label>
      <input id="dfx-key-input" type="password" autocomplete="off" required>
      <button type="submit">Show the API</button>
    </form>
    <div id="swagger-ui"></div>
  </main>
  <script src="{root}{PREFIX}/static/swagger-ui-bundle.js"></script>
  <script src="{root}{PREFIX}/static/dfx-init.js"></script>
</body>
</html>
"""
    return _secure(Response(html, mimetype="text/html"))


def asset(name: str) -> Response | None:
    """One of Swagger UI's files, or the page's own start-up script; None for anything else."""
    if name == "dfx-init.js":
        return _secure(Response(INIT_JS, mimetype="text/javascript"))
    folder = assets_dir()
    if folder is None or name not in ASSETS:
        return None
    resp = send_from_directory(folder, name, max_age=3600)
    return _secure(resp)
