"""Do the heatmaps point at the edited pixels? Pixel-level AUC of `Detector.explain` maps against true edit masks.

Run by hand (not a test; about 25 minutes on 2 CPU cores; steps already done are skipped on a rerun):

    .venv/bin/python bench/localise.py [--work bench_out/localise] [--demo demo_out]

1. The reals of ../shared/data/dev and ../shared/data/more are split by source repository into two halves, so the
   test photographs (and their cameras, sizes, subjects) are ones the patch expert never saw.
2. `dfx prepare edit` makes splice, copy-move, inpaint and resample fakes of each half, each with its mask; the
   reals are brought to the same size and format as the edits' parents (long side --max-side, PNG), so neither
   size nor format tells an edit from a real.
3. A patch expert (EfficientNet-Lite0 with its ImageNet weights, cut after stage --stage, a 1×1 conv per patch) is
   trained with `dfx train` on the first half, every patch labelled by the mask, and exported.
4. Every edit of the second half is explained; per op: the pixel-level AUC of its map against its mask (mean over
   images, and pooled over all pixels), and the mean map value inside and outside the mask. Random maps score
   0.5. The same for each --bundle (default weights/default, whose tiled probe gives one value per crop; pixels
   no crop covers get the image's score, i.e. carry no information).
5. --demo DIR: the same for the demo's test edits (DIR/test/edits), if `dfx demo` has been run.
6. Time: `dfx explain` against `dfx predict` on one 12-megapixel JPEG, in-process (the same work each command does
   per image) and as whole commands.

Writes DIR/localise.md and DIR/localise.json, prints the table.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from inference.manifest import read_manifest  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def dfx(*args: str) -> None:
    exe = Path(sys.executable).with_name("dfx")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "inference.cli"]
    print("$ dfx " + " ".join(args), flush=True)
    subprocess.run([*cmd, *args], check=True)


def split_reals(manifests: list[Path], work: Path, max_side: int, seed: int) -> tuple[Path, Path]:
    """Two manifests of reals, disjoint by source repository, each image saved as the edits' parents are
    (long side at most ``max_side``, PNG)."""
    if (work / "reals_a.csv").exists() and (work / "reals_b.csv").exists():
        return work / "reals_a.csv", work / "reals_b.csv"
    rows = []
    for m in manifests:
        man = read_manifest(m)
        rows += [{"abspath": man.abspath(r), "source": r.get("source", "")} for r in man.rows if r["label"] == "0"]
    sources = sorted({r["source"] for r in rows})
    rng = np.random.default_rng(seed)
    rng.shuffle(sources)
    counts = {s: sum(r["source"] == s for r in rows) for s in sources}
    half, total, a = set(), 0, sum(counts.values()) / 2
    for s in sources:  # greedy: about half of the images in each half
        if total < a:
            half.add(s)
            total += counts[s]
    out = {"a": [], "b": []}
    (work / "reals").mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(rows):
        try:
            with Image.open(r["abspath"]) as im:
                from PIL import ImageOps

                img = ImageOps.exif_transpose(im).convert("RGB")
        except Exception:
            continue
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        p = work / "reals" / f"real{i:04d}.png"
        img.save(p)
        out["a" if r["source"] in half else "b"].append({"path": str(p), "label": 0, "source": r["source"]})
    for k, rs in out.items():
        with open(work / f"reals_{k}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["path", "label", "source"])
            w.writeheader()
            w.writerows(rs)
    return work / "reals_a.csv", work / "reals_b.csv"


def train_patch_expert(work: Path, reals: Path, edits: Path, args: argparse.Namespace) -> Path:
    tag = (f"tiles{args.crops}" if args.preprocess == "tiles" else args.preprocess) + \
        ("" if args.stage == 2 else f"_s{args.stage}")  # stage 2 was the first default: its runs keep their names
    bundle, run = work / f"patch_{tag}", work / f"run_{tag}"
    if (bundle / "ensemble.json").exists():
        return bundle
    rows = []
    for m in (reals, edits):
        man = read_manifest(m)
        for r in man.rows:
            row = {"path": str(man.abspath(r)), "label": r["label"], "source": r.get("source", ""),
                   "mask": str(man.abspath({"path": r["mask"]})) if r.get("mask") else ""}
            rows.append(row)
    rng = np.random.default_rng(args.seed)
    for r in rows:
        r["split"] = "val" if rng.random() < 0.1 else "train"
    with open(work / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cfg = {"output": str(run), "seed": args.seed,
           "data": {"manifest": str(work / "train.csv"), "balanced_sampler": True},
           "experts": [{"arch": "tf_efficientnet_lite0", "family": "patch", "stages": [args.stage],
                        "pretrained": "pkg:efficientnet_lite0", "input_size": args.size,
                        "preprocess": args.preprocess, **({"crops": args.crops} if args.preprocess == "tiles" else {})}],
           "loss": {"ce": 1.0, "kl": 0.5, "nce": 0.0, "label_smoothing": 0.0},
           "optim": {"lr": args.lr, "warmup_steps": 20},
           "train": {"epochs": args.epochs, "batch_size": 16, "ema_decay": 0.99, "checkpoint_every_steps": 100}}
    (work / f"patch_{tag}.yaml").write_text(yaml.safe_dump(cfg))
    dfx("train", str(work / f"patch_{tag}.yaml"), *(["--resume"] if run.exists() else []))
    dfx("export", str(run), "--out", str(bundle))
    return bundle


def score_maps(bundle: Path, edits: Path, limit: int | None) -> dict[str, dict[str, float]]:
    """Per op: mean per-image pixel AUC, pooled pixel AUC, mean map inside/outside the mask, image count."""
    from tqdm import tqdm

    from inference import Detector

    det = Detector(bundle, device="cpu")
    man = read_manifest(edits)
    rows = man.rows[:limit] if limit else man.rows
    per: dict[str, dict[str, list]] = {}
    rng = np.random.default_rng(0)
    for r in tqdm(rows, desc=f"explaining with {bundle.name}"):
        path, mask_path = man.abspath(r), man.abspath({"path": r["mask"]})
        [expl] = det.explain([path], max_side=512)
        with Image.open(mask_path) as m:
            mask = np.asarray(m.convert("L").resize((expl.ensemble.shape[1], expl.ensemble.shape[0])
                                                   if expl.ensemble is not None else m.size, Image.NEAREST)) > 127
        if expl.ensemble is None or mask.all() or not mask.any():
            continue
        m = np.where(np.isfinite(expl.ensemble), expl.ensemble, expl.prediction.score)
        d = per.setdefault(r["op"], {"auc": [], "inside": [], "outside": [], "y": [], "s": [], "rand": []})
        d["auc"].append(roc_auc_score(mask.ravel(), m.ravel()))
        d["rand"].append(roc_auc_score(mask.ravel(), rng.random(mask.size)))
        d["inside"].append(float(m[mask].mean()))
        d["outside"].append(float(m[~mask].mean()))
        pick = rng.choice(mask.size, size=min(mask.size, 2000), replace=False)  # pooled AUC on a pixel sample
        d["y"].append(mask.ravel()[pick])
        d["s"].append(m.ravel()[pick])
    out = {}
    for op, d in sorted(per.items()):
        out[op] = {"n": len(d["auc"]), "pixel_auc_mean": float(np.mean(d["auc"])),
                   "pixel_auc_pooled": float(roc_auc_score(np.concatenate(d["y"]), np.concatenate(d["s"]))),
                   "random_map_auc": float(np.mean(d["rand"])),
                   "inside": float(np.mean(d["inside"])), "outside": float(np.mean(d["outside"]))}
    if per:
        allv = [v for d in per.values() for v in d["auc"]]
        out["all"] = {"n": len(allv), "pixel_auc_mean": float(np.mean(allv)),
                      "pixel_auc_pooled": float(roc_auc_score(np.concatenate([y for d in per.values() for y in d["y"]]),
                                                              np.concatenate([s for d in per.values() for s in d["s"]]))),
                      "random_map_auc": float(np.mean([v for d in per.values() for v in d["rand"]])),
                      "inside": float(np.mean([v for d in per.values() for v in d["inside"]])),
                      "outside": float(np.mean([v for d in per.values() for v in d["outside"]]))}
    return out


def timing(bundle: Path, work: Path) -> dict[str, float]:
    """Seconds for predict and for explain (maps, overlay, 16-bit map at full size) on a 12 MP JPEG."""
    import io

    from inference import Detector
    from inference.explain import map16, overlay, png_bytes

    photo = work / "photo12mp.jpg"
    if not photo.exists():
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:3000, 0:4000].astype(np.float32)
        base = np.stack([xx / 16, yy / 12, (xx + yy) / 28], -1) + rng.normal(0, 12, (3000, 4000, 3))
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(photo, quality=90)
    det = Detector(bundle, device="cpu")
    det.predict([photo])  # warm-up
    t = {}
    reps = 3
    t0 = time.perf_counter()
    for _ in range(reps):
        det.predict([photo])
    t["predict_s"] = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        [e] = det.explain([photo])
        png_bytes(overlay(None, e, label=e.prediction.label, threshold=det.spec.threshold, max_side=1600))
        buf = io.BytesIO()
        map16(e.map_at((4000, 3000))).save(buf, format="PNG", compress_level=1)
    t["explain_s"] = (time.perf_counter() - t0) / reps
    for verb, extra in (("predict", []), ("explain", ["-o", str(work / "explain12")])):
        exe = Path(sys.executable).with_name("dfx")
        t0 = time.perf_counter()
        subprocess.run([str(exe), verb, str(photo), "--weights", str(bundle), "--no-progress", *extra],
                       check=True, capture_output=True)
        t[f"dfx_{verb}_s"] = time.perf_counter() - t0
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench_out/localise")
    ap.add_argument("--max-side", type=int, default=512, help="edits and reals are brought to this long side")
    ap.add_argument("--stage", type=int, default=3, help="cut EfficientNet-Lite0 after this stage (default 3; 2 "
                                                          "localised splices and copy-moves far worse: README)")
    ap.add_argument("--size", type=int, default=256, help="input size of the patch expert (squash)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--preprocess", choices=("squash", "tiles"), default="squash",
                    help="squash: the whole image to --size; tiles: --crops native-resolution crops of --size")
    ap.add_argument("--crops", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.001)
    ap.add_argument("--ops", default="splice,copy_move,inpaint,resample")
    ap.add_argument("--bundle", action="append", default=None, help="more bundles to score (default weights/default)")
    ap.add_argument("--demo", default=None, help="a `dfx demo` output folder: also score its test edits")
    ap.add_argument("--limit", type=int, default=None, help="score at most this many edits per set")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    reals_a, reals_b = split_reals([SHARED / "dev" / "manifest.csv", SHARED / "more" / "manifest.csv"], work,
                                   args.max_side, args.seed)
    for k, reals in (("a", reals_a), ("b", reals_b)):
        if not (work / f"edits_{k}" / "manifest.csv").exists():
            dfx("prepare", "edit", "--reals", str(reals), "--out", str(work / f"edits_{k}"), "--ops", args.ops,
                "--max-side", str(args.max_side), "--seed", str(args.seed + (k == "b")))
    patch = train_patch_expert(work, reals_a, work / "edits_a" / "manifest.csv", args)
    sets = {"edits of unseen dev+more photos": work / "edits_b" / "manifest.csv"}
    if args.demo and (Path(args.demo) / "test" / "edits" / "manifest.csv").exists():
        sets["edits of the demo's test photos"] = Path(args.demo) / "test" / "edits" / "manifest.csv"
    bundles = [patch] + [Path(b) for b in (args.bundle or [str(ROOT / "weights" / "default")])
                         if Path(b).resolve() != patch.resolve()]
    results: dict[str, dict] = {}
    for set_name, edits in sets.items():
        for b in bundles:
            key = hashlib.sha1(f"{b.resolve()}|{edits}|{args.limit}".encode()).hexdigest()[:10]
            cache = work / "scores" / f"{b.name}__{key}.json"  # a rerun (e.g. with --demo) scores only what is new
            if not cache.exists():
                cache.parent.mkdir(exist_ok=True)
                cache.write_text(json.dumps(score_maps(b, edits, args.limit)))
            results[f"{b.name} | {set_name}"] = json.loads(cache.read_text())
    results["timing (patch expert, 12 MP JPEG, CPU)"] = timing(patch, work)
    lines = ["| bundle | edits | op | images | pixel AUC (mean per image) | pooled | random map | map inside / outside |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, table in results.items():
        if key.startswith("timing"):
            continue
        b, s = key.split(" | ")
        for op, v in table.items():
            lines.append(f"| {b} | {s} | {op} | {v['n']} | {v['pixel_auc_mean']:.3f} | {v['pixel_auc_pooled']:.3f} | "
                         f"{v['random_map_auc']:.3f} | {v['inside']:.3f} / {v['outside']:.3f} |")
    t = results["timing (patch expert, 12 MP JPEG, CPU)"]
    lines.append("")
    lines.append(f"12 MP JPEG on this CPU, patch expert: predict {t['predict_s']:.2f} s, explain (maps, overlay, 16-bit "
                 f"map at 4000×3000) {t['explain_s']:.2f} s = {t['explain_s'] / t['predict_s']:.2f}×; whole commands: "
                 f"dfx predict {t['dfx_predict_s']:.1f} s, dfx explain {t['dfx_explain_s']:.1f} s = "
                 f"{t['dfx_explain_s'] / t['dfx_predict_s']:.2f}×")
    text = "\n".join(lines)
    print(text)
    (work / "localise.md").write_text(text + "\n")
    (work / "localise.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
