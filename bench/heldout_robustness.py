"""Robustness and test-time augmentation on sources a model never saw: the default's recipe trained on
../shared/data/dev only, then `dfx evaluate --perturb all` and `--tta` on ../shared/data/more.

`weights/default` is trained on dev + more, so its own robustness table (MODEL_CARD.md) is measured on its
training images: its AUCs there say little, its flip rates something. This bench gives the honest view: probes
with the default's recipe (read from its provenance: each expert's backbone, stages, preprocessing and C, trained
on the files as they are and re-encoded) fitted on dev alone, threshold and uncertain band copied from the
default (same recipe; dev has too few images to choose one out of fold), scored on `more`, whose generators and
photo sources dev does not have.

Run by hand (not a test; about 30 minutes on 2 CPU cores):
    .venv/bin/python bench/heldout_robustness.py --out runs/heldout [--perturb all] [--tta hflip,all]
Writes <out>/probe-dev (the bundle), <out>/eval (robustness.md/.json/.png), <out>/tta/<views>/ and
<out>/summary.md.
"""

from __future__ import annotations

import argparse
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


def recipe(default: Path, C: float) -> list[tuple]:
    """The default's experts as (ProbeSpec, C): from its provenance (bench/ensemble_lofo.py writes each expert's
    backbone, stages, preprocessing and C), else the Lite0 probe of the earlier default."""
    from inference.bundle import read_spec
    from inference.pretrained import source_of
    from training.probe import ProbeSpec

    experts = read_spec(default).provenance.get("experts")
    if isinstance(experts, dict) and experts:
        return [(ProbeSpec(arch=source_of(r["pretrained"]).arch, pretrained=r["pretrained"], stages=tuple(r["stages"]),
                           preprocess=r["preprocess"], crops=int(r.get("crops", 1)), name=name), float(r["C"]))
                for name, r in experts.items()]
    return [(ProbeSpec(stages=(1, 2, 3, 4), name="probe-lite0-s1-4"), C)]


def train_dev_probe(out: Path, default: Path, C: float) -> Path:
    from inference.bundle import BundleSpec, read_spec, write_bundle
    from inference.manifest import read_manifest
    from probe_eval import protocol_b
    from training.probe import build_probe, extract, fit_head, head_state, probe_file_state

    bundle = out / "probe-dev"
    if (bundle / "ensemble.json").is_file():
        return bundle
    man = read_manifest(DATA / "dev" / "manifest.csv")
    paths = [str(man.abspath(r)) for r in man.rows]
    y = np.asarray([int(r["label"]) for r in man.rows])
    experts, states, recipes = [], {}, {}
    for spec, c in recipe(default, C):
        net = build_probe(spec)
        fa, oa, _ = extract(net, spec.expert(), paths, desc=f"{spec.name}: dev as is")
        fb, ob, _ = extract(net, spec.expert(), paths, transform=protocol_b, desc=f"{spec.name}: dev re-encoded")
        head = fit_head(np.concatenate([fa, fb]), y[np.concatenate([oa, ob])], C=c)
        experts.append(spec.expert())
        states[spec.name] = probe_file_state(head_state(net, head), spec.pretrained)
        recipes[spec.name] = {"pretrained": spec.pretrained, "stages": list(spec.stages), "C": c}
    ref = read_spec(default)
    write_bundle(bundle, BundleSpec(name="probe-dev", experts=tuple(experts), threshold=ref.threshold,
                                    uncertain_band=ref.uncertain_band,
                                    threshold_rule=f"copied from {default.name} (same recipe, trained on dev + more)",
                                    provenance={"trained_with": "bench/heldout_robustness.py",
                                                "data": ["../shared/data/dev"], "experts": recipes,
                                                "train_protocols": "A+B"}), states)
    return bundle


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/heldout")
    ap.add_argument("--default", default=str(ROOT / "weights" / "default"))
    ap.add_argument("--perturb", default="all")
    ap.add_argument("--tta", default="hflip,all", help="TTA settings to compare with none, ';'-free: hflip,all means "
                                                       "two runs, one with hflip and one with all six views")
    ap.add_argument("--C", type=float, default=0.01)
    args = ap.parse_args()
    if not (DATA / "dev" / "manifest.csv").is_file() or not (DATA / "more" / "manifest.csv").is_file():
        print(f"skipped: dev and more collections not found under {DATA}", file=sys.stderr)
        return 0
    from inference.tta import parse_views
    from training.evaluate import evaluate
    from training.perturb import parse_perturbations

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = train_dev_probe(out, Path(args.default), args.C)
    manifest = DATA / "more" / "manifest.csv"
    timings, tta_rows = {}, []
    settings = ["none"] + [t for t in args.tta.split(",") if t]
    for setting in settings:
        views = parse_views(setting)
        t0 = time.perf_counter()
        m = evaluate(bundle, manifest, out / "tta" / setting, device="cpu", tta=views, resume=True)
        sec = time.perf_counter() - t0
        o = m["overall"]
        tta_rows.append((setting, len(views) + 1, o["auc"], o["tpr_at_fpr_5pct"], o["accuracy"], sec, o["n"] / sec))
        timings[setting] = sec
        print(f"tta {setting}: AUC {o['auc']:.3f} TPR@5% {o['tpr_at_fpr_5pct']:.2f} {sec:.0f} s", file=sys.stderr)
    evaluate(bundle, manifest, out / "eval", device="cpu", resume=True,
             perturb=parse_perturbations(args.perturb, seed=0))
    lines = ["# Held-out robustness and TTA: the default's recipe trained on dev, scored on more", "",
             "## Test-time augmentation (clean files)", "",
             "| TTA | forwards per expert | AUC | TPR@5%FPR | accuracy | seconds | images/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for s, f, auc, tpr, acc, sec, ips in tta_rows:
        lines.append(f"| {s} | {f} | {auc:.3f} | {tpr:.3f} | {acc:.3f} | {sec:.0f} | {ips:.1f} |")
    lines += ["", "## Perturbations (no TTA)", "", (out / "eval" / "robustness.md").read_text()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "tta.json").write_text(json.dumps(tta_rows, indent=2))
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
