"""gunicorn set up the way both services need it: asyncio workers, buffered requests, JSON errors.

Each worker process runs gunicorn's asyncio (ASGI) worker: connections are read by an event loop, so slow
or stalled clients cannot take the request threads (see serving.bridge), and every answer gunicorn gives
on its own (400 for a malformed request, 431 for oversized headers) is the projects' JSON error shape
instead of plain text. The master process restarts dead workers, recycles them after ``max_requests``, and
on SIGTERM lets requests in flight finish (``graceful_timeout``).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from gunicorn.app.base import BaseApplication
from gunicorn.asgi.protocol import ASGIProtocol
from gunicorn.workers import gasgi

from .bridge import BufferedWSGI

ERROR_CODES = {400: "bad_request", 408: "request_timeout", 413: "payload_too_large", 414: "uri_too_long",
               431: "headers_too_large"}


class JsonErrorProtocol(ASGIProtocol):
    """gunicorn's HTTP protocol, answering its own errors as ``{"error": {"code", "message"}}``."""

    def _send_error_response(self, status, message, extra_headers=()):  # noqa: ANN001 (gunicorn's signature)
        body = json.dumps({"error": {"code": ERROR_CODES.get(status, "http_error"),
                                     "message": str(message) or "bad request"}}).encode()
        reason = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long",
                  431: "Request Header Fields Too Large"}.get(status, "Error")
        extra = "".join(f"{name}: {value}\r\n" for name, value in extra_headers)
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"{extra}Connection: close\r\n\r\n")
        self._safe_write(head.encode("latin-1"))
        self._safe_write(body)


class Worker(gasgi.ASGIWorker):
    """gunicorn's asyncio worker with :class:`JsonErrorProtocol` (gunicorn builds its protocol from this
    module-level name in ``gunicorn.workers.gasgi``; the worker process is ours alone)."""

    def init_process(self) -> None:
        gasgi.ASGIProtocol = JsonErrorProtocol
        super().init_process()


def run(make_app: Callable[[], Any], *, bind: str, workers: int, threads: int, max_body_bytes: int,
        timeout: int, name: str, log_level: str = "info", max_requests: int = 0, body_timeout: float = 60.0,
        connections: int = 1000, on_worker_start: Callable[[], None] | None = None) -> None:
    """Serve the WSGI app that ``make_app()`` builds (once per worker process) until SIGTERM/SIGINT.

    ``threads`` request threads per worker run the app on complete requests; ``connections`` open
    connections per worker are read by the event loop (slow ones cost a coroutine each).
    """

    class _App(BaseApplication):
        def load_config(self) -> None:
            for key, value in {
                "bind": bind, "workers": workers, "worker_class": "serving.server.Worker",
                "worker_connections": connections, "timeout": timeout, "graceful_timeout": 30,
                "max_requests": max_requests, "max_requests_jitter": max(0, max_requests // 10),
                "loglevel": log_level, "accesslog": None, "errorlog": "-", "backlog": 2048,
                "proc_name": name, "asgi_lifespan": "on", "keepalive": 5,
                # gunicorn >= 25 opens a control socket at one fixed path per user; two servers would clash.
                "control_socket_disable": True,
            }.items():
                if key in self.cfg.settings:
                    self.cfg.set(key, value)

        def load(self) -> BufferedWSGI:  # in each worker
            if on_worker_start:
                on_worker_start()
            return BufferedWSGI(make_app(), max_body_bytes=max_body_bytes, threads=threads,
                                body_timeout=body_timeout)

    _App().run()
