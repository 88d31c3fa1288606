"""Run a WSGI app (Flask) on complete requests only, from gunicorn's asyncio worker.

Why: under gunicorn's threaded worker a request thread reads the request itself, so ten clients that send
one header line every few seconds (or trickle a declared body) hold every thread and the service stops
answering, even ``/healthcheck``. Here an asyncio event loop reads headers and bodies (a slow client costs
one idle coroutine, not a thread), and a request reaches the app's thread pool only once its body is
complete. The body is refused with 413 as soon as it passes the limit (declared or chunked: it is never
truncated into something else), and with 408 if it does not arrive within ``body_timeout`` seconds.

This module imports nothing of the project, so the API (``inference``) and the web page (``webui``) both
use it without importing each other.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Iterable

log = logging.getLogger("dfx.serving")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


def json_error_body(status: int, code: str, message: str) -> bytes:
    """The project's error shape: ``{"error": {"code", "message"}}``."""
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class BufferedWSGI:
    """An ASGI app that buffers each request, then runs ``app`` (WSGI) on it in a pool of ``threads``."""

    def __init__(self, app: Callable[..., Iterable[bytes]], *, max_body_bytes: int, threads: int,
                 body_timeout: float = 60.0) -> None:
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.body_timeout = float(body_timeout)
        self.executor = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="dfx-request")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets: not served
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._error(send, 413, "payload_too_large",
                              f"request body is over the limit of {self.max_body_bytes:,} bytes")
            return
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.body_timeout)
        except _TooLarge:
            await self._error(send, 413, "payload_too_large",
                              f"request body is over the limit of {self.max_body_bytes:,} bytes")
            return
        except asyncio.TimeoutError:
            await self._error(send, 408, "request_timeout",
                              f"the request body did not arrive within {self.body_timeout:g} seconds")
            return
        except _Disconnected:
            return
        loop = asyncio.get_running_loop()
        status, headers, chunks = await loop.run_in_executor(self.executor, self._run_wsgi, scope, body)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"".join(chunks)})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.executor.shutdown(wait=False, cancel_futures=False)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _read_body(self, receive: Receive) -> bytes:
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _error(self, send: Send, status: int, code: str, message: str) -> None:
        body = json_error_body(status, code, message)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    def _run_wsgi(self, scope: Scope, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], list[bytes]]:
        """Call the WSGI app in a pool thread; returns status, headers and the whole (small) response body."""
        environ = wsgi_environ(scope, body)
        started: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            started["status"], started["headers"] = status, headers
            return lambda data: chunks.append(data)

        chunks: list[bytes] = []
        try:
            result = self.app(environ, start_response)
            try:
                chunks.extend(result)
            finally:
                close = getattr(result, "close", None)
                if close:
                    close()
        except Exception:  # the app's own handlers answer errors; this is a bug below them
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            body = json_error_body(500, "internal_error", "internal error; it is logged")
            return 500, [(b"content-type", b"application/json")], [body]
        status = int(str(started.get("status", "500")).split()[0])
        headers = [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in started.get("headers", [])]
        return status, headers, chunks


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def wsgi_environ(scope: Scope, body: bytes) -> dict[str, Any]:
    """The PEP 3333 environ of an ASGI HTTP scope whose body has been read in full (so CONTENT_LENGTH is
    exact and a chunked request looks like any other to the app)."""
    server = scope.get("server") or ("127.0.0.1", 80)
    client = scope.get("client") or ("", 0)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "").encode("utf-8").decode("latin-1"),
        "PATH_INFO": scope["path"].encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "REMOTE_ADDR": str(client[0]),
        "REMOTE_PORT": str(client[1]),
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for raw_name, raw_value in scope.get("headers", []):
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if name in ("content-length", "transfer-encoding") or "_" in name:
            continue  # the body is complete; names with '_' could pose as other headers in the environ
        if name == "content-type":
            environ["CONTENT_TYPE"] = value
            continue
        key = "HTTP_" + name.upper().replace("-", "_")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ
