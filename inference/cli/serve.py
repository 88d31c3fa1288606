"""``dfx serve``: the JSON API under gunicorn (a production server, never Flask's dev server).

Each gunicorn worker is a process with its own Detector (workers share nothing but the weights on
disk). Connections are read by the worker's asyncio event loop and a request reaches one of its
``--threads`` request threads only when it is complete (serving.bridge), so slow or stalled clients
cannot starve the service. Workers are recycled after ``--max-requests`` (with jitter) so
memory stays bounded over weeks. SIGTERM stops gracefully: requests in flight finish first.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..images import DEFAULT_MAX_PIXELS


def _env(name: str, default: Any) -> Any:
    return os.environ.get(f"DFX_{name}", default)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the JSON API (gunicorn)",
                       description="Serve the JSON API under gunicorn. Every option also reads an environment "
                                   "variable (shown in brackets). The API key comes only from DFX_API_KEY (a "
                                   "command line is visible to every user of the machine); when it is set every "
                                   "endpoint but /healthcheck needs 'Authorization: Bearer <key>'.")
    p.add_argument("--weights", default=_env("WEIGHTS", None),
                   help="bundle folder [DFX_WEIGHTS] (default: weights/default)")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="address to bind [DFX_HOST] (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(_env("PORT", 8080)), help="port [DFX_PORT] (default 8080)")
    p.add_argument("--workers", type=int, default=int(_env("WORKERS", 1)),
                   help="worker processes, each with its own model [DFX_WORKERS] (default 1)")
    p.add_argument("--threads", type=int, default=int(_env("THREADS", 4)),
                   help="request threads per worker; decoding runs in parallel, forwards one at a time "
                        "[DFX_THREADS] (default 4)")
    p.add_argument("--device", default=_env("DEVICE", "auto"), help="auto, cpu, cuda, cuda:N [DFX_DEVICE]")
    p.add_argument("--batch-size", type=int, default=int(_env("BATCH_SIZE", 32)),
                   help="largest forward batch: a /predict/batch request, or concurrent requests gathered by "
                        "micro-batching [DFX_BATCH_SIZE] (default 32)")
    p.add_argument("--batch-wait-ms", type=float, default=_env("BATCH_WAIT_MS", None),
                   help="micro-batching: gather concurrent requests for at most this long (only while others "
                        "are still decoding, so a lone request never waits) and score them in one forward; "
                        "0 = one forward per request. Default: 5 on CUDA (2.0x req/s at 16 clients on an H100), "
                        "0 on CPU (1.23-1.45x at 16 clients on 2 cores, up to 16%% slower for one client) "
                        "[DFX_BATCH_WAIT_MS]")
    p.add_argument("--torch-threads", type=int, default=int(_env("TORCH_THREADS", 0)),
                   help="PyTorch CPU threads per worker; on a GPU server 1 is faster (the request threads "
                        "preprocess in parallel; README) [DFX_TORCH_THREADS] (default 0: the cores divided by the "
                        "workers)")
    p.add_argument("--max-body-mb", type=float, default=float(_env("MAX_BODY_MB", 20)),
                   help="largest request body in MiB; larger gets 413 [DFX_MAX_BODY_MB] (default 20)")
    p.add_argument("--max-pixels", type=int, default=int(_env("MAX_PIXELS", DEFAULT_MAX_PIXELS)),
                   help=f"largest image in pixels; larger gets 413 [DFX_MAX_PIXELS] (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--max-batch", type=int, default=int(_env("MAX_BATCH", 32)),
                   help="most images per /predict/batch request [DFX_MAX_BATCH] (default 32)")
    p.add_argument("--timeout", type=int, default=int(_env("TIMEOUT", 120)),
                   help="seconds before a stuck worker is restarted [DFX_TIMEOUT] (default 120)")
    p.add_argument("--max-requests", type=int, default=int(_env("MAX_REQUESTS", 10000)),
                   help="recycle a worker after this many requests, 0 = never [DFX_MAX_REQUESTS] (default 10000)")
    p.add_argument("--read-timeout", type=float, default=float(_env("READ_TIMEOUT", 60)),
                   help="seconds a client has to send a request body; then 408 [DFX_READ_TIMEOUT] (default 60)")
    p.add_argument("--connections", type=int, default=int(_env("CONNECTIONS", 1000)),
                   help="open connections per worker, read by its event loop (slow clients cost no thread) "
                        "[DFX_CONNECTIONS] (default 1000)")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"), help="debug, info, warning [DFX_LOG_LEVEL]")
    p.add_argument("--trust-anchors", metavar="PEM", default=_env("TRUST_ANCHORS", None),
                   help="CA certificates (PEM, the C2PA trust list format) whose C2PA signers are trusted "
                        "[DFX_TRUST_ANCHORS] (default: none; no signer is trusted)")
    p.add_argument("--provenance-rule", choices=("none", "trusted_c2pa"), default=_env("PROVENANCE_RULE", None),
                   help="none: labels are always the pixels'; trusted_c2pa: a valid C2PA manifest declaring AI "
                        "generation by a trusted signer makes the label fake (the answer says so) "
                        "[DFX_PROVENANCE_RULE] (default: the bundle's rule)")
    p.add_argument("--no-docs", dest="docs", action="store_false", default=_env("DOCS", "1") not in ("0", "false"),
                   help="no /docs page (Swagger UI over /openapi.json) for deployments that want no HTML on the API "
                        "[DFX_DOCS=0]")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import logging

    from ..api import ApiConfig, create_app
    from ..bundle import check_files, read_spec
    from ..weights import resolve_weights

    weights = resolve_weights(args.weights)
    spec = read_spec(weights)  # fail fast, before any worker starts, on a bad bundle
    check_files(weights, spec)
    from ..provenance import load_anchors

    load_anchors(args.trust_anchors)  # fail fast on a file that holds no certificate
    cores = os.cpu_count() or 1
    config = ApiConfig(weights=str(weights), device=args.device, batch_size=args.batch_size,
                       max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_pixels=args.max_pixels,
                       max_batch=args.max_batch, api_key=os.environ.get("DFX_API_KEY") or None,
                       torch_threads=args.torch_threads or max(1, cores // max(1, args.workers)), 
                       batch_wait_ms=None if args.batch_wait_ms is None else float(args.batch_wait_ms),
                       provenance_rule=args.provenance_rule, trust_anchors=args.trust_anchors, docs=args.docs)
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    logging.getLogger("dfx").setLevel(level)
    logging.getLogger("inference").setLevel(level)

    print(f"serving {spec.name} from {weights} on http://{args.host}:{args.port} "
          f"({args.workers} worker(s) x {args.threads} threads; auth {'on' if config.api_key else 'off'}; "
          f"provenance rule {args.provenance_rule or spec.provenance_rule}"
          f"{'' if args.trust_anchors else ', no trust anchors'})",
          file=sys.stderr, flush=True)
    from serving.server import run

    def worker_logging() -> None:
        logging.basicConfig(level=level, format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")

    run(lambda: create_app(config), bind=f"{args.host}:{args.port}", workers=args.workers, threads=args.threads,
        max_body_bytes=config.max_body_bytes, timeout=args.timeout, name="dfx-serve", log_level=args.log_level,
        max_requests=args.max_requests, body_timeout=args.read_timeout, connections=args.connections,
        on_worker_start=worker_logging)
    return 0
