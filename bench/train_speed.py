"""Training images/s of ``dfx train`` against a plain PyTorch loop, same model, batch and augmentation.

Run by hand (not a test):  .venv/bin/python bench/train_speed.py [--steps 30] [--arch convnext_atto] [--size 128]

The plain loop uses the same optimiser factory, the same dataset class (both augmented views, decoded in the same number of
DataLoader workers) and the same forward over both views, but CE only: no Accelerate, no EMA, no KL, no
NCE, no projection head, no checkpoints. Both are timed in steady state from per-step timestamps
(the first 3 steps, start-up and validation are left out). Data: ../shared/data/dev when present, else
crops of scikit-image's photos.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "dev" / "manifest.csv"


def manifest_with_folds(tmp: Path) -> Path:
    from inference.manifest import read_manifest, write_manifest

    if SHARED.is_file():
        man = read_manifest(SHARED)
        rows = [{**r, "path": str(man.abspath(r)), "fold": i % 2} for i, r in enumerate(man.rows)]
        return write_manifest(tmp / "manifest.csv", rows)
    from tests.conftest import make_tiny_dataset

    return make_tiny_dataset(tmp / "data", n_per_class=64, size=160, corrupt=False)


def plain_loop(manifest: Path, arch: str, size: int, batch: int, steps: int, workers: int) -> float:
    import timm

    from inference.experts import arch_defaults
    from inference.manifest import read_manifest
    from training.config import AugmentConfig
    from training.data import EpochSampler, Row, TrainDataset, collate_views

    man = read_manifest(manifest)
    rows = [r for r in man.rows if r["fold"] != "0"]
    d = arch_defaults(arch, size)
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=2, **d["model_kwargs"]).train()
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)  # the optimiser dfx train builds
    ds = TrainDataset([Row(str(man.abspath(r)), int(r["label"]), r["source"]) for r in rows], size=size,
                      mode="squash", mean=d["mean"], std=d["std"], aug=AugmentConfig(), seed=0, max_pixels=64_000_000)
    # the same number of samples as dfx train draws in its one epoch (it caps an epoch at the training rows)
    sampler = EpochSampler([int(r["label"]) for r in rows], seed=0, balanced=True,
                           num_samples=min(len(rows), batch * steps))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                                         collate_fn=collate_views)
    stamps = []
    for b in loader:
        x = torch.cat([b["weak"], b["strong"]])
        y = torch.cat([b["label"], b["label"]])
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        stamps.append(time.perf_counter())
    return (len(stamps) - 3) * batch / (stamps[-1] - stamps[2])


def dfx_train(manifest: Path, out: Path, arch: str, size: int, batch: int, steps: int, workers: int) -> float:
    from training.config import load_config
    from training.trainer import train

    cfg = load_config(None, [f"data.manifest={manifest}", f"output={out}", f"train.batch_size={batch}",
                             "train.epochs=1", f"train.max_steps_per_epoch={steps}", f"data.workers={workers}",
                             f"experts=[{{arch: {arch}, input_size: {size}, val_fold: 0}}]"])
    train(cfg)
    times = {}
    with open(out / "logs" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row["key"].endswith("/total") and row["step"]:
                times[int(row["step"])] = float(row["time"])
    steps_seen = sorted(times)
    return (len(steps_seen) - 3) * batch / (times[steps_seen[-1]] - times[steps_seen[2]])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=11, help="steps per run, at most training rows / batch (default 11)")
    ap.add_argument("--arch", default="convnext_atto")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of both (default 3)")
    args = ap.parse_args()
    ours_all, plain_all = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = manifest_with_folds(tmp)
        for r in range(args.rounds):  # interleaved: a noisy shared machine hits both alike
            plain_all.append(plain_loop(manifest, args.arch, args.size, args.batch, args.steps, args.workers))
            ours_all.append(dfx_train(manifest, tmp / f"run{r}", args.arch, args.size, args.batch, args.steps,
                                      args.workers))
    import statistics

    ours, plain = statistics.median(ours_all), statistics.median(plain_all)
    print(f"\n{args.arch} at {args.size}px, batch {args.batch} (x2 views), {args.steps} steps, "
          f"{args.workers} decoding worker(s), {torch.get_num_threads()} torch threads, data: "
          f"{'../shared/data/dev' if SHARED.is_file() else 'scikit-image crops'}")
    print(f"{'loop':<46} {'img/s (median)':>14}  rounds")
    print(f"{'plain PyTorch (CE only, no Accelerate, no EMA)':<46} {plain:>14.2f}  {[round(x, 2) for x in plain_all]}")
    print(f"{'dfx train (CE+KL+NCE, Accelerate, EMA, logs)':<46} {ours:>14.2f}  {[round(x, 2) for x in ours_all]}")
    print(f"overhead of dfx train: {100 * (plain / ours - 1):+.1f}% time per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
