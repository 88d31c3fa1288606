"""Requests/s and latency of ``dfx serve`` against the reference setup, same bundle, same run.

Run by hand (not a test):  .venv/bin/python bench/api_load.py [--requests 48] [--side 1600] [--weights weights/default]
    [--reference-weights runs/default_torch]

Reference: one Flask development-server process scoring one image per request with the
competition code's per-image recipe (full decode, ToTensor → Normalize → Resize, EMA swapped in per
call; see bench/infer_speed.py). Ours: ``dfx serve`` (gunicorn, 1 worker × 4 threads, and 2 workers).
Load: threads each POSTing ``{"image": base64}`` at concurrency 1, 4 and 16. With ``--microbatch``: the
same ``dfx serve`` with and without micro-batching (``--batch-wait-ms 5`` against ``0``), side by side. Also prints the server's
resident memory before and after the load (a leak shows as growth that does not level off).
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infer_speed import make_photos  # noqa: E402  (a sibling benchmark script)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REFERENCE_APP = r'''
import sys, base64, io
from flask import Flask, request, jsonify
from PIL import Image
sys.path.insert(0, {bench!r})
from infer_speed import ReferenceScorer
from inference import Detector
scorer = ReferenceScorer(Detector({weights!r}, device="cpu"))
app = Flask("reference")

@app.post("/predict")
def predict():
    data = base64.b64decode(request.get_json()["image"])
    path = io.BytesIO(data)
    return jsonify({{"result": scorer.score(path)}})

@app.get("/healthcheck")
def health():
    return jsonify({{"healthy": True}})

app.run(host="127.0.0.1", port={port})
'''


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if requests.get(f"{url}/healthcheck", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become healthy")


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (gunicorn workers), in MB."""
    import psutil

    p = psutil.Process(pid)
    return sum(x.memory_info().rss for x in [p, *p.children(recursive=True)]) / 1e6


def load(url: str, payloads: list[str], n: int, concurrency: int) -> tuple[float, float, float, int, float]:
    """req/s, client p50 and p95 ms, errors, and the server's own p95 (``elapsed_ms`` of the answers: time inside
    the app; client latency above it is spent reaching the app, in the event loop and the request-thread queue)."""
    lat: list[float] = []
    inside: list[float] = []
    errors = 0
    lock = threading.Lock()
    local = threading.local()

    def one(i: int) -> None:
        nonlocal errors
        if not hasattr(local, "s"):
            local.s = requests.Session()
        t0 = time.perf_counter()
        r = local.s.post(f"{url}/predict", json={"image": payloads[i % len(payloads)]}, timeout=600)
        dt = time.perf_counter() - t0
        with lock:
            lat.append(dt)
            errors += r.status_code != 200
            if r.status_code == 200 and "elapsed_ms" in (body := r.json()):
                inside.append(body["elapsed_ms"])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat.sort()
    inside.sort()
    app_p95 = inside[int(0.95 * (len(inside) - 1))] if inside else float("nan")
    return n / wall, statistics.median(lat) * 1000, lat[int(0.95 * (len(lat) - 1))] * 1000, errors, app_p95


