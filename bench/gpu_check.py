"""GPU check of the deployable core (run by hand on a machine with CUDA; prints figures, not a test).

    python3 bench/gpu_check.py [--weights weights/default] [--n 64]

Scores the same photo-like JPEGs (made here, 2048×1536) on the CPU and on CUDA in fp32 and bf16, through the
real Detector and the resumable shard writer, and prints the largest score differences and images/s per
precision (decode included; DataLoader workers decode). Needs torch, timm, safetensors, Pillow, NumPy, tqdm.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from inference.detector import Detector  # noqa: E402
from inference.sharded import World, score_to_parts  # noqa: E402


def photos(out: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1536, 0:2048]
    paths = []
    for i in range(n):
        base = np.stack([(xx * (i + 1)) % 256, (yy * 3 + i * 7) % 256, (xx + yy) % 256], -1).astype(np.float32)
        img = np.clip(base * 0.7 + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
        p = out / f"p{i:03d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


def rate(det: Detector, paths: list[Path], workers: int) -> tuple[float, np.ndarray]:
    list(det.predict_paths(paths[:8], workers=workers))  # warm-up (cuDNN autotune, allocator)
    if det.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = list(det.predict_paths(paths, workers=workers))
    if det.device.type == "cuda":
        torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - t0), np.array([r.prediction.score for r in res])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="weights/default")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--workers", type=int, default=min(8, (os.cpu_count() or 2) - 1))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here; nothing to check")
        return 0
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores")
    with tempfile.TemporaryDirectory() as tmp:
        paths = photos(Path(tmp), args.n)
        cpu_rate, cpu = rate(Detector(args.weights, device="cpu", batch_size=16), paths, args.workers)
        print(f"cpu  fp32: {cpu_rate:7.1f} img/s")
        for precision in ("fp32", "bf16", "fp16"):
            det = Detector(args.weights, device="cuda", batch_size=32, precision=precision)
            r, s = rate(det, paths, args.workers)
            print(f"cuda {precision}: {r:7.1f} img/s, max |score - cpu fp32| {np.abs(s - cpu).max():.2e}")
        det = Detector(args.weights, device="cuda", batch_size=32)
        out = Path(tmp) / "scores.csv"
        results = score_to_parts(det, paths, out, world=World(), resume=False, workers=args.workers, progress=False,
                                 desc="shards")
        sharded = np.array([r.prediction.score for r in results])
        print(f"cuda shards: {len(results)} rows, max |score - cpu fp32| {np.abs(sharded - cpu).max():.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
