"""What finding faces costs, and whether the cascade's caps change what it finds (issue 26, item 1).

Two checks, by hand (prints figures; not a test):

1. A 1920² JPEG tiled with 1600 copies of scikit-image's astronaut's face (48 px each) against the astronaut photo
   resized to 1920²: time of ``FaceFinder.find`` (best of 3) and the process's peak memory, each image in a fresh
   process, with the shipped caps and without any (the chunks of 256 crops still bound memory: the code before
   issue 26 had neither, 15 s and a 3.5 GB peak for the collage).
2. ``--same-faces``: every image of ``../shared/data`` (dev + more) with and without caps: how many images find
   exactly the same 16 most confident faces, and for the others how many of them match (IoU > 0.5).

    .venv/bin/python bench/faces_cost.py                 # collage vs photo, capped and uncapped
    .venv/bin/python bench/faces_cost.py --same-faces    # ~10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"

_ONE = """
import io, json, resource, sys, time
from PIL import Image
from skimage import data as skdata
from inference.faces import FaceFinder
which, uncapped = sys.argv[1], sys.argv[2] == "1"
face = Image.fromarray(skdata.astronaut())
if which == "collage":
    tile = face.crop((150, 20, 350, 220)).resize((48, 48), Image.Resampling.LANCZOS)
    img = Image.new("RGB", (1920, 1920))
    for i in range(40):
        for j in range(40):
            img.paste(tile, (i * 48, j * 48))
else:
    img = face.resize((1920, 1920), Image.Resampling.BICUBIC)
buf = io.BytesIO(); img.save(buf, "JPEG", quality=85); img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
finder = FaceFinder(max_candidates=(10**9,) * 3) if uncapped else FaceFinder()
finder.find(Image.new("RGB", (64, 64)))
times = []
for _ in range(3):
    t = time.perf_counter(); n = len(finder.find(img)); times.append(time.perf_counter() - t)
print(json.dumps({"faces": n, "s": min(times), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _cost(which: str, uncapped: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", _ONE, which, "1" if uncapped else "0"], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def same_faces() -> None:
    from PIL import Image
    from tqdm import tqdm

    from inference.faces import FaceFinder

    capped, uncapped = FaceFinder(), FaceFinder(max_candidates=(10**9,) * 3)
    paths = [p for p in sorted(glob.glob(str(DATA / "*" / "*" / "*.*"))) if not p.endswith((".csv", ".md"))]
    n = identical = 0
    for path in tqdm(paths, unit="img"):
        try:
            img = Image.open(path).convert("RGB")
        except Exception:
            continue
        a, b = capped.find(img)[:16], uncapped.find(img)[:16]
        n += 1
        if len(a) == len(b) and all(max(abs(x - y) for x, y in zip(f.box, g.box)) < 1e-3 for f, g in zip(a, b)):
            identical += 1
        else:
            matched = sum(any(_iou(f.box, g.box) > 0.5 for f in a) for g in b)
            print(f"differs: {Path(path).name}: {matched} of the uncapped top {len(b)} faces found (IoU > 0.5)")
    print(f"{identical} of {n} images find exactly the same 16 most confident faces with the caps")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--same-faces", action="store_true", help="compare capped and uncapped on ../shared/data")
    args = ap.parse_args()
    if args.same_faces:
        if not DATA.is_dir():
            print(f"skipped: {DATA} not found", file=sys.stderr)
            return 0
        same_faces()
        return 0
    for uncapped in (False, True):
        photo, collage = _cost("photo", uncapped), _cost("collage", uncapped)
        print(f"{'uncapped' if uncapped else 'capped (shipped)'}: photo {photo['s']:.2f} s, peak {photo['peak_mb']:.0f} MB, "
              f"{photo['faces']} face(s); collage {collage['s']:.2f} s ({collage['s'] / photo['s']:.1f}x), peak "
              f"{collage['peak_mb']:.0f} MB, {collage['faces']} faces")
    return 0


if __name__ == "__main__":
    sys.exit(main())
