"""Leave-one-family-out numbers of probe ensembles: several probes (backbone, stage set, C) fitted on the same
training images per held-out family, their probabilities averaged as the Detector averages experts.

Run by hand after bench/probe_eval.py has cached each backbone's features (not a test; minutes of CPU):
    .venv/bin/python bench/ensemble_lofo.py --out runs/ensemble \
        --member clip=runs/clip_crop:b8-12:0.05 --member lite0=runs/lite0:s1-4:0.01 \
        --ensemble clip --ensemble clip+lite0

A member is ``NAME=RUN_DIR:STAGE_SET:C``: RUN_DIR is a probe_eval ``--out`` folder (its features_A/B.npz and
results.json say which backbone and stages were extracted), STAGE_SET one of that backbone's stage sets. Every
member is trained on protocols A and B together (the default's recipe) and scored on each protocol's held-out
images with the same test sets as probe_eval (``held_out``). Writes <out>/ensembles.md and .json.

``--export DIR --export-ensemble A+B``: that ensemble's members fitted on every image (both protocols) and written
as one bundle (CLIP probes' backbone stored once per expert as its INT8 rows; probes on one backbone share its
forward at scoring time), its threshold and uncertain band chosen on the ensemble's leave-one-family-out scores
(protocol A), as probe_eval does for one probe; <out>/oof.csv holds those scores for bench/peers.py.
"""

from __future__ import annotations

import argparse
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