def batcher(url: str, last: int | None = None) -> dict:
    """The micro-batcher's figures from ``GET /model`` (over the ``last`` batches)."""
    q = f"?last={last}" if last else ""
    return requests.get(f"{url}/model{q}", timeout=30).json()["microbatch"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48, help="requests per concurrency level (default 48)")
    ap.add_argument("--side", type=int, default=1600, help="photo width in pixels (default 1600, a typical upload)")
    ap.add_argument("--weights", default=None, help="bundle (default: untrained convnext_atto + vit_tiny at 224)")
    ap.add_argument("--reference-weights", default=None,
                    help="the bundle the reference serves (default: --weights); e.g. the same recipe on torch fp32, "
                         "as the competition code would serve it")
    ap.add_argument("--device", default="auto", help="device for dfx serve (default auto: CUDA when there is one)")
    ap.add_argument("--microbatch", action="store_true",
                    help="compare micro-batching (--batch-wait-ms 5) with one forward per request (0), "
                         "1 worker x 16 threads, instead of the reference comparison")
    ap.add_argument("--wait-ms", default="5", help="with --microbatch: the batch waits to compare with 0, comma-separated "
                                                   "(default 5)")
    ap.add_argument("--threads", type=int, default=16, help="with --microbatch: threads of the one worker (default 16)")
    ap.add_argument("--serve-args", default="", help="more options for every dfx serve, e.g. '--torch-threads 1'")
    args = ap.parse_args()
    bench_dir = str(Path(__file__).resolve().parent)
    exe = Path(sys.executable).with_name("dfx")  # the console script, or the module where it is not installed
    dfx_cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "inference.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        weights = args.weights
        if not weights:
            from inference.bundle_init import init_bundle

            weights = str(tmp_path / "bundle")
            init_bundle(["convnext_atto", "vit_tiny_patch16_224"], weights)
        photos = make_photos(tmp_path, 8, args.side)
        payloads = [base64.b64encode(p.read_bytes()).decode() for p in photos]
        print(f"{len(payloads)} JPEGs of {args.side}x{args.side * 3 // 4}, {args.requests} requests per level, "
              f"{os.cpu_count()} CPU cores; ours serve {weights}, the reference "
              f"{args.reference_weights or weights}")

        setups = {
            "reference (flask dev server)": None,
            "dfx serve 1 worker x 4 threads": ["--workers", "1", "--threads", "4"],
            "dfx serve 2 workers x 2 threads": ["--workers", "2", "--threads", "2"],
        }
        if args.microbatch:
            t = str(args.threads)
            setups = {"per-request forward (wait 0 ms)": ["--workers", "1", "--threads", t, "--batch-wait-ms", "0"]}
            for w in (x.strip() for x in args.wait_ms.split(",") if x.strip()):
                setups[f"micro-batching (wait {w} ms)"] = ["--workers", "1", "--threads", t, "--batch-wait-ms", w]
        table: dict[str, dict[int, tuple[float, float, float, int, float]]] = {}
        batches: dict[str, dict[int, dict]] = {}
        memory: dict[str, tuple[float, float]] = {}
        for name, extra in setups.items():
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            if extra is None:
                script = tmp_path / "reference_app.py"
                script.write_text(REFERENCE_APP.format(bench=bench_dir, weights=args.reference_weights or weights,
                                                       port=port))
                proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
            else:
                proc = subprocess.Popen([*dfx_cmd, "serve", "--weights", weights, "--port", str(port),
                                         "--log-level", "warning", "--device", args.device, *extra,
                                         *args.serve_args.split()],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_healthy(url, proc)
                load(url, payloads, 4, 1)  # warm-up
                before = rss_mb(proc.pid)
                table[name], batches[name] = {}, {}
                for c in (1, 4, 16):
                    before_n = batcher(url)["batches"] if extra is not None else 0
                    table[name][c] = load(url, payloads, args.requests, c)
                    if extra is not None:
                        batches[name][c] = batcher(url, batcher(url)["batches"] - before_n)
                memory[name] = (before, rss_mb(proc.pid))
            finally:
                proc.terminate()
                proc.wait(timeout=60)

        ref = table[next(iter(setups))]
        print(f"\n{'setup':<34} {'conc':>4} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'errors':>6} {'req/s vs 1st':>12}"
              f" {'app p95':>8} {'batch':>6} {'queue p50/p95':>14} {'forward p50/p95':>16}")
        for name, rows in table.items():
            for c, (rps, p50, p95, err, app95) in rows.items():
                b = batches.get(name, {}).get(c)
                more = (f" {b['mean_recent_batch']:>6.2f} {b['queue_ms_p50']:>6.1f}/{b['queue_ms_p95']:<7.1f}"
                        f" {b['forward_ms_p50']:>7.1f}/{b['forward_ms_p95']:<8.1f}") if b else ""
                print(f"{name:<34} {c:>4} {rps:>7.2f} {p50:>8.0f} {p95:>8.0f} {err:>6} {rps / ref[c][0]:>11.2f}x"
                      f" {app95:>8.0f}{more}")
        print("\nresident memory (server + workers), MB, before -> after the load:")
        for name, (a, b) in memory.items():
            print(f"  {name:<34} {a:>7.0f} -> {b:>7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
