"""Honest numbers on ../shared/data/dev: leave-one-generator-family-out and cluster-fold CV, two protocols.

Run by hand (not a test; CPU, about half an hour):  .venv/bin/python bench/dev_eval.py [--out runs/dev_eval]

Conditions (issue #9; bench/generalise.md has the results):
  (a) plain expert:           bench/dev_eval.py --out runs/ge/a
  (b) + simulated fakes:      bench/dev_eval.py --out runs/ge/b --simulated runs/ge/sim/manifest.csv
  (c) residual expert:        bench/dev_eval.py --out runs/ge/c --simulated ... --stem npr --preprocess tiles --size 96
  (d) ensemble of two runs:   bench/dev_eval.py --out runs/ge/d --ensemble runs/ge/b runs/ge/c
where runs/ge/sim comes from `dfx prepare simulate --reals <dev reals> --out runs/ge/sim`. Simulated fakes join
training only when their parent real is a training real (LOSO: the training half; CV: they take their
parent's fold), so no test real's content is ever seen, as a fake or otherwise.

Protocol A: the files as they are. Protocol B: every image resized (short side 256), centre-cropped to
256×256 and re-encoded as JPEG quality 90, so file format, size and aspect ratio cannot be the cue.

LOSO: for each fake family (stable-diffusion 1.x/2.x repos, latent-diffusion, StyleGAN2, ComfyUI's
modern models), train on the other families' fakes plus the reals of one half of the real clusters, and
test on that family's fakes plus the reals of the other half (so test reals are unseen kinds too).
CV: `dfx prepare cluster` (handcrafted embeddings, k=20) into 5 folds; one expert per fold validates on
it; the out-of-fold ensemble is scored. Everything runs through the real `train`, `export`, `evaluate`.
Writes <out>/results.json and <out>/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEV = ROOT.parent / "shared" / "data" / "dev"
FAMILIES = {
    "stable-diffusion": {"CompVis/stable-diffusion", "Stability-AI/stablediffusion", "frederikstroem/stable-diffusion"},
    "latent-diffusion": {"CompVis/latent-diffusion"},
    "stylegan2": {"rosinality/stylegan2-pytorch"},
    "comfyui-modern": {"comfyanonymous/ComfyUI_examples"},
}


def protocol_b(out: Path, source: Path = DEV / "manifest.csv") -> Path:
    """Re-encode a manifest's images: short side 256, centre crop 256², JPEG q90 (cached). Rows keep their
    columns; a ``parent`` is mapped to the parent's re-encoded file when the parent was re-encoded too."""
    from inference.images import load_image
    from inference.manifest import read_manifest, write_manifest
    from inference.preprocess import resize_for

    man = read_manifest(source)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in man.rows:
        dst = out / (Path(r["path"]).stem + ".jpg")
        if not dst.exists():
            resize_for(load_image(man.abspath(r)), 256, "crop").save(dst, "JPEG", quality=90)
        row = {**r, "path": dst.name}
        if r.get("parent"):
            row["parent"] = str(out / (Path(r["parent"]).stem + ".jpg"))
        rows.append(row)
    return write_manifest(out / "manifest.csv", rows)


def _key(path: str) -> str:
    """Rows and parents are matched by file stem (protocol B renames files but keeps stems)."""
    return Path(path).stem


def with_folds(manifest: Path, work: Path, folds: int, k: int = 20) -> Path:
    from data_prep.cluster import cluster_manifest
    from inference.embed import embed_manifest

    feats = work / f"{manifest.parent.name}.npy"
    if not feats.exists():
        embed_manifest(manifest, feats, progress=False)
    out = work / f"{manifest.parent.name}_folds{folds}.csv"
    if not out.exists():
        cluster_manifest(manifest, feats, out, k=k, folds=folds, make_map=False)
    return out


EXTRA: list[str] = []  # config overrides from --set, applied to every training run


def run_train(name: str, manifest: Path, out: Path, experts: str, epochs: int) -> Path:
    from training.config import load_config
    from training.trainer import train

    run = out / name
    if (run / "run.json").exists():
        return run
    cfg = load_config(ROOT / "training" / "configs" / "cpu-small.yaml",
                      [f"data.manifest={manifest}", f"output={run}", f"train.epochs={epochs}", f"experts={experts}",
                       "train.checkpoint_every_steps=0", *EXTRA])
    train(cfg, resume=run.exists())
    return run


def _simulated_rows(simulated: Path | None) -> list[dict]:
    if simulated is None:
        return []
    from inference.manifest import read_manifest

    sim = read_manifest(simulated)
    return [{**r, "path": str(sim.abspath(r))} for r in sim.rows]


