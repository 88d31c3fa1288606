"""Images/s of the Detector against a straightforward per-image implementation of the winning recipe.

Run by hand (not a test):  .venv/bin/python bench/infer_speed.py [--n 32] [--weights DIR] [--side 4032]

Both sides use the same bundle, the same photo-sized JPEGs, the same machine, in the same run.
The reference does what the competition code did per image: decode at full resolution,
ToTensor → Normalize → Resize(S) on the full-resolution tensor, one forward per image per expert,
and EMA parameters swapped into the model (and back) on every call. It prints images/s for the
reference and for the Detector at batch 1 and batch 32, the ratios, and a per-stage breakdown.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from inference import Detector
from inference.bundle_init import init_bundle
from inference.detector import default_workers

ROOT = Path(__file__).resolve().parent.parent
SHARED_REAL = ROOT.parent / "shared" / "data" / "dev" / "real"


def make_photos(out: Path, n: int, side: int) -> list[Path]:
    """Photo-sized JPEGs (side × 3/4 side, quality 90) made from real photographs when available."""
    sources = sorted(SHARED_REAL.glob("*.jp*g"))[:n] if SHARED_REAL.is_dir() else []
    paths = []
    for i in range(n):
        if sources:
            img = Image.open(sources[i % len(sources)]).convert("RGB")
        else:  # smooth synthetic content when ../shared is absent
            yy, xx = np.mgrid[0:480, 0:640]
            arr = np.stack([xx % 256, yy % 256, (xx * yy + i * 97) % 256], -1).astype(np.uint8)
            img = Image.fromarray(arr)
        img = img.resize((side, side * 3 // 4), Image.Resampling.BICUBIC)
        p = out / f"photo_{i:03d}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


class ReferenceScorer:
    """The winning recipe, one image at a time, EMA weights swapped in and out per call."""

    def __init__(self, det: Detector) -> None:
        self.experts = []
        for e in det.spec.experts:
            model = det.models[e.name].to(memory_format=torch.contiguous_format)
            # the EMA shadow is the float weights (a probe_onnx expert's graph is no weight: never swapped)
            ema = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
            tf = T.Compose([T.ToTensor(), T.Normalize(e.mean, e.std), T.Resize((e.input_size, e.input_size))])
            self.experts.append((e, model, ema, tf))
        self.weights = np.array([e.weight for e in det.spec.experts]) / sum(e.weight for e in det.spec.experts)
        self.t = {"decode": 0.0, "preprocess": 0.0, "forward": 0.0}

    def score(self, path: Path) -> float:
        t0 = time.perf_counter()
        img = Image.open(path).convert("RGB")
        t1 = time.perf_counter()
        self.t["decode"] += t1 - t0
        probs = []
        for e, model, ema, tf in self.experts:
            t1 = time.perf_counter()
            x = tf(img).unsqueeze(0)
            t2 = time.perf_counter()
            backup = {k: model.state_dict()[k].clone() for k in ema}
            model.load_state_dict(ema, strict=False)  # "apply EMA shadow"
            with torch.no_grad():
                probs.append(torch.softmax(model(x), 1)[0, 1].item())
            model.load_state_dict(backup, strict=False)  # "restore"
            self.t["preprocess"] += t2 - t1
            self.t["forward"] += time.perf_counter() - t2
        return float(np.dot(self.weights, probs))


def stage_breakdown(det: Detector, paths: list[Path]) -> dict[str, float]:
    """Seconds per stage of the Detector's pipeline, run in-process and sequentially."""
    t = {"decode": 0.0, "preprocess": 0.0, "forward": 0.0}
    prepared = []
    for p in paths:
        t0 = time.perf_counter()
        img = det.preprocessor.load(p)
        t1 = time.perf_counter()
        prepared.append(det.preprocessor.transform(img))
        t["decode"] += t1 - t0
        t["preprocess"] += time.perf_counter() - t1
    t0 = time.perf_counter()
    det.score_prepared(prepared)
    t["forward"] = time.perf_counter() - t0
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="number of photos (default 32)")
    ap.add_argument("--side", type=int, default=4032, help="photo width in pixels (default 4032, a 12 MP phone photo)")
    ap.add_argument("--weights", default=None, help="bundle (default: untrained convnext_atto + vit_tiny at 224 px)")
    ap.add_argument("--workers", type=int, default=default_workers(), help="decoding processes for the Detector")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        weights = args.weights
        if not weights:
            weights = tmp_path / "bundle"
            init_bundle(["convnext_atto", "vit_tiny_patch16_224"], weights)
        print(f"making {args.n} JPEGs of {args.side}x{args.side * 3 // 4} ...", file=sys.stderr)
        paths = make_photos(tmp_path, args.n, args.side)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"photos: {args.n} x {args.side}x{args.side * 3 // 4} JPEG q90 ({mb:.0f} MB); "
              f"CPU threads {torch.get_num_threads()}; decoding workers {args.workers}")

        results = {}
        for bs in (1, 32):
            det = Detector(weights, device="cpu", batch_size=bs)
            list(det.predict_paths(paths[:2], workers=0))  # warm-up
            t0 = time.perf_counter()
            ours = [r.prediction.score for r in det.predict_paths(paths, workers=args.workers)]
            results[f"detector batch {bs}"] = args.n / (time.perf_counter() - t0)
        breakdown = stage_breakdown(Detector(weights, device="cpu", batch_size=32), paths)

        ref = ReferenceScorer(Detector(weights, device="cpu"))
        ref.score(paths[0])
        ref.t = dict.fromkeys(ref.t, 0.0)
        t0 = time.perf_counter()
        ref_scores = [ref.score(p) for p in paths]
        results["reference (per image)"] = args.n / (time.perf_counter() - t0)

        base = results["reference (per image)"]
        print(f"\n{'pipeline':<24} {'img/s':>8} {'vs reference':>13}")
        for name, ips in results.items():
            print(f"{name:<24} {ips:>8.2f} {ips / base:>12.2f}x")
        print(f"\nper-stage seconds per image (sequential, in-process)")
        print(f"{'stage':<12} {'detector':>10} {'reference':>10}")
        for stage in ("decode", "preprocess", "forward"):
            print(f"{stage:<12} {breakdown[stage] / args.n:>10.4f} {ref.t[stage] / args.n:>10.4f}")
        diff = np.abs(np.array(ours) - np.array(ref_scores))
        print(f"\nscore difference detector vs reference (reduced-scale JPEG decode, resize before "
              f"normalising): mean {diff.mean():.4f}, max {diff.max():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
