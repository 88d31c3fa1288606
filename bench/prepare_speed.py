"""Images/s of ``dfx prepare diffuse`` against calling the diffusers pipeline in a plain per-image loop.

Run by hand (not a test):  .venv/bin/python bench/prepare_speed.py [--n 32] [--size 64] [--steps 4] [--model DIR]

Same pipeline, mode (img2img from the same reals), steps, strength and size on both sides; ours batches
items (``--batch-size``, a generator per item) and skips nothing (fresh output folder). Without --model it
builds the tiny pipeline from configs (random weights), whose per-call overhead dominates on a CPU; on a
GPU pass a real-sized pipeline folder to measure what matters.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    import torch
    from PIL import Image

    from data_prep.diffuse import _pipeline, diffuse
    from data_prep.tiny_sd import build_tiny_pipeline
    from inference.manifest import write_manifest
    from inference.preprocess import resize_for
    from tests.conftest import make_tiny_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or str(build_tiny_pipeline(tmp / "tiny-sd"))
        data = make_tiny_dataset(tmp / "data", n_per_class=args.n, size=max(72, args.size), corrupt=False)
        from inference.manifest import read_manifest

        man = read_manifest(data)
        reals = write_manifest(tmp / "reals.csv", [{**r, "path": str(man.abspath(r))} for r in man.rows if r["label"] == "0"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # plain loop: one image per call, the pipeline's own defaults otherwise
        pipe = _pipeline(model, "img2img", device)
        rows = read_manifest(reals).rows
        t0 = time.perf_counter()
        for i, r in enumerate(rows):
            init = resize_for(Image.open(r["path"]).convert("RGB"), args.size, "crop")
            pipe(prompt="a photograph", image=init, strength=0.6, num_inference_steps=args.steps,
                 generator=torch.Generator().manual_seed(i)).images[0].save(tmp / f"plain_{i}.png")
        plain = len(rows) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        s = diffuse(model, "img2img", tmp / "ours", reals_manifest=str(reals), steps=args.steps, strength=0.6,
                    size=args.size, batch_size=args.batch_size, progress=False)
        ours = s["made"] / (time.perf_counter() - t0)
    print(f"img2img, {len(rows)} images at {args.size}px, {args.steps} steps, device {device}, "
          f"model {'tiny (random, from configs)' if not args.model else args.model}")
    print(f"plain per-image loop        {plain:7.2f} img/s")
    print(f"dfx prepare diffuse (bs {args.batch_size})   {ours:7.2f} img/s   ({ours / plain:.2f}x; includes its "
          f"pipeline load, planning and atomic writes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