def loso(manifest: Path, work: Path, out: Path, expert: dict, epochs: int, simulated: Path | None = None) -> dict:
    """Leave one fake family out; reals split by cluster halves (fold 0 train, fold 1 test)."""
    from inference.manifest import read_manifest, write_manifest
    from training.evaluate import evaluate
    from training.export import export_run

    halves = read_manifest(with_folds(manifest, work, folds=2))
    train_reals = {_key(r["path"]) for r in halves.rows if r["label"] == "0" and r["fold"] == "0"}
    sims = [r for r in _simulated_rows(simulated) if _key(r["parent"]) in train_reals]
    results = {}
    for fam, sources in FAMILIES.items():
        train_rows, test_rows = [], []
        for i, r in enumerate(halves.rows):
            row = {**r, "path": str(halves.abspath(r))}
            if r["label"] == "1":
                (test_rows if r["source"] in sources else train_rows).append(row)
            else:
                (train_rows if r["fold"] == "0" else test_rows).append(row)
        train_rows += [dict(r) for r in sims]
        for i, r in enumerate(train_rows):  # a small validation split for training's own monitoring
            r["split"] = "val" if i % 7 == 0 else "train"
            r["fold"] = ""
        tm = write_manifest(out / f"loso_{fam}_train.csv", train_rows)
        sm = write_manifest(out / f"loso_{fam}_test.csv", test_rows)
        run = run_train(f"loso_{fam}", tm, out, json.dumps([{**expert, "val_fold": None}]), epochs)
        bundle = out / f"loso_{fam}_bundle"
        if not bundle.exists():
            export_run(run, bundle)
        m = evaluate(bundle, sm, out / f"loso_{fam}_eval", progress=False)["overall"]
        results[fam] = {"auc": m["auc"], "tpr_at_fpr_5pct": m["tpr_at_fpr_5pct"], "n_fake": m["n_fake"],
                        "n_real": m["n_real"]}
        print(f"  LOSO {fam}: AUC {m['auc']:.3f}, TPR@5%FPR {m['tpr_at_fpr_5pct']:.3f}", flush=True)
    return results


def cv(manifest: Path, work: Path, out: Path, expert: dict, epochs: int, folds: int = 5,
       simulated: Path | None = None) -> dict:
    from inference.manifest import read_manifest, write_manifest

    fm = with_folds(manifest, work, folds=folds)
    if simulated is not None:
        # Simulated fakes take their parent's fold: they train only where the parent trains. They are left out
        # of the out-of-fold score (which stays on the collection's own images) by a split the
        # validation ignores: kept in training folds, never validated on.
        man = read_manifest(fm)
        fold_of = {_key(r["path"]): r["fold"] for r in man.rows}
        rows = [{**r, "path": str(man.abspath(r))} for r in man.rows]
        rows += [{**r, "fold": fold_of.get(_key(r["parent"]), ""), "split": "train"} for r in _simulated_rows(simulated)]
        fm = write_manifest(out / "cv_with_simulated.csv", rows)
    experts = json.dumps([{**expert, "val_fold": f, "name": f"{expert['arch']}-f{f}"} for f in range(folds)])
    run = run_train("cv", fm, out, experts, epochs)
    metrics = json.loads((run / "metrics.json").read_text())
    o = metrics["overall"]
    print(f"  CV out-of-fold: AUC {o['auc']:.3f}, TPR@5%FPR {o['tpr_at_fpr_5pct']:.3f}", flush=True)
    return {"overall": {"auc": o["auc"], "tpr_at_fpr_5pct": o["tpr_at_fpr_5pct"]},
            "per_source": {s: {"n": v["n"], "auc_vs_all_reals": v.get("auc_vs_all_reals"), "accuracy": v["accuracy"]}
                           for s, v in metrics["per_source"].items()}}