def member_features(run: Path, stage_set: str):
    """(train feats, train owners, {protocol: (feats, owners)}) of one member's stage columns."""
    from probe_eval import CLIP_STAGE_SETS, STAGE_SETS, columns

    meta = json.loads((run / "extract.json").read_text())
    sets = CLIP_STAGE_SETS if meta["clip"] else STAGE_SETS
    cols = columns(meta["widths"], tuple(meta["stages"]), sets[stage_set])
    za, zb = np.load(run / "features_A.npz"), np.load(run / "features_B.npz")
    fa, oa, fb, ob = za["feats"][:, cols], za["owners"], zb["feats"][:, cols], zb["owners"]
    return np.concatenate([fa, fb]), np.concatenate([oa, ob]), {"A": (fa, oa), "B": (fb, ob)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/ensemble")
    ap.add_argument("--collections", default="dev,more")
    ap.add_argument("--member", action="append", required=True, help="NAME=RUN_DIR:STAGE_SET:C")
    ap.add_argument("--ensemble", action="append", required=True, help="member names joined by +")
    ap.add_argument("--export", default=None, help="write the bundle of --export-ensemble here")
    ap.add_argument("--export-ensemble", default=None, help="which ensemble to export (one of --ensemble)")
    ap.add_argument("--export-name", default="default")
    ap.add_argument("--band", default="verdict_error", choices=("verdict_error", "quantile"),
                    help="the exported uncertain band's rule (training/metrics.py choose_decision)")
    ap.add_argument("--band-error", type=float, default=0.05)
    args = ap.parse_args()
    from probe_eval import FAMILIES, family_of, held_out, real_folds, rows_of
    from training.metrics import binary_metrics
    from training.probe import fit_head

    rows = rows_of(args.collections.split(","))
    n = len(rows)
    y = np.asarray([r["label"] for r in rows])
    fams = [family_of(r) for r in rows]
    folds = real_folds(rows)
    members = {}
    for spec in args.member:
        name, rest = spec.split("=", 1)
        run, stage_set, C = rest.rsplit(":", 2)
        members[name] = (member_features(Path(run), stage_set), float(C))
    runs = {}
    for spec in args.member:
        name, rest = spec.split("=", 1)
        runs[name] = tuple(rest.rsplit(":", 2))
    probs: dict[str, dict[str, dict[str, np.ndarray]]] = {m: {} for m in members}  # member → family → proto → p
    tests = {}
    for i, fam in enumerate(FAMILIES):
        if not any(f == fam for f in fams):
            continue
        test = held_out(y, [r["source"] for r in rows], fams, folds, i, fam)
        tests[fam] = test
        for name, ((tf, to, protos), C) in members.items():
            mask = (~test)[to]
            head = fit_head(tf[mask], y[to[mask]], C=C)
            probs[name][fam] = {p: head.image_probs(f, o, n) for p, (f, o) in protos.items()}
        print(f"{fam}: fitted", file=sys.stderr, flush=True)
    results = {}
    for combo in args.ensemble:
        names = combo.split("+")
        per = {}
        for fam, test in tests.items():
            per[fam] = {}
            for proto in ("A", "B"):
                p = np.mean([probs[m][fam][proto] for m in names], axis=0)
                sel = test & ~np.isnan(p)
                m = binary_metrics(y[sel].tolist(), p[sel].tolist())
                per[fam][proto] = {"auc": m["auc"], "tpr_at_fpr_5pct": m["tpr_at_fpr_5pct"]}
        summary = {proto: {"mean_auc": float(np.mean([v[proto]["auc"] for v in per.values()])),
                           "mean_tpr_at_fpr_5pct": float(np.mean([v[proto]["tpr_at_fpr_5pct"] for v in per.values()]))}
                   for proto in ("A", "B")}
        results[combo] = {"per_family": per, "summary": summary}
        print(f"{combo}: A {summary['A']['mean_auc']:.3f} ({summary['A']['mean_tpr_at_fpr_5pct']:.2f}) "
              f"B {summary['B']['mean_auc']:.3f} ({summary['B']['mean_tpr_at_fpr_5pct']:.2f})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ensembles.json").write_text(json.dumps({"members": args.member, "results": results}, indent=2))
    lines = ["| ensemble | mean AUC A | TPR@5% A | mean AUC B | TPR@5% B |", "|---|---|---|---|---|"]
    for combo, r in results.items():
        s = r["summary"]
        lines.append(f"| {combo} | {s['A']['mean_auc']:.3f} | {s['A']['mean_tpr_at_fpr_5pct']:.2f} | "
                     f"{s['B']['mean_auc']:.3f} | {s['B']['mean_tpr_at_fpr_5pct']:.2f} |")
    fam_names = list(tests)
    lines += ["", "| family | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for fam in fam_names:
        lines.append(f"| {fam} | " + " | ".join(f"{r['per_family'][fam]['A']['auc']:.3f} / "
                                                 f"{r['per_family'][fam]['B']['auc']:.3f}" for r in results.values()) + " |")
    (out / "ensembles.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if all(c in args.collections.split(",") for c in ("dev", "more")):
        is_dev = np.asarray([r["collection"] == "dev" for r in rows])
        cross = {}
        for name, ((tf, to, protos), C) in members.items():
            mask = is_dev[to]
            head = fit_head(tf[mask], y[to[mask]], C=C)
            cross[name] = {p: head.image_probs(f, o, n) for p, (f, o) in protos.items()}
        lines = ["", "Trained on dev only, scored on all of more (sources never seen): AUC A / B, TPR@5% A / B", "",
                 "| ensemble | AUC A | AUC B | TPR@5% A | TPR@5% B |", "|---|---|---|---|---|"]
        for combo in args.ensemble:
            cells = {}
            for proto in ("A", "B"):
                p = np.mean([cross[m][proto] for m in combo.split("+")], axis=0)
                sel = ~is_dev & ~np.isnan(p)
                cells[proto] = binary_metrics(y[sel].tolist(), p[sel].tolist())
            results[combo]["dev_to_more"] = {p: {"auc": m["auc"], "tpr_at_fpr_5pct": m["tpr_at_fpr_5pct"]}
                                             for p, m in cells.items()}
            lines.append(f"| {combo} | {cells['A']['auc']:.3f} | {cells['B']['auc']:.3f} | "
                         f"{cells['A']['tpr_at_fpr_5pct']:.2f} | {cells['B']['tpr_at_fpr_5pct']:.2f} |")
        with open(out / "ensembles.md", "a") as f:
            f.write("\n".join(lines) + "\n")
        (out / "ensembles.json").write_text(json.dumps({"members": args.member, "results": results}, indent=2))
        print("\n".join(lines))
    if args.export:
        export(args, rows, y, tests, probs, members, runs, results)
    return 0


def export(args, rows, y, tests, probs, members, runs, results) -> None:
    """The chosen ensemble fitted on everything, one bundle, threshold from its leave-one-family-out scores."""
    import time

    from probe_eval import CLIP_STAGE_SETS, STAGE_SETS, write_oof
    from inference.bundle import BundleSpec, write_bundle
    from training.metrics import choose_decision
    from training.probe import ProbeSpec, build_probe, fit_head, head_state, probe_file_state

    names = args.export_ensemble.split("+")
    n = len(rows)
    oof = {}
    for proto in ("A", "B"):
        total, count = np.zeros(n), np.zeros(n)
        for fam, test in tests.items():
            p = np.mean([probs[m][fam][proto] for m in names], axis=0)
            sel = test & ~np.isnan(p)
            total[sel] += p[sel]
            count[sel] += 1
        oof[proto] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    out = Path(args.out)
    write_oof(out / "oof.csv", rows, oof, args.export_ensemble)
    ok = ~np.isnan(oof["A"])
    decision = choose_decision(y[ok].tolist(), oof["A"][ok].tolist(), "youden", 0.05, args.band_error, band=args.band)
    experts, states, recipe = [], {}, {}
    for m in names:
        run, stage_set, C = runs[m]
        meta = json.loads((Path(run) / "extract.json").read_text())
        keep = (CLIP_STAGE_SETS if meta["clip"] else STAGE_SETS)[stage_set]
        tag = "clip" if meta["clip"] else meta["arch"].replace("tf_efficientnet_", "")
        spec = ProbeSpec(arch=meta["arch"], pretrained=meta["pretrained"], stages=keep, preprocess=meta["preprocess"],
                         crops=meta["crops"], name=f"probe-{tag}-{stage_set}", family=meta.get("family", "probe"))
        (tf, to, _), C = members[m]
        head = fit_head(tf, y[to], C=C)
        net = build_probe(spec)
        experts.append(spec.expert())
        states[spec.name] = probe_file_state(head_state(net, head), spec.pretrained, spec.family)
        recipe[spec.name] = {"pretrained": spec.pretrained, "stages": list(keep), "preprocess": spec.preprocess,
                             "crops": spec.crops if spec.preprocess == "tiles" else 1, "C": C, "train_protocols": "A+B",
                             "family": spec.family}
    rule = (f"{decision['rule']} on leave-one-family-out predictions (protocol A) of the ensemble, each image scored "
            "by heads that never saw its family (fakes) or its source repo's fold (reals)")
    prov = {"trained_with": "bench/ensemble_lofo.py (training/probe.py: frozen features + logistic regression)",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "data": [f"../shared/data/{c}" for c in args.collections.split(",")], "n_images": n,
            "experts": recipe, "lofo_summary": results[args.export_ensemble]["summary"]}
    bundle = BundleSpec(name=args.export_name, experts=tuple(experts), threshold=float(decision["threshold"]),
                        uncertain_band=(float(decision["uncertain_band"][0]), float(decision["uncertain_band"][1])),
                        threshold_rule=rule, provenance=prov)
    write_bundle(args.export, bundle, states, overwrite=True)
    print(f"wrote {args.export}: {args.export_ensemble}, threshold {decision['threshold']:.4f}, band "
          f"{decision['uncertain_band']}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
