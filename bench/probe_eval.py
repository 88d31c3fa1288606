"""Leave-one-generator-family-out numbers for probe experts on ../shared/data/dev + more, two protocols, and
(with --export) the bundle trained on everything.

Run by hand (not a test; about 10 minutes of CPU):
    .venv/bin/python bench/probe_eval.py --out runs/probe [--export weights/default]

Features: a frozen ImageNet backbone (default EfficientNet-Lite0 from pkg:efficientnet_lite0), every stage
mean+std pooled, per native-resolution crop (tiles, 4 crops of 224 px), extracted once per protocol:
  A: the files as they are;
  B: short side to 256, centre crop 256², JPEG quality 90 (made in memory), so format, size and aspect ratio
     cannot be the cue.
LOFO: for each fake family (generator repos grouped by model lineage, FAMILIES below) the test set is that
family's fakes, plus the reals of one of five source-grouped real folds, plus every real from a repo that
also supplied the family's fakes (a fake's own original never sits on the other side). Everything else
trains a logistic regression on standardised features. Scores are per image (mean over its crops' probabilities,
as the Detector does). Training data per condition: "A" (native files only) or "A+B" (each image native and
re-encoded: the head cannot lean on the file format). Stage subsets are columns of one extraction.
Writes <out>/results.json, <out>/results.md and <out>/lofo.png.
"""

from __future__ import annotations

import argparse
import io
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
DATA = ROOT.parent / "shared" / "data"

FAMILIES: dict[str, set[str]] = {
    "sd-1.x/2.x": {"CompVis/stable-diffusion", "Stability-AI/stablediffusion", "frederikstroem/stable-diffusion",
                   "Mikubill/sd-webui-controlnet", "tencent-ailab/IP-Adapter", "luosiallen/latent-consistency-model",
                   "lllyasviel/IC-Light", "modelscope/facechain"},
    "comfyui-community-sd": {"comfyanonymous/ComfyUI_examples"},
    "latent-diffusion": {"CompVis/latent-diffusion"},
    "stable-cascade": {"Stability-AI/StableCascade"},
    "dalle-2": {"openai/dalle-2-preview"},
    "kandinsky": {"ai-forever/Kandinsky-2", "ai-forever/Kandinsky-3"},
    "autoregressive-vq": {"CompVis/taming-transformers", "kuprel/min-dalle", "FoundationVision/Infinity",
                          "deepseek-ai/Janus"},
    "omnigen-step1x": {"VectorSpaceLab/OmniGen", "stepfun-ai/Step1X-Edit"},
    "stylegan-progan": {"rosinality/stylegan2-pytorch", "NVlabs/stylegan2", "NVlabs/stylegan3",
                        "justinpinkney/awesome-pretrained-stylegan2", "a312863063/seeprettyface-generator-yellow",
                        "tkarras/progressive_growing_of_gans"},
    "biggan": {"ajbrock/BigGAN-PyTorch", "huggingface/pytorch-pretrained-BigGAN"},
    "gan-inversion-face-edit": {"eladrich/pixel2style2pixel", "orpatashnik/StyleCLIP", "yuval-alaluf/SAM",
                                "yuval-alaluf/hyperstyle", "yuval-alaluf/stylegan3-editing"},
    "faceswap": {"iperov/DeepFaceLab", "iperov/DeepFaceLive", "neuralchen/SimSwap", "ai-forever/ghost",
                 "haofanwang/inswapper", "yuezunli/celeb-deepfakeforensics"},
    "inpainting": {"geekyutao/Inpaint-Anything"},
}
STAGE_SETS = {"s3": (3,), "s1-3": (1, 2, 3), "s1-4": (1, 2, 3, 4), "s0-4": (0, 1, 2, 3, 4)}
#: CLIP ViT-B/16 (pkg:clip_vit_b16): block i's class token (0..11) and 12, the L2-normalised image embedding.
CLIP_STAGE_SETS = {"embed": (12,), "b11+embed": (11, 12), "b10-12": (10, 11, 12), "b8-12": (8, 9, 10, 11, 12),
                   "b8-11": (8, 9, 10, 11), "b6-12": tuple(range(6, 13)), "b4-12": tuple(range(4, 13)),
                   "b0-12": tuple(range(13)), "b4-8": (4, 5, 6, 7, 8)}


