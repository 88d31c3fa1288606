"""The shipped bundle on the images its recipe held out: what `training/configs/make_default.sh` left in fold 0.

Every expert of weights/default was validated on fold 0 of `runs/default/folds.csv` (clusters it never trained on),
and the fakes made from fold-0 reals (edits, self-blended faces) were never trained on either. This bench scores
those images through the served path (`Detector`: faces searched in every image by the bundle's own finder, its
face rule), so its figures are the bundle's, not a re-implementation's. Run by hand after the recipe (not a test; about 10 minutes
on 2 CPU cores):

    .venv/bin/python bench/default_eval.py [--work runs/default] [--bundle weights/default] [--out runs/default/eval]

1. Per kind of fake, AUC and TPR at 5 % FPR against fold 0's reals, under protocol A (the files as they are) and B
   (short side 256, centre crop, JPEG 90: format, size and aspect ratio cannot be the cue); the share of images in
   the uncertain band and the error outside it; the same with the face expert left out (whole-image experts only).
2. The map: pixel-level AUC of `Detector.explain`'s map against the true mask of every fold-0 edit and blend
   (photos the map expert never saw; random maps score 0.50), per op (bench/localise.py's scoring).
3. With a face expert: its scores on aligned face crops of fold-0 reals (a crop is no cue if these stay low) and on
   whole, uncropped photos (fakes and reals), against the bundle's threshold.

Writes <out>/default_eval.json and .md; prints the tables.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def protocol_b_bytes(path: str) -> bytes:
    """Protocol B of bench/probe_eval.py, as the bytes of a JPEG an upload would carry."""
    from probe_eval import protocol_b

    from inference.images import load_image

    buf = io.BytesIO()
    protocol_b(load_image(path)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def score_rows(det, rows: list[dict], protocol: str) -> list[dict]:
    """Each row's prediction (score, whole-image score, faces) through the Detector."""
    from tqdm import tqdm

    out = []
    for r in tqdm(rows, desc=f"scoring protocol {protocol}", unit="img"):
        src = r["abspath"] if protocol == "A" else protocol_b_bytes(r["abspath"])
        [p] = det.predict([src])
        faces = [f["score"] for f in (p.faces or [])]
        out.append({"score": p.score, "whole": p.whole_score if p.whole_score is not None else p.score,
                    "face": max(faces) if faces else None, "experts": p.experts})
    return out


def kind_table(labels: np.ndarray, kinds: list[str], scores: np.ndarray) -> dict[str, dict[str, float]]:
    """Per fake kind (and all): AUC and TPR at 5 % FPR against every real."""
    from training.metrics import binary_metrics

    out = {}
    for kind in sorted({k for k, y in zip(kinds, labels) if y == 1}) + ["all"]:
        keep = np.asarray([y == 0 or kind in ("all", k) for k, y in zip(kinds, labels)])
        m = binary_metrics(labels[keep].tolist(), scores[keep].tolist())
        out[kind] = {"n_fake": int(labels[keep].sum()), "auc": m["auc"], "tpr_at_fpr_5pct": m["tpr_at_fpr_5pct"]}
    return out


def band_stats(labels: np.ndarray, scores: np.ndarray, band: tuple[float, float], threshold: float) -> dict:
    inside = (scores > band[0]) & (scores < band[1])
    called = scores >= threshold
    wrong = (called != (labels == 1)) & ~inside
    return {"inside": float(inside.mean()), "inside_real": float(inside[labels == 0].mean()),
            "inside_fake": float(inside[labels == 1].mean()),
            "error_outside": float(wrong.sum() / max(1, (~inside).sum())),
            "fpr_at_threshold": float(called[labels == 0].mean()), "tpr_at_threshold": float(called[labels == 1].mean())}


