"""``dfx webui``: the upload site under gunicorn (serving.server). It imports nothing of the model: it calls the
API over HTTP."""

from __future__ import annotations

import argparse
import os
import sys


def _env(name: str, default):
    return os.environ.get(f"DFX_{name}", default)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("webui", help="serve the upload web page (talks to `dfx serve` over HTTP)",
                       description="Serve the web page where people upload an image and see the verdict. It calls the "
                                   "JSON API at --api-url. Every option also reads an environment variable (brackets).")
    p.add_argument("--api-url", default=_env("API_URL", "http://127.0.0.1:8080"),
                   help="base URL of `dfx serve` [DFX_API_URL] (default http://127.0.0.1:8080)")
    p.add_argument("--api-key", default=_env("API_KEY", None),
                   help="bearer key for the API [DFX_API_KEY] (prefer the variable: a command line is visible to all)")
    p.add_argument("--host", default=_env("WEBUI_HOST", "127.0.0.1"), help="address to bind [DFX_WEBUI_HOST]")
    p.add_argument("--port", type=int, default=int(_env("WEBUI_PORT", 1234)), help="port [DFX_WEBUI_PORT] (default 1234)")
    p.add_argument("--timeout", type=float, default=float(_env("API_TIMEOUT", 30)),
                   help="seconds to wait for the API [DFX_API_TIMEOUT] (default 30)")
    p.add_argument("--max-upload-mb", type=float, default=float(_env("MAX_UPLOAD_MB", 10)),
                   help="largest upload in MiB [DFX_MAX_UPLOAD_MB] (default 10)")
    p.add_argument("--max-megapixels", type=float, default=float(_env("MAX_MEGAPIXELS", 40)),
                   help="largest image in megapixels [DFX_MAX_MEGAPIXELS] (default 40)")
    p.add_argument("--max-files", type=int, default=int(_env("MAX_FILES", 20)),
                   help="images per check at most [DFX_MAX_FILES] (default 20)")
    p.add_argument("--max-total-mb", type=float, default=float(_env("MAX_TOTAL_MB", 64)),
                   help="one check's upload at most, all files together [DFX_MAX_TOTAL_MB] (default 64)")
    p.add_argument("--concurrency", type=int, default=int(_env("CONCURRENCY", 3)),
                   help="API calls at once for one check [DFX_CONCURRENCY] (default 3)")
    p.add_argument("--workers", type=int, default=int(_env("WEBUI_WORKERS", 2)), help="[DFX_WEBUI_WORKERS] (default 2)")
    p.add_argument("--threads", type=int, default=int(_env("WEBUI_THREADS", 4)), help="[DFX_WEBUI_THREADS] (default 4)")
    p.set_defaults(func=_webui)


def _webui(args: argparse.Namespace) -> int:
    import logging


    from .app import WebConfig, create_app

    cfg = WebConfig(api_url=args.api_url, api_key=args.api_key or None, timeout=args.timeout,
                    max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=int(args.max_megapixels * 1e6),
                    max_files=args.max_files, max_total_bytes=int(args.max_total_mb * 1024 * 1024),
                    concurrency=args.concurrency)

    print(f"web UI on http://{args.host}:{args.port} using the API at {args.api_url}", file=sys.stderr, flush=True)
    from serving.server import run

    def worker_logging() -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")

    # The body limit leaves room for the multipart envelope; the exact per-file limit is the app's.
    # a check without JavaScript sends all its files at once: its API calls run `concurrency` at a time
    rounds = -(-cfg.max_files // max(1, cfg.concurrency))
    run(lambda: create_app(cfg), bind=f"{args.host}:{args.port}", workers=args.workers, threads=args.threads,
        max_body_bytes=cfg.max_total_bytes + 64 * 1024, timeout=int(args.timeout) * rounds + 30, name="dfx-webui",
        on_worker_start=worker_logging)
    return 0