def rows_of(names: list[str]) -> list[dict]:
    from inference.manifest import read_manifest

    rows = []
    for name in names:
        man = read_manifest(DATA / name / "manifest.csv")
        rows += [{**r, "abspath": str(man.abspath(r)), "collection": name, "label": int(r["label"])} for r in man.rows]
    return rows


def protocol_b(img):
    from PIL import Image

    from inference.preprocess import resize_for

    buf = io.BytesIO()
    resize_for(img, 256, "crop").save(buf, "JPEG", quality=90)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def features(rows: list[dict], spec, out: Path, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    from training.probe import build_probe, extract

    cache = out / f"features_{protocol}.npz"
    if cache.exists():
        z = np.load(cache)
        return z["feats"], z["owners"]
    net = build_probe(spec)
    t0 = time.time()
    feats, owners, errors = extract(net, spec.expert(), [r["abspath"] for r in rows],
                                    transform=protocol_b if protocol == "B" else None, desc=f"protocol {protocol}")
    bad = [e for e in errors if e]
    print(f"protocol {protocol}: {len(rows)} images, {feats.shape[0]} crops in {time.time() - t0:.0f} s; "
          f"{len(bad)} unreadable", file=sys.stderr)
    np.savez(cache, feats=feats, owners=owners)
    return feats, owners


def stage_widths(net, size: int) -> list[int]:
    """The width of each stage's pooled vector, in the net's stage order."""
    import torch

    with torch.inference_mode():
        vectors = net.stage_vectors(torch.zeros(1, 3, size, size))
    return [vectors[s].shape[1] for s in net.stages]


def columns(widths: list[int], stages_all: tuple[int, ...], keep: tuple[int, ...]) -> np.ndarray:
    """Columns of the pooled vector (one block of ``widths[i]`` per extracted stage) for the stages ``keep``."""
    cols, start = [], 0
    for s, w in zip(stages_all, widths):
        if s in keep:
            cols += list(range(start, start + w))
        start += w
    return np.asarray(cols)


def stage_columns(channels: list[int], stages_all: tuple[int, ...], keep: tuple[int, ...]) -> np.ndarray:
    """Columns of a CNN probe's pooled vector ([mean_s, std_s] per extracted stage, in order) for the stages ``keep``."""
    return columns([2 * c for c in channels], stages_all, keep)


def family_of(row: dict) -> str | None:
    if row["label"] == 0:
        return None
    for fam, sources in FAMILIES.items():
        if row["source"] in sources:
            return fam
    raise KeyError(f"fake source {row['source']} has no family in FAMILIES")


def real_folds(rows: list[dict], k: int = 5) -> np.ndarray:
    """Reals in k folds grouped by source repo (greedy balance by count); -1 for fakes."""
    from collections import Counter

    counts = Counter(r["source"] for r in rows if r["label"] == 0)
    load = [0] * k
    fold_of = {}
    for src, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        f = int(np.argmin(load))
        fold_of[src] = f
        load[f] += n
    return np.asarray([fold_of[r["source"]] if r["label"] == 0 else -1 for r in rows])


def held_out(labels, sources, families, folds, index: int, fam: str) -> np.ndarray:
    """The test set when family number ``index`` (name ``fam``) is left out: its fakes, the reals of real fold
    ``index % 5``, and every real from a repository that also supplied that family's fakes (so a fake's own
    original is never on the training side). One definition for every leave-one-family-out bench."""
    return np.asarray([f == fam or (lab == 0 and (fold == index % 5 or src in FAMILIES[fam]))
                       for lab, src, f, fold in zip(labels, sources, families, folds)])


def lofo(rows, folds, train_sets, test_sets, n, C):
    """Per family: AUC and TPR@5%FPR on the test images, plus out-of-family predictions for every image."""
    from training.metrics import binary_metrics
    from training.probe import fit_head

    y = np.asarray([r["label"] for r in rows])
    fams = [family_of(r) for r in rows]
    names = list(FAMILIES)
    per_family = {}
    oof_sum, oof_n = {p: np.zeros(n) for p in test_sets}, {p: np.zeros(n) for p in test_sets}
    for i, fam in enumerate(names):
        test = held_out(y, [r["source"] for r in rows], fams, folds, i, fam)
        if not any(f == fam for f in fams):
            continue
        train_img = ~test
        feats, owners = train_sets
        mask = train_img[owners]
        head = fit_head(feats[mask], y[owners[mask]], C=C)
        result = {}
        for proto, (tf, to) in test_sets.items():
            p = head.image_probs(tf, to, n)
            sel = test & ~np.isnan(p)
            m = binary_metrics(y[sel].tolist(), p[sel].tolist())
            result[proto] = {"auc": m["auc"], "tpr_at_fpr_5pct": m["tpr_at_fpr_5pct"], "n_fake": int((y[sel] == 1).sum()),
                             "n_real": int((y[sel] == 0).sum())}
            oof_sum[proto][sel] += p[sel]
            oof_n[proto][sel] += 1
        per_family[fam] = result
    oof = {p: np.where(oof_n[p] > 0, oof_sum[p] / np.maximum(oof_n[p], 1), np.nan) for p in test_sets}
    return per_family, oof


def dev_to_more(rows, train_sets, test_sets, n, C, baseline: str | None) -> dict:
    """Train on dev only, test on more (no source of more is in dev): per family of more's fakes against all of
    more's reals, for the probe and, when given, an existing bundle scored through the Detector."""
    from training.metrics import binary_metrics
    from training.probe import fit_head

    y = np.asarray([r["label"] for r in rows])
    is_dev = np.asarray([r["collection"] == "dev" for r in rows])
    feats, owners = train_sets
    mask = is_dev[owners]
    head = fit_head(feats[mask], y[owners[mask]], C=C)
    scores = {f"probe {p}": head.image_probs(tf, to, n) for p, (tf, to) in test_sets.items()}
    if baseline:
        from inference import Detector

        det = Detector(baseline, device="cpu")
        for proto in ("A", "B"):
            s = np.full(n, np.nan)
            for i, r in enumerate(rows):
                if not is_dev[i]:
                    from inference.images import load_image

                    img = load_image(r["abspath"])
                    s[i] = det.predict([protocol_b(img) if proto == "B" else img])[0].score
            scores[f"{Path(baseline).name} {proto}"] = s
    fams = [family_of(r) for r in rows]
    out = {}
    for name, s in scores.items():
        per = {}
        for fam in FAMILIES:
            sel = ~is_dev & ((np.asarray(fams, dtype=object) == fam) | (y == 0)) & ~np.isnan(s)
            if (y[sel] == 1).sum() == 0:
                continue
            m = binary_metrics(y[sel].tolist(), s[sel].tolist())
            per[fam] = {"auc": m["auc"], "tpr_at_fpr_5pct": m["tpr_at_fpr_5pct"], "n_fake": int((y[sel] == 1).sum())}
        sel = ~is_dev & ~np.isnan(s)
        m = binary_metrics(y[sel].tolist(), s[sel].tolist())
        out[name] = {"per_family": per, "overall_auc": m["auc"], "overall_tpr_at_fpr_5pct": m["tpr_at_fpr_5pct"],
                     "mean_family_auc": float(np.mean([v["auc"] for v in per.values()]))}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/probe")
    ap.add_argument("--collections", default="dev,more")
    ap.add_argument("--C", default="0.01,0.05,0.2")
    ap.add_argument("--pretrained", default="pkg:efficientnet_lite0",
                    help="the frozen backbone: pkg:efficientnet_lite0 (stage sets s3..s0-4) or pkg:clip_vit_b16 "
                         "(stage sets embed, b11+embed, ...: class tokens of blocks, 12 = the image embedding)")
    ap.add_argument("--preprocess", default="tiles", choices=("tiles", "crop"),
                    help="tiles: --crops native-resolution 224-px crops per image; crop: short side to 224, centre crop")
    ap.add_argument("--crops", type=int, default=4)
    ap.add_argument("--family", default="probe", choices=("probe", "probe_onnx"),
                    help="probe_onnx: features through the onnxruntime graph the bundle serves (use its own --out)")
    ap.add_argument("--stage-sets", default=None, help="comma-separated stage sets to evaluate (default: all)")
    ap.add_argument("--export", default=None, help="write the bundle trained on everything here")
    ap.add_argument("--export-name", default="default", help="the exported bundle's name")
    ap.add_argument("--export-stages", default="s1-4")
    ap.add_argument("--export-C", type=float, default=0.05)
    ap.add_argument("--export-train", default="A+B", choices=("A", "A+B"))
    ap.add_argument("--baseline", default=None, help="also score this bundle (trained on dev) on more, dev→more")
    args = ap.parse_args()
    from training.metrics import binary_metrics, choose_decision
    from training.probe import ProbeSpec, build_probe, export_probe, fit_head

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.collections.split(",")
    missing = [c for c in names if not (DATA / c / "manifest.csv").is_file()]
    if missing:
        print(f"skipped: {', '.join(missing)} not found under {DATA}", file=sys.stderr)
        return 0
    rows = rows_of(names)
    n = len(rows)
    y = np.asarray([r["label"] for r in rows])
    from inference.pretrained import source_of

    source = source_of(args.pretrained)
    stage_sets = CLIP_STAGE_SETS if source.converter == "clip_onnx" else STAGE_SETS
    all_stages_sets = stage_sets
    if args.stage_sets:
        unknown = [k for k in args.stage_sets.split(",") if k not in stage_sets]
        if unknown:
            raise SystemExit(f"--stage-sets: unknown {', '.join(unknown)} (known: {', '.join(stage_sets)})")
        stage_sets = {k: stage_sets[k] for k in args.stage_sets.split(",")}
    if args.export_stages not in stage_sets:  # found out now, not after the extraction and every fit
        raise SystemExit(f"--export-stages {args.export_stages} is not among the evaluated sets "
                         f"({', '.join(stage_sets)}): pass --export-stages with one of them")
    if args.family == "probe_onnx":  # the graph serves blocks, not the embedding: extract only what is asked
        all_stages_sets = stage_sets
    all_stages = tuple(sorted({s for keep in all_stages_sets.values() for s in keep}))  # the cached extraction
    extract_spec = ProbeSpec(arch=source.arch, pretrained=args.pretrained, stages=all_stages,
                             preprocess=args.preprocess, crops=args.crops, family=args.family)
    widths = stage_widths(build_probe(extract_spec), extract_spec.input_size)
    (out / "extract.json").write_text(json.dumps({  # what bench/ensemble_lofo.py needs to read the cached features
        "pretrained": args.pretrained, "arch": source.arch, "clip": source.converter == "clip_onnx",
        "stages": list(extract_spec.stages), "widths": widths, "preprocess": args.preprocess, "crops": args.crops,
        "family": args.family}))
    fa, oa = features(rows, extract_spec, out, "A")
    fb, ob = features(rows, extract_spec, out, "B")
    folds = real_folds(rows)

    # Shortcut baselines: what the file format / size alone would score (no pixels read).
    is_png = np.asarray([r["format"].upper() != "JPEG" for r in rows], dtype=float)
    fmt_auc = binary_metrics(y.tolist(), is_png.tolist())["auc"]

    results = {"n_images": n, "collections": names, "families": {f: sorted(s) for f, s in FAMILIES.items()},
               "format_only_auc": fmt_auc, "conditions": {}}
    best = None
    for sname, keep in stage_sets.items():
        cols = columns(widths, extract_spec.stages, keep)
        for train_name in ("A", "A+B"):
            if train_name == "A":
                train_sets = (fa[:, cols], oa)
            else:
                train_sets = (np.concatenate([fa[:, cols], fb[:, cols]]), np.concatenate([oa, ob]))
            for C in [float(c) for c in args.C.split(",")]:
                per_family, oof = lofo(rows, folds, train_sets, {"A": (fa[:, cols], oa), "B": (fb[:, cols], ob)}, n, C)
                summary = {p: {"mean_auc": float(np.mean([v[p]["auc"] for v in per_family.values()])),
                               "mean_tpr_at_fpr_5pct": float(np.mean([v[p]["tpr_at_fpr_5pct"] for v in per_family.values()]))}
                           for p in ("A", "B")}
                key = f"{sname} train={train_name} C={C:g}"
                results["conditions"][key] = {"per_family": per_family, "summary": summary}
                print(f"{key}: LOFO mean AUC A {summary['A']['mean_auc']:.3f} B {summary['B']['mean_auc']:.3f}; "
                      f"TPR@5% A {summary['A']['mean_tpr_at_fpr_5pct']:.2f} B {summary['B']['mean_tpr_at_fpr_5pct']:.2f}",
                      file=sys.stderr, flush=True)
                if sname == args.export_stages and train_name == args.export_train and C == args.export_C:
                    best = (key, oof)
                    write_oof(out / "oof.csv", rows, oof, key)
    if "dev" in names and "more" in names:
        keep = stage_sets[args.export_stages]
        cols = columns(widths, extract_spec.stages, keep)
        train_sets = ((np.concatenate([fa[:, cols], fb[:, cols]]), np.concatenate([oa, ob])) if args.export_train == "A+B"
                      else (fa[:, cols], oa))
        results["dev_to_more"] = dev_to_more(rows, train_sets, {"A": (fa[:, cols], oa), "B": (fb[:, cols], ob)}, n,
                                             args.export_C, args.baseline)
        for name, v in results["dev_to_more"].items():
            print(f"dev→more {name}: AUC {v['overall_auc']:.3f}, mean family AUC {v['mean_family_auc']:.3f}, "
                  f"TPR@5% {v['overall_tpr_at_fpr_5pct']:.2f}", file=sys.stderr, flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, out / "results.md")
    plot(results, out / "lofo.png")

    if args.export:
        if best is None:
            raise SystemExit("--export-stages/--export-train/--export-C name no evaluated condition")
        key, oof = best
        oof = oof["A"]
        keep = stage_sets[args.export_stages]
        tag = "clip" if source.converter == "clip_onnx" else "lite0"
        spec = ProbeSpec(arch=source.arch, pretrained=args.pretrained, stages=keep, preprocess=args.preprocess,
                         crops=args.crops, name=f"probe-{tag}-{args.export_stages}", family=args.family)
        net = build_probe(spec)
        cols = columns(widths, extract_spec.stages, keep)
        feats = np.concatenate([fa[:, cols], fb[:, cols]]) if args.export_train == "A+B" else fa[:, cols]
        owners = np.concatenate([oa, ob]) if args.export_train == "A+B" else oa
        head = fit_head(feats, y[owners], C=args.export_C)
        ok = ~np.isnan(oof)
        decision = choose_decision(y[ok].tolist(), oof[ok].tolist(), "youden", 0.05, 0.05)
        cond = results["conditions"][key]
        prov = {"trained_with": "bench/probe_eval.py (training/probe.py: frozen features + logistic regression)",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "data": [f"../shared/data/{c}" for c in names], "n_images": n,
                "pretrained": spec.pretrained, "stages": list(keep), "C": args.export_C,
                "train_protocols": args.export_train, "lofo_condition": key, "lofo_summary": cond["summary"]}
        rule = (f"{decision['rule']} on leave-one-family-out predictions (protocol A), each image scored by a head "
                "that never saw its family (fakes) or its source repo's fold (reals)")
        export_probe(args.export, spec, net, head, threshold=float(decision["threshold"]),
                     band=(float(decision["uncertain_band"][0]), float(decision["uncertain_band"][1])), rule=rule,
                     provenance=prov, name=args.export_name, overwrite=True)
        print(f"wrote {args.export} ({key}); threshold {decision['threshold']:.4f}", file=sys.stderr)
    return 0


def write_oof(path: Path, rows: list[dict], oof: dict[str, np.ndarray], key: str) -> None:
    """Each image's leave-one-family-out score per protocol (a head that never saw its family, or its reals'
    fold): what bench/peers.py compares with the peer detectors."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["abspath", "label", "source", "family", "condition"] + [f"score_{p}" for p in oof])
        for i, r in enumerate(rows):
            w.writerow([r["abspath"], r["label"], r["source"], family_of(r) or "real", key]
                       + [f"{oof[p][i]:.6f}" for p in oof])


def write_markdown(results: dict, path: Path) -> None:
    lines = [f"# Probe LOFO on {' + '.join(results['collections'])} ({results['n_images']} images)", "",
             f"Format alone (PNG/other vs JPEG) scores AUC {results['format_only_auc']:.3f} on the whole set.", "",
             "| condition | LOFO mean AUC (A) | TPR@5% (A) | LOFO mean AUC (B) | TPR@5% (B) |", "|---|---|---|---|---|"]
    for key, c in results["conditions"].items():
        s = c["summary"]
        lines.append(f"| {key} | {s['A']['mean_auc']:.3f} | {s['A']['mean_tpr_at_fpr_5pct']:.2f} | "
                     f"{s['B']['mean_auc']:.3f} | {s['B']['mean_tpr_at_fpr_5pct']:.2f} |")
    if "dev_to_more" in results:
        lines += ["", "Trained on dev only, tested on more (sources never seen; every family against all of more's reals):",
                  "", "| model | AUC all | TPR@5% | mean family AUC |", "|---|---|---|---|"]
        for name, v in results["dev_to_more"].items():
            lines.append(f"| {name} | {v['overall_auc']:.3f} | {v['overall_tpr_at_fpr_5pct']:.2f} | "
                         f"{v['mean_family_auc']:.3f} |")
    best = max(results["conditions"].items(), key=lambda kv: kv[1]["summary"]["A"]["mean_auc"])
    lines += ["", f"Per family, {best[0]}:", "", "| family | fakes | reals | AUC A | TPR@5% A | AUC B | TPR@5% B |",
              "|---|---|---|---|---|---|---|"]
    for fam, v in best[1]["per_family"].items():
        lines.append(f"| {fam} | {v['A']['n_fake']} | {v['A']['n_real']} | {v['A']['auc']:.3f} | "
                     f"{v['A']['tpr_at_fpr_5pct']:.2f} | {v['B']['auc']:.3f} | {v['B']['tpr_at_fpr_5pct']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, best = max(results["conditions"].items(), key=lambda kv: kv[1]["summary"]["A"]["mean_auc"])
    fams = list(best["per_family"])
    x = np.arange(len(fams))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for k, proto in enumerate(("A", "B")):
        ax.bar(x + (k - 0.5) * 0.4, [best["per_family"][f][proto]["auc"] for f in fams], 0.4, label=f"protocol {proto}")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, fams, rotation=35, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUC, family held out")
    ax.set_title(f"Leave-one-family-out: {key}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
