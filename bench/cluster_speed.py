"""Time and peak memory of ``dfx prepare cluster`` against scikit-learn's MiniBatchKMeans, same job.

Run by hand (not a test):  .venv/bin/python bench/cluster_speed.py [--sizes 10000 100000 1000000] [--k 50]

Each case runs in its own process (peak memory = that process's max RSS). Features: N × 768 float32 with
200 hidden clusters, written once per N as a memory-mapped .npy. The job on both sides: k clusters of
the L2-normalised features and every row assigned. Ours is the whole command (manifest in, manifest +
report out, --no-map); the reference loads the array, normalises it, fits MiniBatchKMeans (its default
batch size) and predicts every row. Prints seconds, peak MB, ratios, and how time grows with N.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 768

REFERENCE = r'''
import sys, numpy as np
from sklearn.cluster import MiniBatchKMeans
x = np.load(sys.argv[1], mmap_mode="r")
x = np.asarray(x, dtype=np.float32)
x = x / np.linalg.norm(x, axis=1, keepdims=True)
km = MiniBatchKMeans(n_clusters=int(sys.argv[2]), random_state=0, n_init=3).fit(x)
labels = km.predict(x)
print(len(np.unique(labels)))
'''


def make_data(tmp: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(200, DIM)).astype(np.float32)
    feats = tmp / f"f{n}.npy"
    mm = np.lib.format.open_memmap(feats, mode="w+", dtype=np.float32, shape=(n, DIM))
    for s in range(0, n, 100_000):
        m = min(n, s + 100_000) - s
        mm[s:s + m] = centres[rng.integers(0, 200, m)] + 0.5 * rng.normal(size=(m, DIM)).astype(np.float32)
    mm.flush()
    del mm
    manifest = tmp / f"m{n}.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for i in range(n):
            w.writerow([f"img_{i}.jpg", i % 2])
    return feats, manifest


WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)")


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command, measured by a wrapper process whose only child it is."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {r.stderr[-2000:]}")
    return wall, int(r.stderr.strip().splitlines()[-1]) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--k", type=int, default=50)
    args = ap.parse_args()
    dfx = str(Path(sys.executable).with_name("dfx"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref_script = tmp / "reference.py"
        ref_script.write_text(REFERENCE)
        for n in sorted(args.sizes):
            feats, manifest = make_data(tmp, n)
            ours = timed([dfx, "prepare", "cluster", str(manifest), "--features", str(feats), "--k", str(args.k),
                          "--folds", "5", "--no-map", "--cpu", "-o", str(tmp / f"out{n}.csv")])
            ref = timed([sys.executable, str(ref_script), str(feats), str(args.k)])
            rows.append((n, ours, ref))
            print(f"N={n:>9,}: dfx prepare cluster {ours[0]:7.1f} s {ours[1]:7.0f} MB | MiniBatchKMeans "
                  f"{ref[0]:7.1f} s {ref[1]:7.0f} MB", flush=True)
            feats.unlink()
    print(f"\nk={args.k}, {DIM}-d float32; wall time and peak RSS of each whole command (start-up included)")
    print(f"{'N':>10} {'ours s':>8} {'ref s':>8} {'speed-up':>9} {'ours MB':>8} {'ref MB':>8}")
    for n, (ot, om), (rt, rm) in rows:
        print(f"{n:>10,} {ot:>8.1f} {rt:>8.1f} {rt / ot:>8.2f}x {om:>8.0f} {rm:>8.0f}")
    if len(rows) > 1:
        (n0, (o0, _), (r0, _)), (n1, (o1, _), (r1, _)) = rows[0], rows[-1]
        print(f"time growth from N={n0:,} to N={n1:,} (x{n1 / n0:.0f} data): ours x{o1 / o0:.1f}, reference x{r1 / r0:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
