"""What fine-tuning a pretrained backbone buys over the linear probe, leave-one-generator-family-out.

The same 13 families, test sets and protocol B as ``bench/probe_eval.py`` (short side 256, centre crop 256,
JPEG quality 90, so format and size cannot be the cue), but each held-out family gets its own ``dfx train`` run
of a fine-tuned expert (EfficientNet-Lite0 from its ImageNet weights, partly frozen, layer-wise rate decay)
trained on everything else. Two steps, so that the slow one can run on a lent GPU with only a small folder:

    python bench/finetune_lofo.py prepare --out bench_out/ft_lofo        # here: protocol-B images (~20 MB)
    python bench/finetune_lofo.py run --data bench_out/ft_lofo --out runs/ft_lofo [--epochs 6 --freeze 2 ...]

Protocol A (the files as they are) needs the collections themselves: ``prepare --protocol A`` writes
native-resolution 256-px centre crops as PNG instead (large). Prints a per-family table and the mean; writes
``results.json`` and ``results.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def prepare(out: Path, protocol: str) -> None:
    from tqdm import tqdm

    from inference.images import load_image
    from inference.preprocess import resize_for
    from probe_eval import family_of, real_folds, rows_of

    rows = rows_of(["dev", "more"])
    folds = real_folds(rows)
    (out / "images").mkdir(parents=True, exist_ok=True)
    kept = []
    for i, r in enumerate(tqdm(rows, desc=f"protocol {protocol}")):
        try:
            img = load_image(r["abspath"], min_size=256 if protocol == "B" else None)
        except Exception as exc:  # noqa: BLE001 - an unreadable file is reported and left out
            print(f"skipped {r['abspath']}: {exc}", file=sys.stderr)
            continue
        if protocol == "B":
            name = f"images/{i:05d}.jpg"
            resize_for(img, 256, "crop").save(out / name, "JPEG", quality=90)  # protocol B, as probe_eval's
        else:
            w, h = img.size
            s = min(256, w, h)
            left, top = (w - s) // 2, (h - s) // 2
            name = f"images/{i:05d}.png"
            img.crop((left, top, left + s, top + s)).save(out / name)
        fam = family_of(r)
        kept.append({"path": name, "label": r["label"], "source": r["source"], "family": fam or "",
                     "real_fold": int(folds[i])})
    with open(out / "all.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(kept[0]))
        w.writeheader()
        w.writerows(kept)
    print(f"wrote {len(kept)} images to {out}")


def run(data: Path, out: Path, args: argparse.Namespace) -> None:
    import yaml

    from training.metrics import binary_metrics

    from probe_eval import FAMILIES, held_out

    with open(data / "all.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    labels, sources = [int(r["label"]) for r in rows], [r["source"] for r in rows]
    families, folds = [r["family"] or None for r in rows], [int(r["real_fold"]) for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for i, fam in enumerate(FAMILIES):
        if args.only and fam not in args.only.split(","):
            continue
        test = held_out(labels, sources, families, folds, i, fam)
        work = out / fam
        if not (work / "run" / "oof.csv").is_file():
            work.mkdir(parents=True, exist_ok=True)
            man = [{"path": str((data / r["path"]).resolve()), "label": r["label"], "source": r["source"],
                    "split": "val" if t else "train"} for r, t in zip(rows, test)]
            with open(work / "manifest.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(man[0]))
                w.writeheader()
                w.writerows(man)
            expert = {"arch": "tf_efficientnet_lite0", "pretrained": args.pretrained, "input_size": args.size,
                      "preprocess": "crop", "freeze": args.freeze, "lr": args.lr}
            if args.patch_stage is not None:  # a patch expert: every patch labelled with its image's label
                expert.update(family="patch", stages=[args.patch_stage])
            if args.layer_decay:
                expert["layer_decay"] = args.layer_decay
            cfg = {"output": str(work / "run"), "seed": 0,
                   "data": {"manifest": str(work / "manifest.csv"), "balanced_sampler": True, "workers": args.workers},
                   "experts": [expert],
                   "loss": {"ce": 1.0, "kl": 0.5, "nce": 0.0, "label_smoothing": 0.05},
                   "optim": {"lr": args.lr, "warmup_steps": 20, "weight_decay": 0.05},
                   "train": {"epochs": args.epochs, "batch_size": args.batch_size, "ema_decay": 0.99,
                             "checkpoint_every_steps": 0, "mixed_precision": "auto"}}
            (work / "config.yaml").write_text(yaml.safe_dump(cfg))
            t0 = time.time()
            r = subprocess.run([sys.executable, "-m", "inference.cli", "train", str(work / "config.yaml"),
                                *(["--resume"] if (work / "run").exists() else [])],
                               cwd=ROOT, capture_output=True, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"})
            (work / "train.log").write_text(r.stdout + r.stderr)
            if r.returncode != 0:
                print(r.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{fam}: dfx train failed")
            print(f"{fam}: trained in {time.time() - t0:.0f} s", flush=True)
        with open(work / "run" / "oof.csv", newline="") as f:
            pred = list(csv.DictReader(f))
        y = [int(p["label"]) for p in pred]
        m = binary_metrics(y, [float(p["prob"]) for p in pred])
        results[fam] = {"auc": m["auc"], "tpr_at_fpr_5pct": m["tpr_at_fpr_5pct"], "n_fake": sum(y),
                        "n_real": len(y) - sum(y)}
        print(f"{fam}: AUC {m['auc']:.3f} (TPR@5% {m['tpr_at_fpr_5pct']:.2f}) on {sum(y)} fakes / "
              f"{len(y) - sum(y)} reals", flush=True)
    aucs = [v["auc"] for v in results.values()]
    tprs = [v["tpr_at_fpr_5pct"] for v in results.values()]
    summary = {"mean_auc": float(np.mean(aucs)), "mean_tpr_at_fpr_5pct": float(np.mean(tprs)),
               "settings": {k: getattr(args, k) for k in ("epochs", "size", "freeze", "layer_decay", "lr", "batch_size",
                                                           "patch_stage")}}
    (out / "results.json").write_text(json.dumps({"families": results, **summary}, indent=1))
    lines = ["| held-out family | fakes | reals | AUC (TPR at 5 % FPR) |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['n_fake']} | {v['n_real']} | {v['auc']:.3f} ({v['tpr_at_fpr_5pct']:.2f}) |"
              for k, v in results.items()]
    lines.append(f"| **mean** | | | **{summary['mean_auc']:.3f} ({summary['mean_tpr_at_fpr_5pct']:.2f})** |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--protocol", choices=("A", "B"), default="B")
    r = sub.add_parser("run")
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--pretrained", default="pkg:efficientnet_lite0", help="pkg:NAME or a local safetensors file")
    r.add_argument("--epochs", type=int, default=6)
    r.add_argument("--size", type=int, default=224)
    r.add_argument("--freeze", type=int, default=2)
    r.add_argument("--layer-decay", type=float, default=0.7)
    r.add_argument("--lr", type=float, default=5e-4)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--workers", type=int, default=None)
    r.add_argument("--only", default="", help="comma-separated family names (default: all 13)")
    r.add_argument("--patch-stage", type=int, default=None, help="train patch experts cut after this stage instead")
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.out, a.protocol)
    else:
        run(a.data, a.out, a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