def face_shortcuts(bundle: Path, work: Path, det, threshold: float) -> dict:
    """The face expert alone on fold-0 real face crops and on whole uncropped fold-0 photos."""
    from inference.experts import fake_probs, load_expert
    from inference.images import load_image
    from inference.manifest import read_manifest
    from inference.preprocess import Preprocessor

    spec = next(e for e in det.spec.experts if e.reads == "faces")
    net = load_expert(spec, bundle)
    pre = Preprocessor([spec.preprocess_key])

    def prob(path: str) -> float:
        x = next(iter(pre.transform(load_image(path)).values()))
        import torch

        with torch.inference_mode():
            return float(fake_probs(net, x[None] if x.dim() == 3 else x)[0])

    crops = read_manifest(work / "faces" / "manifest.csv")
    groups: dict[str, list[float]] = {}
    for r in crops.rows:
        if r.get("fold") == "0" and r.get("split", "") != "train":
            groups.setdefault(f"face crop, {'real' if r['label'] == '0' else r['kind']}", []).append(
                prob(str(crops.abspath(r))))
    photos = read_manifest(work / "folds.csv")
    for r in photos.rows:
        if r.get("fold") == "0":
            groups.setdefault(f"whole photo, {'real' if r['label'] == '0' else 'fake'}", []).append(
                prob(str(photos.abspath(r))))
    return {k: {"n": len(v), "mean": float(np.mean(v)), "at_or_above_threshold": float(np.mean(np.asarray(v) >= threshold)),
                "above_0.5": float(np.mean(np.asarray(v) > 0.5))} for k, v in sorted(groups.items())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/default")
    ap.add_argument("--bundle", default="weights/default")
    ap.add_argument("--out", default="runs/default/eval")
    ap.add_argument("--limit", type=int, default=None, help="at most this many images per part (a quick look)")
    args = ap.parse_args()
    from localise import score_maps

    from inference import Detector
    from inference.manifest import read_manifest, write_manifest

    work, bundle, out = Path(args.work), Path(args.bundle), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    det = Detector(bundle, device="cpu")
    spec = det.spec
    man = read_manifest(work / "folds.csv")
    rows = [{**r, "abspath": str(man.abspath(r))} for r in man.rows if r.get("fold") == "0"][:args.limit]
    labels = np.asarray([int(r["label"]) for r in rows])
    kinds = [r["kind"] for r in rows]
    results: dict = {"bundle": det.model_id, "n_images": len(rows), "threshold": spec.threshold,
                     "band": list(spec.uncertain_band), "protocols": {}}
    for protocol in ("A", "B"):
        scored = score_rows(det, rows, protocol)
        s = np.asarray([x["score"] for x in scored])
        w = np.asarray([x["whole"] for x in scored])
        results["protocols"][protocol] = {
            "ensemble": kind_table(labels, kinds, s), "whole_image_experts_only": kind_table(labels, kinds, w),
            "band": band_stats(labels, s, spec.uncertain_band, spec.threshold),
            "images_with_faces": int(sum(x["face"] is not None for x in scored))}
        for name in spec.experts:
            if name.reads == "image":
                e = np.asarray([x["experts"].get(name.name, np.nan) for x in scored])
                results["protocols"][protocol][f"expert {name.name}"] = kind_table(labels, kinds, e)["all"]
    # the map on edits and blends of fold-0 reals (never trained on)
    local = read_manifest(work / "local.csv")
    held = [{**r, "path": str(local.abspath(r)), "mask": str(local.abspath({"path": r["mask"]})),
             "op": r.get("op") or r["kind"]} for r in local.rows if r.get("fold") == "0" and r.get("mask")]
    held = held[:args.limit] if args.limit else held
    maps_manifest = write_manifest(out / "held_out_local.csv", held)
    results["maps"] = score_maps(bundle, Path(maps_manifest), None)
    if spec.reads_faces:
        results["face_shortcuts"] = face_shortcuts(bundle, work, det, spec.threshold)
    (out / "default_eval.json").write_text(json.dumps(results, indent=2))
    md = markdown(results)
    (out / "default_eval.md").write_text(md)
    print(md)
    return 0


def markdown(r: dict) -> str:
    lines = [f"# weights/default on fold 0 ({r['n_images']} images it never trained on), bundle {r['bundle']}", ""]
    for p, d in r["protocols"].items():
        lines += [f"## protocol {p}", "", "| fakes | n | AUC | TPR at 5 % FPR | whole-image experts only: AUC | TPR |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for kind, m in d["ensemble"].items():
            w = d["whole_image_experts_only"][kind]
            lines.append(f"| {kind} | {m['n_fake']} | {m['auc']:.3f} | {m['tpr_at_fpr_5pct']:.2f} | {w['auc']:.3f} | "
                         f"{w['tpr_at_fpr_5pct']:.2f} |")
        b = d["band"]
        lines += ["", f"uncertain band: {b['inside']:.0%} of images inside (reals {b['inside_real']:.0%}, fakes "
                  f"{b['inside_fake']:.0%}), {b['error_outside']:.1%} of verdicts outside it wrong; at the threshold "
                  f"FPR {b['fpr_at_threshold']:.2f}, TPR {b['tpr_at_threshold']:.2f}; images with faces "
                  f"{d['images_with_faces']}", ""]
        for k, v in d.items():
            if k.startswith("expert "):
                lines.append(f"- {k} alone: AUC {v['auc']:.3f}, TPR at 5 % FPR {v['tpr_at_fpr_5pct']:.2f}")
        lines.append("")
    lines += ["## maps against true masks (edits and blends of fold-0 photos)", "",
              "| op | n | pixel AUC (mean per image) | pooled | random map | map inside / outside |",
              "| --- | --- | --- | --- | --- | --- |"]
    for op, m in r["maps"].items():
        lines.append(f"| {op} | {m['n']} | {m['pixel_auc_mean']:.3f} | {m['pixel_auc_pooled']:.3f} | "
                     f"{m['random_map_auc']:.2f} | {m['inside']:.3f} / {m['outside']:.3f} |")
    if "face_shortcuts" in r:
        lines += ["", "## the face expert alone (shortcut check)", "", "| input | n | mean score | at or above the threshold |",
                  "| --- | --- | --- | --- |"]
        for k, v in r["face_shortcuts"].items():
            lines.append(f"| {k} | {v['n']} | {v['mean']:.3f} | {v['at_or_above_threshold']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
