"""Images/s of two bundles side by side on the same photo-sized JPEGs (the whole Detector path: decode,
preprocess, forward), interleaved rounds, best of each.

Run by hand (not a test):  .venv/bin/python bench/bundle_speed.py OLD_BUNDLE NEW_BUNDLE [--n 16] [--side 4032]
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

from inference import Detector  # noqa: E402
from inference.detector import default_workers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infer_speed import make_photos  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs=2)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--side", type=int, default=4032)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=default_workers())
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        photos = make_photos(Path(tmp), args.n, args.side)
        dets = [Detector(b, device="cpu", batch_size=8) for b in args.bundles]
        best = [0.0, 0.0]
        for _ in range(args.rounds):
            for i, det in enumerate(dets):
                t0 = time.perf_counter()
                results = list(det.predict_paths(photos, workers=args.workers))
                assert all(r.ok for r in results)
                best[i] = max(best[i], len(photos) / (time.perf_counter() - t0))
    for b, ips in zip(args.bundles, best):
        print(f"{b}: {ips:.2f} img/s")
    print(f"ratio {best[1] / best[0]:.2f}x ({args.n} JPEGs of {args.side}x{args.side * 3 // 4}, best of {args.rounds})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
