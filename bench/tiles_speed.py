"""What native-resolution tiles cost at inference: images/s of squash vs tiles vs a residual tiled expert.

Run by hand (not a test):  .venv/bin/python bench/tiles_speed.py [--n 24] [--side 2048]

Three untrained one-expert bundles with the same backbone (convnext_atto), scored side by side in one
run on the same photo-sized JPEGs, interleaved over three rounds (the machine is shared and noisy):
- ``squash 128``: the whole image resized to 128×128 (JPEGs decoded at reduced DCT scale);
- ``tiles 96×9``: nine 96-px crops at native resolution (decoded in full), probabilities averaged;
- ``npr tiles 96×9``: the same behind the NPR residual stem.
Prints images/s, the ratio to squash, and the per-image preprocessing time of each.
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
from inference.bundle_init import init_bundle  # noqa: E402

from infer_speed import make_photos  # noqa: E402  (bench/ is on sys.path when run as a script)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--side", type=int, default=2048, help="long side of the test JPEGs (default 2048)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        photos = make_photos(t, args.n, args.side)
        setups = {
            "squash 128": dict(input_size=128, preprocess="squash"),
            "tiles 96x9": dict(input_size=96, preprocess="tiles", crops=9),
            "npr tiles 96x9": dict(input_size=96, preprocess="tiles", crops=9, stem="npr"),
        }
        dets = {}
        for i, (name, kw) in enumerate(setups.items()):
            init_bundle(["convnext_atto"], t / f"b{i}", seed=0, **kw)
            dets[name] = Detector(t / f"b{i}", device="cpu", batch_size=8)
        times = {n: [] for n in dets}
        prep = {n: [] for n in dets}
        for _ in range(args.rounds):
            for name, det in dets.items():
                start = time.perf_counter()
                prepared = [det.prepare(p) for p in photos]
                mid = time.perf_counter()
                det.score_prepared(prepared)
                end = time.perf_counter()
                times[name].append(end - start)
                prep[name].append((mid - start) / len(photos))
        base = len(photos) / min(times["squash 128"])
        print(f"{len(photos)} JPEGs of {args.side}x{args.side * 3 // 4}, best of {args.rounds} rounds, 2-core CPU")
        print(f"{'setup':<16} {'img/s':>7} {'vs squash':>10} {'prep ms/img':>12}")
        for name in dets:
            ips = len(photos) / min(times[name])
            print(f"{name:<16} {ips:7.2f} {ips / base:9.2f}x {1000 * min(prep[name]):12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
