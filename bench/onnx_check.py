"""The CLIP backbone on onnxruntime (family probe_onnx) beside torch: agreement, speed, where each millisecond goes.

Run by hand (not a test; about 3 minutes on 2 cores):
    .venv/bin/python bench/onnx_check.py --out runs/onnx_check [--threads 2] [--n 32]
    .venv/bin/python bench/onnx_check.py --out runs/onnx_check --verdicts runs/clip_crop,runs/clip_onnx \
        --weights weights/default

1. Agreement: class tokens after blocks 8-11 (what the default reads) of ``--n`` real photos from ../shared/data/dev,
   torch fp32 tower vs three graphs: the served one (INT8 weights, MLP output layers on float activations), the
   source's fully INT8 one, and torch's own dynamic INT8 (``--precision int8``). Cosine per block.
2. Backbone speed, batch 8, the same threads, interleaved rounds, best of ``--rounds``: images/s of each path.
3. Where the time goes, per image, on 12 MP camera JPEGs and 1600×1200 web JPEGs (scikit-image photographs
   enlarged, noise added, quality 92): decode (reduced DCT scale, as the Detector decodes for a 224-px expert),
   resize (8-bit, crop mode), normalise, backbone forward (batch 8), head; and the end-to-end images/s of
   ``Detector.predict_paths`` with ``--weights``.
4. ``--verdicts A,B`` (two bench/probe_eval.py runs: torch fp32 features and served features) with ``--weights``:
   the bundle's head on both feature sets of the same 942 images (protocol A), AUC of each and the share of verdicts
   (fake / real / uncertain at the bundle's threshold and band) that agree.
Writes <out>/onnx_check.md and .json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
DATA = ROOT.parent / "shared" / "data"
CLIP = "pkg:clip_vit_b16"
STAGES = (8, 9, 10, 11)


def web_jpegs(folder: Path, n: int) -> list[str]:
    """``n`` 1600×1200 JPEGs (quality 92), made like bench/peers.py's camera files."""
    from PIL import Image
    from skimage import data as skdata

    folder.mkdir(parents=True, exist_ok=True)
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        path = folder / f"web_{i}.jpg"
        if not path.exists():
            big = np.asarray(Image.fromarray(photos[i % 4]).resize((1600, 1200), Image.Resampling.BICUBIC), np.int16)
            Image.fromarray(np.clip(big + rng.normal(0, 4, big.shape), 0, 255).astype(np.uint8)).save(
                path, "JPEG", quality=92)
        out.append(str(path))
    return out


