"""A face expert trained on self-blended fakes: does it see the face swaps, face edits and inpainting the whole-image
CLIP probe misses? Leave-one-generator-family-out on dev + more, both protocols.

Inputs (made by the project's own verbs; run by hand, about 15 minutes on 2 CPU cores after them):

- ``runs/sbi/faces``: ``dfx prepare faces`` of every image of dev + more (crops with ``parent``);
- ``runs/sbi/blend``: ``dfx prepare blend --per-image 2`` of every real of dev + more, and ``runs/sbi/blend_faces``
  its face crops (``dfx prepare faces runs/sbi/blend/manifest.csv``);
- ``runs/clip_crop``: ``bench/probe_eval.py --pretrained pkg:clip_vit_b16 --preprocess crop --stage-sets b8-11
  --C 0.02`` (the shipped default's recipe: its ``oof.csv`` is each image's leave-one-family-out whole-image score).

For each held-out family (the test sets of ``bench/probe_eval.py``: its fakes, one real fold, and every real from a
repository that supplied its fakes) a logistic regression is fitted on frozen features of the face crops of every
*other* image, plus the self-blended crops of every real outside the test set (a blend never crosses to the other
side of its real). A test image's face score is the maximum over its faces (``--min-face`` px and up); it is combined
with its whole-image score by ``max``, ``noisy_or`` or ``gated_max`` (an image without a face keeps its whole-image
score). ``gated_max`` is the bundle's ``face_gate`` measured without peeking: per held-out family the gate is the
(1 - ``--gate-fpr``) quantile of the training side's real images' most suspicious faces, each scored by a head fitted
without its real fold; a test face below the gate leaves the whole-image score as it is.
Protocol B (short side 256, centre crop, JPEG 90) is applied to the whole image before its faces are cut (boxes
mapped into the processed image), so a face in B has the pixels a resized, re-compressed upload leaves it.

Conditions: the backbone (CLIP ViT-B/16 class tokens of block sets; ``cliptok``: each block's class token with the
mean and standard deviation of its patch tokens; or EfficientNet-Lite0 stages), and the training
fakes: ``sbi`` (self-blended only: no generator's output is learnt), ``data`` (other families' face crops only) or
``sbi+data``. Against the "a crop = fake" shortcut: every crop, real or fake, is cut by the same finder and framing
(``dfx prepare faces``), and a blend differs from its real only inside its mask.

Writes ``runs/faces_sbi/results.json`` and ``results.md``; prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

FACE_FAMILIES = ("faceswap", "gan-inversion-face-edit", "inpainting")
CLIP_SETS = {"b2-5": (2, 3, 4, 5), "b4-8": (4, 5, 6, 7, 8), "b8-11": (8, 9, 10, 11), "b2-11": tuple(range(2, 12))}
LITE0_SETS = {"s1-4": (1, 2, 3, 4), "s2-3": (2, 3)}
TOKEN_SETS = {"t4-7": (4, 5, 6, 7), "t8-11": (8, 9, 10, 11), "t4-11": tuple(range(4, 12))}


class TokenStats:
    """CLIP blocks read as [class token, mean and standard deviation of the patch tokens]: a blend's seam is local,
    and the class token of a block may not carry it."""

    def __init__(self, net) -> None:
        self.net, self.stages = net, tuple(s for s in net.stages if s < net.depth)

    def stage_vectors(self, x, stages=None) -> dict:
        import torch

        stages = self.stages if stages is None else tuple(stages)
        inter = self.net.backbone.forward_intermediates(x, indices=list(stages), return_prefix_tokens=True, norm=False,
                                                        output_fmt="NLC", intermediates_only=True)
        return {s: torch.cat([prefix[:, 0], patches.mean(1), patches.std(1)], dim=1).float()
                for s, (patches, prefix) in zip(stages, inter)}

    def pooled(self, x):
        import torch

        vectors = self.stage_vectors(x)
        return torch.cat([vectors[s] for s in self.stages], dim=1)


def held_out_setting(whole_csv: str) -> tuple[list[dict], np.ndarray, list, np.ndarray, dict, dict]:
    """What every face bench holds out by family: the rows of dev + more, their labels, families and real folds,
    each family's test set (``probe_eval.held_out``), and each image's leave-one-family-out whole-image score under
    protocols A and B (``bench/probe_eval.py``'s ``oof.csv``)."""
    import csv

    from probe_eval import FAMILIES, family_of, held_out, real_folds, rows_of

    rows = rows_of(["dev", "more"])
    y = np.asarray([r["label"] for r in rows])
    fams = [family_of(r) for r in rows]
    folds = real_folds(rows)
    tests = {fam: held_out(y, [r["source"] for r in rows], fams, folds, i, fam) for i, fam in enumerate(FAMILIES)}
    whole = {p: np.full(len(rows), np.nan) for p in ("A", "B")}
    at = {r["abspath"]: i for i, r in enumerate(rows)}
    with open(whole_csv) as f:
        for r in csv.DictReader(f):
            for p in ("A", "B"):
                whole[p][at[r["abspath"]]] = float(r[f"score_{p}"])
    return rows, y, fams, folds, tests, whole


def crop_table(rows: list[dict], args) -> list[dict]:
    """Every face crop: its image (index into ``rows``; for a blend, its real's), label, box, and origin."""
    from inference.manifest import read_manifest

    def norm(path: str) -> str:  # manifests written from other folders name one file by different spellings
        return os.path.realpath(path)

    index = {norm(r["abspath"]): i for i, r in enumerate(rows)}
    table = []

    def face_of(man, r) -> dict:  # the face as dfx prepare faces found it (box and landmarks, in the sidecar)
        return json.loads(Path(str(man.abspath(r)) + ".json").read_text())

    data = read_manifest(Path(args.faces) / "manifest.csv")
    for r in data.rows:
        i = index.get(norm(str(data.abspath({"path": r["parent"]}))))
        if i is not None:
            table.append({"owner": i, "image": rows[i]["abspath"], "label": rows[i]["label"], "sbi": False,
                          **face_of(data, r)})
    blends = read_manifest(Path(args.blend) / "manifest.csv")
    real_of = {norm(str(blends.abspath(r))): norm(str(blends.abspath({"path": r["parent"]}))) for r in blends.rows}
    sbi = read_manifest(Path(args.blend_faces) / "manifest.csv")
    for r in sbi.rows:
        real = real_of.get(norm(str(sbi.abspath({"path": r["parent"]}))))
        if real in index:
            table.append({"owner": index[real], "image": norm(str(sbi.abspath({"path": r["parent"]}))), "label": 1,
                          "sbi": True, **face_of(sbi, r)})
    return [c for c in table if min(c["box"][2] - c["box"][0], c["box"][3] - c["box"][1]) >= args.min_face]


def cut(image_path: str, found: dict, protocol: str, finder_cache: dict):
    """The face crop as ``dfx prepare faces`` and ``dfx predict`` cut it (upright by the eyes); for protocol B, cut
    from the processed image (box and landmarks mapped), or None when the face left the centre crop."""
    from inference.faces import Face, face_crop
    from inference.images import load_image
    from probe_eval import protocol_b

    img = finder_cache.get(image_path)
    if img is None:
        img = finder_cache[image_path] = load_image(image_path)
        if len(finder_cache) > 8:
            finder_cache.pop(next(iter(finder_cache)))
    box, marks = found["box"], found.get("landmarks")
    if protocol == "A":
        return face_crop(img, Face(box=tuple(box), confidence=1.0, landmarks=tuple(map(tuple, marks)) if marks else None))
    w, h = img.size
    s = 256 / min(w, h)
    left, top = (round(w * s) - 256) // 2, (round(h * s) - 256) // 2
    x1, y1, x2, y2 = (box[0] * s - left, box[1] * s - top, box[2] * s - left, box[3] * s - top)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if not (0 <= cx < 256 and 0 <= cy < 256) or min(x2 - x1, y2 - y1) < 12:
        return None
    moved = tuple((x * s - left, y * s - top) for x, y in marks) if marks else None
    return face_crop(protocol_b(img), Face(box=(x1, y1, x2, y2), confidence=1.0, landmarks=moved))


def crop_features(table: list[dict], spec, out: Path, protocol: str, tag: str) -> np.ndarray:
    """Pooled features of every crop (NaN rows where the crop is gone under protocol B), cached."""
    import torch
    from tqdm import tqdm

    from inference.preprocess import Preprocessor
    from training.probe import build_probe

    cache = out / f"crops_{tag}_{protocol}.npy"
    if cache.exists():
        return np.load(cache)
    net = build_probe(spec)
    if tag == "cliptok":
        net = TokenStats(net)
    pre = Preprocessor([spec.expert().preprocess_key])
    images: dict = {}
    feats: list[np.ndarray | None] = []
    batch, where = [], []
    dim = None

    def flush() -> None:
        nonlocal dim
        if batch:
            with torch.inference_mode():
                f = net.pooled(torch.stack(batch)).numpy()
            dim = f.shape[1]
            for k, v in zip(where, f):
                feats[k] = v
            batch.clear()
            where.clear()

    order = sorted(range(len(table)), key=lambda k: table[k]["image"])  # one decode per image
    feats = [None] * len(table)
    for k in tqdm(order, desc=f"{tag} {protocol}", unit="crop"):
        crop = cut(table[k]["image"], table[k], protocol, images)
        if crop is not None:
            batch.append(next(iter(pre.transform(crop).values())))
            where.append(k)
        if len(batch) == 16:
            flush()
    flush()
    arr = np.stack([f if f is not None else np.full(dim, np.nan, np.float32) for f in feats])
    np.save(cache, arr)
    return arr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/faces_sbi")
    ap.add_argument("--faces", default="runs/sbi/faces")
    ap.add_argument("--blend", default="runs/sbi/blend")
    ap.add_argument("--blend-faces", default="runs/sbi/blend_faces")
    ap.add_argument("--whole", default="runs/clip_crop/oof.csv", help="bench/probe_eval.py's leave-one-family-out scores")
    ap.add_argument("--min-face", type=int, default=32)
    ap.add_argument("--C", type=float, default=0.05)
    ap.add_argument("--backbones", default="clip,lite0")
    ap.add_argument("--sets", default=None, help="comma-separated block/stage sets (default: all), e.g. b8-11")
    ap.add_argument("--fakes", default="sbi,data,sbi+data", help="training fakes conditions to run")
    ap.add_argument("--gate-fpr", type=float, default=0.05,
                    help="the gated rule: a face counts from the score at most this share of the training side's "
                         "real images' faces reach, read from their out-of-fold scores (nested: inner folds)")
    args = ap.parse_args()

    from probe_eval import FAMILIES, columns, stage_widths
    from training.metrics import binary_metrics
    from training.probe import ProbeSpec, build_probe, fit_head

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, y, fams, folds, tests, whole = held_out_setting(args.whole)
    n = len(rows)
    table = crop_table(rows, args)
    owner = np.asarray([c["owner"] for c in table])
    is_sbi = np.asarray([c["sbi"] for c in table])
    cy = np.asarray([c["label"] for c in table])
    print(f"{len(table)} face crops: {int((~is_sbi).sum())} of dev + more images "
          f"({len(set(owner[~is_sbi]))} images), {int(is_sbi.sum())} self-blended", file=sys.stderr)

    backbones = {}
    chosen = args.backbones.split(",")
    if "clip" in chosen:
        backbones["clip"] = (ProbeSpec(arch="vit_base_patch16_clip_quickgelu_224", pretrained="pkg:clip_vit_b16",
                                       stages=tuple(range(12)), preprocess="crop", name="face-clip"), CLIP_SETS, False)
    if "cliptok" in chosen:
        backbones["cliptok"] = (ProbeSpec(arch="vit_base_patch16_clip_quickgelu_224", pretrained="pkg:clip_vit_b16",
                                          stages=tuple(range(4, 12)), preprocess="crop", name="face-clip"),
                                TOKEN_SETS, False)
    if "lite0" in chosen:
        backbones["lite0"] = (ProbeSpec(stages=(0, 1, 2, 3, 4), preprocess="crop", name="face-lite0"), LITE0_SETS, True)
    results: dict = {"n_crops": len(table), "n_sbi": int(is_sbi.sum()), "min_face": args.min_face, "C": args.C,
                     "gate_fpr": args.gate_fpr,
                     "whole": {}, "conditions": {}}
    names = list(FAMILIES)

    def evaluate(scores: dict[str, np.ndarray]) -> dict:
        per = {}
        for fam, test in tests.items():
            per[fam] = {}
            for p, s in scores.items():
                sel = test & ~np.isnan(s)
                m = binary_metrics(y[sel].tolist(), s[sel].tolist())
                per[fam][p] = {"auc": m["auc"], "tpr5": m["tpr_at_fpr_5pct"]}
        return per

    results["whole"] = evaluate(whole)
    for bname, (spec, sets, cnn) in backbones.items():
        net = build_probe(spec)
        if bname == "cliptok":
            net = TokenStats(net)
        widths = stage_widths(net, spec.input_size)
        feats = {p: crop_features(table, spec, out, p, bname) for p in ("A", "B")}
        for sname, keep in sets.items():
            if args.sets and sname not in args.sets.split(","):
                continue
            cols = columns(widths, spec.stages, keep)
            for fakes in args.fakes.split(","):
                face = {p: np.full(n, np.nan) for p in ("A", "B")}
                gates = {p: {} for p in ("A", "B")}
                for fam, test in tests.items():
                    # train: crops of images outside the test set (its reals and the family's fakes), of the
                    # chosen fakes; blends only of reals outside the test set
                    train = ~test[owner]
                    if fakes == "sbi":
                        train &= is_sbi | (cy == 0)
                    elif fakes == "data":
                        train &= ~is_sbi
                    train_f = np.concatenate([feats[p][train][:, cols] for p in ("A", "B")])
                    train_y = np.concatenate([cy[train]] * 2)
                    ok = ~np.isnan(train_f).any(axis=1)
                    head = fit_head(train_f[ok], train_y[ok], C=args.C)
                    # the gate, nested: the training side's real images scored by heads fitted without their real
                    # fold (a blend goes with its real), the (1 - gate_fpr) quantile of their most suspicious faces
                    inner: dict = {"A": {}, "B": {}}
                    for j in sorted(set(folds[owner[train & (cy == 0) & ~is_sbi]].tolist())):
                        fit = train & (folds[owner] != j)
                        fx = np.concatenate([feats[q][fit][:, cols] for q in ("A", "B")])
                        fy = np.concatenate([cy[fit]] * 2)
                        good = ~np.isnan(fx).any(axis=1)
                        h = fit_head(fx[good], fy[good], C=args.C)
                        sel = train & (folds[owner] == j) & ~is_sbi & (cy == 0)
                        for p in ("A", "B"):
                            fs = feats[p][sel][:, cols]
                            okk = ~np.isnan(fs).any(axis=1)
                            for o, v in zip(owner[sel][okk], h.probs(fs[okk])):
                                inner[p][o] = max(inner[p].get(o, 0.0), v)
                    for p in ("A", "B"):
                        vals = list(inner[p].values())
                        gates[p][fam] = float(np.quantile(vals, 1 - args.gate_fpr, method="higher")) if vals else 0.0
                    for p in ("A", "B"):
                        sel = test[owner] & ~is_sbi
                        f = feats[p][sel][:, cols]
                        good = ~np.isnan(f).any(axis=1)
                        for o, v in zip(owner[sel][good], head.probs(f[good])):
                            if fams[o] == fam or y[o] == 0:
                                face[p][o] = v if np.isnan(face[p][o]) else max(face[p][o], v)
                combos = {}
                gate_of = {p: np.zeros(n) for p in ("A", "B")}
                for fam, test in tests.items():
                    for p in ("A", "B"):
                        gate_of[p][test] = gates[p].get(fam, 0.0)
                for p in ("A", "B"):
                    has = ~np.isnan(face[p])
                    counts = has & (np.nan_to_num(face[p]) >= gate_of[p])
                    combos[f"gated_max {p}"] = np.where(counts, np.maximum(whole[p], np.nan_to_num(face[p])), whole[p])
                    combos[f"face-only {p}"] = np.where(has, face[p], np.nan)
                    combos[f"max {p}"] = np.where(has, np.maximum(whole[p], np.nan_to_num(face[p])), whole[p])
                    combos[f"noisy_or {p}"] = np.where(has, 1 - (1 - whole[p]) * (1 - np.nan_to_num(face[p])), whole[p])
                key = f"{bname}:{sname} fakes={fakes}"
                per = evaluate(combos)
                results["conditions"][key] = per
                line = []
                results.setdefault("gates", {})[key] = gates
                for rule in ("max", "gated_max", "noisy_or"):
                    for p in ("A", "B"):
                        mean = np.mean([per[f][f"{rule} {p}"]["auc"] for f in names])
                        line.append(f"{rule} {p} {mean:.3f}")
                ff = " ".join(f"{f[:8]} {per[f]['noisy_or A']['auc']:.2f}/{per[f]['face-only A']['auc']:.2f}"
                              for f in FACE_FAMILIES)
                print(f"{key}: mean AUC {', '.join(line)} | noisy_or/face-only A: {ff}", file=sys.stderr, flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, names, out / "results.md")
    return 0


def write_markdown(results: dict, names: list[str], path: Path) -> None:
    lines = [f"# Face expert, leave one family out ({results['n_crops']} face crops, {results['n_sbi']} self-blended; "
             f"faces of {results['min_face']} px and up; C = {results['C']})", ""]
    w = results["whole"]
    lines += ["| condition | rule | mean AUC A | mean AUC B | TPR@5% A | TPR@5% B | "
              + " | ".join(f"{f} A / B" for f in FACE_FAMILIES) + " | whole-image families mean A / B |",
              "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in FACE_FAMILIES) + " | --- |"]
    other = [f for f in names if f not in FACE_FAMILIES]

    def row(label: str, rule: str, per: dict, key) -> str:
        a = np.mean([per[f][key("A")]["auc"] for f in names])
        b = np.mean([per[f][key("B")]["auc"] for f in names])
        ta = np.mean([per[f][key("A")]["tpr5"] for f in names])
        tb = np.mean([per[f][key("B")]["tpr5"] for f in names])
        fam = " | ".join(f"{per[f][key('A')]['auc']:.3f} / {per[f][key('B')]['auc']:.3f}" for f in FACE_FAMILIES)
        wa = np.mean([per[f][key("A")]["auc"] for f in other])
        wb = np.mean([per[f][key("B")]["auc"] for f in other])
        return f"| {label} | {rule} | {a:.3f} | {b:.3f} | {ta:.2f} | {tb:.2f} | {fam} | {wa:.3f} / {wb:.3f} |"

    lines.append(row("whole-image CLIP probe (the default's recipe)", "-", w, lambda p: p))
    for key, per in results["conditions"].items():
        for rule in ("max", "gated_max", "noisy_or"):
            lines.append(row(key, rule, per, lambda p, r=rule: f"{r} {p}"))
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