def ensemble(dirs: list[Path], protocols: list[str]) -> dict:
    """Average the per-image scores of earlier runs (same images, same splits) and score the mean."""
    from inference.manifest import read_manifest
    from training.metrics import metrics_by_source

    def scores(files: list[Path], col: str) -> tuple[list[int], list[float]]:
        per = [{_key(r["path"]): r for r in read_manifest(f).rows} for f in files]
        common = sorted(set.intersection(*(set(p) for p in per)))
        return ([int(per[0][k]["label"]) for k in common],
                [sum(float(p[k][col]) for p in per) / len(per) for k in common])

    results: dict = {"ensemble_of": [str(d) for d in dirs]}
    for proto in protocols:
        results[proto] = {"loso": {}}
        for fam in FAMILIES:
            y, s = scores([d / proto / f"loso_{fam}_eval" / "predictions.csv" for d in dirs], "score")
            m = metrics_by_source(y, s, [""] * len(y))["overall"]
            results[proto]["loso"][fam] = {"auc": m["auc"], "tpr_at_fpr_5pct": m["tpr_at_fpr_5pct"], "n": len(y)}
        oofs = [d / proto / "cv" / "oof.csv" for d in dirs]
        if all(f.is_file() for f in oofs):
            y, s = scores(oofs, "prob")
            m = metrics_by_source(y, s, [""] * len(y))["overall"]
            results[proto]["cv"] = {"overall": {"auc": m["auc"], "tpr_at_fpr_5pct": m["tpr_at_fpr_5pct"]}}
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "dev_eval"))
    ap.add_argument("--arch", default="convnext_atto")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--preprocess", default="squash", help="squash | crop | tiles")
    ap.add_argument("--crops", type=int, default=9, help="tiles: crops scored per image")
    ap.add_argument("--stem", default=None, help="npr | srm: a residual expert")
    ap.add_argument("--simulated", default=None, metavar="MANIFEST",
                    help="simulated fakes of the dev reals (`dfx prepare simulate`) to add to training")
    ap.add_argument("--ensemble", nargs="+", default=None, metavar="RUN_OUT",
                    help="no training: average the per-image scores of these earlier --out folders")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--protocols", nargs="+", default=["A", "B"])
    ap.add_argument("--skip-cv", action="store_true", help="LOSO only")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for every run, e.g. loss.kl=0 loss.nce=0 (an ablation)")
    args = ap.parse_args()
    EXTRA.extend(args.set)
    if not (DEV / "manifest.csv").is_file():
        print("../shared/data/dev is absent: nothing to evaluate", file=sys.stderr)
        return 1
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    expert = {"arch": args.arch, "input_size": args.size, "preprocess": args.preprocess}
    if args.preprocess == "tiles":
        expert["crops"] = args.crops
    if args.stem:
        expert.update(family="residual", stem=args.stem)
    title = (f"Expert: {args.stem + ' residual + ' if args.stem else ''}{args.arch} at {args.size}px "
             f"({args.preprocess}{f', {args.crops} crops' if args.preprocess == 'tiles' else ''}), {args.epochs} "
             f"epochs, from scratch; simulated fakes: {'yes' if args.simulated else 'no'}; "
             f"overrides: {' '.join(args.set) or 'none (CE+KL+NCE)'}.")
    if args.ensemble:
        results = ensemble([Path(d) for d in args.ensemble], args.protocols)
        title = "Ensemble (mean of per-image scores) of: " + ", ".join(args.ensemble) + "."
    else:
        results = {"expert": expert, "epochs": args.epochs, "overrides": args.set, "simulated": args.simulated}
        for proto in args.protocols:
            from inference.manifest import read_manifest, write_manifest

            sim = Path(args.simulated) if args.simulated else None
            if proto == "A":  # a copy next to the work files, so fold files can live beside it
                man = read_manifest(DEV / "manifest.csv")
                manifest = write_manifest(work / "A" / "manifest.csv",
                                          [{**r, "path": str(man.abspath(r))} for r in man.rows])
            else:
                manifest = protocol_b(work / "protocol_b_images")
                if sim is not None:
                    sim = protocol_b(work / "protocol_b_simulated", sim)
            print(f"protocol {proto}", flush=True)
            pout = out / proto
            pout.mkdir(exist_ok=True)
            results[proto] = {"loso": loso(manifest, work, pout, expert, args.epochs, sim)}
            if not args.skip_cv:
                results[proto]["cv"] = cv(manifest, work, pout, expert, args.epochs, simulated=sim)
            (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [title, "",
             "| protocol | LOSO " + " | LOSO ".join(FAMILIES) + " | LOSO mean | cluster-CV OOF |",
             "|---" * (len(FAMILIES) + 3) + "|"]
    for proto in args.protocols:
        r = results[proto]
        cells = [f"{r['loso'][f]['auc']:.3f} ({r['loso'][f]['tpr_at_fpr_5pct']:.2f})" for f in FAMILIES]
        cells.append(f"{sum(r['loso'][f]['auc'] for f in FAMILIES) / len(FAMILIES):.3f}")
        cells.append(f"{r['cv']['overall']['auc']:.3f} ({r['cv']['overall']['tpr_at_fpr_5pct']:.2f})" if "cv" in r else "–")
        lines.append(f"| {proto} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: AUC (TPR at 5% FPR)."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
