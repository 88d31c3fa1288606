"""What ``--precision int8`` (dynamic INT8 of a frozen ViT backbone's linear layers, CPU) costs in scores and buys in
speed, against fp32, on the same images in one run.

Run by hand (not a test):
    .venv/bin/python bench/int8_check.py [--weights weights/default] [--every 3] [--threads 2]

Scores every ``--every``-th image of ../shared/data/dev + more with the bundle in fp32 and in int8: AUC of both (the
default was fitted on these images, so read the difference, not the level), the largest and the mean absolute score
change, and how many verdicts (fake/real/uncertain) change; then images/s of both on 8 camera-sized JPEGs
(bench/peers.py's), best of 3 interleaved rounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(ROOT / "weights" / "default"))
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/int8")
    args = ap.parse_args()
    import torch

    from inference import Detector
    from peers import camera_jpegs
    from probe_eval import DATA, rows_of
    from training.metrics import binary_metrics

    torch.set_num_threads(args.threads)
    dets = {p: Detector(args.weights, device="cpu", precision=p, batch_size=16) for p in ("fp32", "int8")}
    if (DATA / "dev" / "manifest.csv").is_file() and (DATA / "more" / "manifest.csv").is_file():
        rows = rows_of(["dev", "more"])[:: args.every]
        paths = [r["abspath"] for r in rows]
        y = [r["label"] for r in rows]
        res = {p: list(d.predict_paths(paths, workers=1)) for p, d in dets.items()}
        s = {p: np.asarray([r.prediction.score for r in rs]) for p, rs in res.items()}
        labels = {p: [r.prediction.label for r in rs] for p, rs in res.items()}
        diff = np.abs(s["int8"] - s["fp32"])
        flips = sum(a != b for a, b in zip(labels["fp32"], labels["int8"]))
        print(f"{len(paths)} images: AUC fp32 {binary_metrics(y, s['fp32'].tolist())['auc']:.4f}, int8 "
              f"{binary_metrics(y, s['int8'].tolist())['auc']:.4f}; score change max {diff.max():.3f}, mean "
              f"{diff.mean():.4f}; verdicts changed {flips} ({flips / len(paths):.1%})")
    else:
        print("skipped the score comparison: ../shared/data/dev and more are absent", file=sys.stderr)
    files = camera_jpegs(Path(args.out) / "camera", 8)
    best = {p: float("inf") for p in dets}
    for d in dets.values():
        list(d.predict_paths(files, workers=0))
    for _ in range(3):
        for p, d in dets.items():
            t0 = time.perf_counter()
            list(d.predict_paths(files, workers=0))
            best[p] = min(best[p], time.perf_counter() - t0)
    print(" ".join(f"{p} {8 / t:.2f} img/s" for p, t in best.items()) + f" ({best['fp32'] / best['int8']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
