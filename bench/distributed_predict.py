"""Wall time of `dfx predict` in one process against N processes under torchrun, side by side
(interleaved rounds, best of each), on the same files; checks both wrote the same rows.

On a 2-core CPU two processes cannot be much faster than one (each already uses both cores for its
forward); the point of the bench is that splitting the work costs nothing, so the same command scales on
N GPUs. Run by hand (not a test):

    .venv/bin/python bench/distributed_predict.py FOLDER [--weights weights/default] [--nproc 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _rows(path: Path) -> dict[str, float]:
    with path.open(newline="") as f:
        return {r["path"]: float(r["score"]) for r in csv.DictReader(f) if r["status"] == "ok"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--weights", default=str(ROOT / "weights" / "default"))
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    py = sys.executable
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", ACCELERATE_USE_CPU="true")
    n_files = sum(1 for p in Path(args.folder).rglob("*") if p.is_file())
    common = [args.folder, "--weights", args.weights, "--device", "cpu", "--no-progress",
              "--batch-size", str(args.batch_size)]
    best = {"1 process": float("inf"), f"{args.nproc} processes": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        outs = {k: Path(tmp) / f"{i}.csv" for i, k in enumerate(best)}
        for _ in range(args.rounds):
            for key in best:
                out = outs[key]
                if out.exists():
                    out.unlink()
                if key == "1 process":
                    cmd = [py, "-m", "inference.cli", "predict", *common, "-o", str(out)]
                else:
                    cmd = [py, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={args.nproc}", "-m", "inference.cli", "predict",
                           *common, "-o", str(out)]
                best[key] = min(best[key], _run(cmd, env))
        one, many = (_rows(p) for p in outs.values())
        same = one.keys() == many.keys()
        worst = max((abs(one[k] - many[k]) for k in one), default=0.0) if same else float("nan")
    print(f"{n_files} files, {os.cpu_count()} cores, best of {args.rounds} rounds")
    for key, sec in best.items():
        print(f"  {key:>12}: {sec:7.1f} s  {n_files / sec:6.1f} files/s")
    ratio = best["1 process"] / best[f"{args.nproc} processes"]
    print(f"  speed ratio {args.nproc} processes / 1 process: {ratio:.2f}x")
    print(f"  same rows: {same}; largest score difference {worst:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