def nets():
    """torch fp32, torch dynamic INT8, the served graph, the fully INT8 graph: four modules with ``pooled``."""
    import copy

    import onnx

    from inference.families.probe_net import quantize_frozen
    from inference.onnx_graph import expose
    from inference.pretrained import pinned_file
    from training.probe import ProbeSpec, build_probe

    spec = {f: ProbeSpec(arch="vit_base_patch16_clip_quickgelu_224", pretrained=CLIP, stages=STAGES,
                         preprocess="crop", crops=1, family=f) for f in ("probe", "probe_onnx")}
    torch32 = build_probe(spec["probe"])
    torch8 = copy.deepcopy(torch32)
    quantize_frozen([torch8])
    served = build_probe(spec["probe_onnx"])
    allint8 = copy.deepcopy(served)
    src = onnx.load(str(pinned_file(CLIP)))
    ends = {n.name: n.output[0] for n in src.graph.node}
    allint8.set_graph(expose(src, {s: ends[f"/vision_model/encoder/layers.{s}/Add_1"] for s in STAGES})
                      .SerializeToString())
    return spec["probe_onnx"].expert(), {"torch fp32": torch32, "torch int8 (--precision int8)": torch8,
                                         "onnxruntime, served graph": served, "onnxruntime, fully INT8": allint8}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/onnx_check")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=32, help="real photos for the agreement check")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--weights", default=None, help="a bundle for end-to-end images/s and --verdicts")
    ap.add_argument("--verdicts", default=None, help="RUN_TORCH,RUN_SERVED: two bench/probe_eval.py runs")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from inference.images import load_image
    from inference.preprocess import Preprocessor, normalise, resize_for

    expert, paths_by = nets()
    pre = Preprocessor([expert.preprocess_key])
    report: dict = {"threads": args.threads}
    lines = [f"# CLIP ViT-B/16 blocks 8-11: torch and onnxruntime ({args.threads} threads)", ""]

    reals = sorted(glob.glob(str(DATA / "dev" / "real" / "*")))[:args.n]
    if reals:
        x = torch.cat([pre.prepare(p)[expert.preprocess_key][None] for p in reals])
        with torch.inference_mode():
            vec = {name: torch.cat([m.pooled(x[i:i + 8]) for i in range(0, len(x), 8)]) for name, m in paths_by.items()}
        ref = vec["torch fp32"]
        lines += [f"## Agreement with torch fp32 ({len(reals)} real photos of ../shared/data/dev)", "",
                  "| path | " + " | ".join(f"block {s}: mean (min) cosine" for s in STAGES) + " |",
                  "|---|" + "---|" * len(STAGES)]
        report["cosine"] = {}
        for name, v in vec.items():
            if name == "torch fp32":
                continue
            cells = []
            for k, s in enumerate(STAGES):
                c = torch.nn.functional.cosine_similarity(v[:, 768 * k:768 * (k + 1)], ref[:, 768 * k:768 * (k + 1)])
                cells.append((float(c.mean()), float(c.min())))
            report["cosine"][name] = cells
            lines.append(f"| {name} | " + " | ".join(f"{m:.4f} ({lo:.4f})" for m, lo in cells) + " |")
        lines.append("")

    from peers import camera_jpegs

    files = {"12 MP camera JPEG (4032×3024)": camera_jpegs(out / "camera", 8),
             "web JPEG (1600×1200)": web_jpegs(out / "web", 8)}
    batch = torch.cat([pre.prepare(p)[expert.preprocess_key][None] for p in files["web JPEG (1600×1200)"]])
    best = {name: float("inf") for name in paths_by}
    with torch.inference_mode():
        for m in paths_by.values():
            m.pooled(batch)  # warm-up
        for _ in range(args.rounds):
            for name, m in paths_by.items():
                t0 = time.perf_counter()
                m.pooled(batch)
                best[name] = min(best[name], time.perf_counter() - t0)
    base = best["torch fp32"]
    lines += ["## Backbone forward, batch 8, side by side", "", "| path | images/s | vs torch fp32 |", "|---|---|---|"]
    lines += [f"| {name} | {8 / t:.1f} | {base / t:.2f}× |" for name, t in best.items()]
    report["forward_img_s"] = {name: 8 / t for name, t in best.items()}
    lines.append("")

    served = paths_by["onnxruntime, served graph"]
    served.head.weight.data.normal_(0, 0.01)
    lines += ["## Where the time goes (served path), ms per image", "",
              "| files | decode | resize | normalise | forward (batch 8) | head | total | images/s |",
              "|---|---|---|---|---|---|---|---|"]
    report["steps_ms"] = {}
    for what, fs in files.items():
        t = {k: float("inf") for k in ("decode", "resize", "normalise", "forward", "head")}
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            imgs = [load_image(f, min_size=pre.min_decode_size) for f in fs]
            t1 = time.perf_counter()
            small = [resize_for(im, expert.input_size, "crop") for im in imgs]
            t2 = time.perf_counter()
            xs = torch.stack([normalise(im, expert.mean, expert.std) for im in small])
            t3 = time.perf_counter()
            with torch.inference_mode():
                z = served.forward_features(xs)
                t4 = time.perf_counter()
                served.forward_head(z)
            t5 = time.perf_counter()
            for k, (a, b) in zip(t, [(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5)]):
                t[k] = min(t[k], (b - a) / len(fs) * 1000)
        total = sum(t.values())
        report["steps_ms"][what] = t
        lines.append(f"| {what} | " + " | ".join(f"{t[k]:.1f}" for k in t) + f" | {total:.1f} | {1000 / total:.1f} |")
    lines.append("")

    if args.weights:
        from inference import Detector

        det = Detector(args.weights, device="cpu", batch_size=8)
        lines += [f"## End to end: `Detector.predict_paths` with {args.weights} (workers=0)", "",
                  "| files | images/s |", "|---|---|"]
        report["end_to_end_img_s"] = {}
        for what, fs in files.items():
            list(det.predict_paths(fs, workers=0))
            best_t = min(_timed(lambda: list(det.predict_paths(fs, workers=0))) for _ in range(args.rounds))
            report["end_to_end_img_s"][what] = len(fs) / best_t
            lines.append(f"| {what} | {len(fs) / best_t:.1f} |")
        lines.append("")

    if args.verdicts and args.weights:
        lines += verdicts(args.verdicts.split(","), Path(args.weights), report)

    (out / "onnx_check.json").write_text(json.dumps(report, indent=2))
    (out / "onnx_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def verdicts(runs: list[str], weights: Path, report: dict) -> list[str]:
    """The bundle's own head on torch fp32 features and on served features of the same images (protocol A)."""
    from safetensors.torch import load_file

    from inference.bundle import read_spec
    from probe_eval import rows_of
    from training.metrics import binary_metrics

    spec = read_spec(weights)
    e = spec.experts[0]
    state = load_file(str(weights / e.file))
    mean, std = state["feat_mean"].numpy(), state["feat_std"].numpy()
    w, b = state["head.weight"].numpy(), state["head.bias"].numpy()
    lo, hi = spec.uncertain_band
    y = np.asarray([r["label"] for r in rows_of(["dev", "more"])])
    out, scores = {}, {}
    for run in runs:
        meta = json.loads((Path(run) / "extract.json").read_text())
        z = np.load(Path(run) / "features_A.npz")
        cols, start = [], 0
        for s, width in zip(meta["stages"], meta["widths"]):
            if s in e.stages:
                cols += list(range(start, start + width))
            start += width
        f = (z["feats"][:, cols] - mean) / std
        logits = f @ w.T + b
        p = 1 / (1 + np.exp(-(logits[:, 1] - logits[:, 0])))
        per_image = np.bincount(z["owners"], weights=p, minlength=len(y)) / np.bincount(z["owners"], minlength=len(y))
        scores[run] = per_image
        out[run] = binary_metrics(y.tolist(), per_image.tolist())["auc"]

    def verdict(s):
        return np.where((s > lo) & (s < hi), 0, np.where(s >= spec.threshold, 1, -1))

    a, b2 = (scores[r] for r in runs)
    agree = float(np.mean(verdict(a) == verdict(b2)))
    report["verdicts"] = {"auc": out, "verdict_agreement": agree, "max_score_change": float(np.abs(a - b2).max()),
                          "mean_score_change": float(np.abs(a - b2).mean())}
    return ([f"## {weights}'s head on both feature sets ({len(y)} images of dev + more, files as they are)", "",
             "| features | AUC (trained on these images: not held out) |", "|---|---|"]
            + [f"| {r} ({json.loads((Path(r) / 'extract.json').read_text()).get('family', 'probe')}) | {v:.4f} |"
               for r, v in out.items()]
            + ["", f"verdicts (fake / real / uncertain) that agree: {agree:.1%}; score change mean "
                   f"{report['verdicts']['mean_score_change']:.4f}, max {report['verdicts']['max_score_change']:.4f}",
               ""])


if __name__ == "__main__":
    raise SystemExit(main())
