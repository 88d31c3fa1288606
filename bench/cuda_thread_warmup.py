"""Does a CUDA warm-up in one thread warm another thread? (run by hand on a GPU; prints figures, not a test)

    python3 bench/cuda_thread_warmup.py [--sizes 1,2,4,8,16]

Builds the untrained ConvNeXt-atto + ViT-tiny bundle that bench/api_load.py serves, warms every batch size in
the main thread (Detector.warm_up), then times the first and second forward of each size in the main thread and
in a fresh thread. If the fresh thread's first forwards are slow, per-thread caches (cuDNN's execution plans)
were not shared, and a server must warm up in the thread that scores (inference/microbatch.py does).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from inference.bundle_init import init_bundle  # noqa: E402
from inference.detector import Detector  # noqa: E402


def timed(det: Detector, item: dict, size: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    det._score_batch([item] * size)
    return (time.perf_counter() - t0) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,2,4,8,16")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        init_bundle(["convnext_atto", "vit_tiny_patch16_224"], f"{tmp}/b")
        det = Detector(f"{tmp}/b", device="cuda")
        det.warm_up(max(sizes))
        item = {e.preprocess_key: torch.rand(3, e.input_size, e.input_size) for e in det.spec.experts}
        rows: dict[str, list[tuple[float, float]]] = {"main thread (warmed)": [], "fresh thread": []}
        for size in sizes:
            rows["main thread (warmed)"].append((timed(det, item, size), timed(det, item, size)))

        def other() -> None:
            for size in sizes:
                rows["fresh thread"].append((timed(det, item, size), timed(det, item, size)))

        t = threading.Thread(target=other)
        t.start()
        t.join()
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; first / second forward in ms")
        print(f"{'thread':<22}" + "".join(f"{'batch ' + str(s):>16}" for s in sizes))
        for name, vals in rows.items():
            print(f"{name:<22}" + "".join(f"{a:>8.1f}/{b:<7.1f}" for a, b in vals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
