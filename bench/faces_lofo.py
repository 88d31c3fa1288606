"""Do face crops help the probe on generators it never saw? Leave-one-generator-family-out, protocol A.

The same 13 families, test sets, features (``runs/probe/features_*.npz`` from ``bench/probe_eval.py``) and head
(stages 1-4, C = 0.01, trained on both protocols) as the shipped default, plus the faces MTCNN found
(``runs/faces/faces.json`` from ``bench/faces_eval.py``): each face of at least ``--min-face`` pixels is cut out
as ``--faces`` cuts it (upright square, 30 % margin) and read by the same frozen Lite0 stages. Three scorings:

- ``whole``: the default's recipe (whole-image crops only) — reproduces the model card's protocol-A column;
- ``whole (+faces in training)``: the head also trained on the training images' face crops, scored whole;
- ``faces rule``: that head, each test image scored ``max(whole, its most suspicious face)`` (``--faces``).

Protocol A only (faces were found on the files as they are). Run by hand, after the two benches above:
``python bench/faces_lofo.py`` (about 5 minutes on 2 CPU cores). Writes ``runs/faces_lofo/results.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/faces_lofo")
    ap.add_argument("--probe", default="runs/probe", help="bench/probe_eval.py's --out (cached features)")
    ap.add_argument("--faces", default="runs/faces/faces.json", help="bench/faces_eval.py's faces")
    ap.add_argument("--min-face", type=int, default=48, help="smallest face side in pixels that is used")
    ap.add_argument("--C", type=float, default=0.01)
    args = ap.parse_args()

    from inference.faces import Face, face_crop
    from inference.images import load_image
    from probe_eval import FAMILIES, family_of, held_out, real_folds, rows_of, stage_columns
    from training.metrics import binary_metrics
    from training.probe import ProbeSpec, build_probe, extract, fit_head

    out = Path(args.out)
    (out / "crops").mkdir(parents=True, exist_ok=True)
    rows = rows_of(["dev", "more"])
    n = len(rows)
    y = np.asarray([r["label"] for r in rows])
    za, zb = np.load(Path(args.probe) / "features_A.npz"), np.load(Path(args.probe) / "features_B.npz")
    extract_spec = ProbeSpec(stages=(0, 1, 2, 3, 4))
    channels = build_probe(extract_spec).backbone.feature_info.channels()
    cols = stage_columns(channels, extract_spec.stages, (1, 2, 3, 4))
    fa, oa, fb, ob = za["feats"][:, cols], za["owners"], zb["feats"][:, cols], zb["owners"]

    found = json.loads(Path(args.faces).read_text())
    crop_paths, face_owner = [], []
    for i, r in enumerate(rows):
        faces = [f for f in found.get(r["abspath"], {}).get("faces", [])
                 if min(f["box"][2] - f["box"][0], f["box"][3] - f["box"][1]) >= args.min_face]
        if not faces:
            continue
        img = None
        for k, f in enumerate(faces):
            path = out / "crops" / f"{i:05d}_{k}.png"
            if not path.is_file():
                img = img or load_image(r["abspath"])
                face = Face(box=tuple(f["box"]), confidence=f["confidence"],
                            landmarks=tuple(tuple(p) for p in f["landmarks"]) if f.get("landmarks") else None)
                face_crop(img, face).save(path)
            crop_paths.append(str(path))
            face_owner.append(i)
    face_owner = np.asarray(face_owner)
    cache = out / "features_faces.npz"
    if cache.is_file() and len(np.load(cache)["owners_of_faces"]) == len(crop_paths):
        z = np.load(cache)
        ff, fo = z["feats"], z["owners"]
    else:
        spec = ProbeSpec(stages=(1, 2, 3, 4))
        ff, fo, _ = extract(build_probe(spec), spec.expert(), crop_paths, desc="face crops")
        np.savez(cache, feats=ff, owners=fo, owners_of_faces=face_owner)
    n_faces = len(crop_paths)
    has_face = np.zeros(n, dtype=bool)
    has_face[face_owner] = True
    print(f"{n_faces} faces of >= {args.min_face} px in {has_face.sum()} of {n} images", file=sys.stderr)

    folds = real_folds(rows)
    fams = [family_of(r) for r in rows]
    table, means = [], {"whole": [], "whole (+faces in training)": [], "faces rule": []}
    for i, fam in enumerate(FAMILIES):
        test = held_out(y, [r["source"] for r in rows], fams, folds, i, fam)
        train = ~test
        whole_x = np.concatenate([fa[train[oa]], fb[train[ob]]])
        whole_y = np.concatenate([y[oa[train[oa]]], y[ob[train[ob]]]])
        plain = fit_head(whole_x, whole_y, C=args.C)
        face_rows = train[face_owner[fo]]  # face tiles of training images, labelled with their image's label
        both = fit_head(np.concatenate([whole_x, ff[face_rows]]),
                        np.concatenate([whole_y, y[face_owner[fo[face_rows]]]]), C=args.C)
        scores = {"whole": plain.image_probs(fa, oa, n), "whole (+faces in training)": both.image_probs(fa, oa, n)}
        per_face = both.image_probs(ff, fo, n_faces)
        rule = scores["whole (+faces in training)"].copy()
        np.fmax.at(rule, face_owner, per_face)
        scores["faces rule"] = rule
        sel = test & ~np.isnan(scores["whole"])
        aucs = {k: binary_metrics(y[sel].tolist(), v[sel].tolist())["auc"] for k, v in scores.items()}
        for k, v in aucs.items():
            means[k].append(v)
        table.append(f"| {fam} | {int((y[sel] == 1).sum())} | {int((test & has_face & (y == 1)).sum())} | "
                     + " | ".join(f"{aucs[k]:.3f}" for k in means) + " |")
        print(table[-1], file=sys.stderr, flush=True)
    lines = ["| held-out family | fakes | fakes with a face | " + " | ".join(means) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in means) + " |", *table,
             "| **mean** | | | " + " | ".join(f"**{np.mean(v):.3f}**" for v in means.values()) + " |"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
