"""Verbs of the training package: ``dfx train``, ``dfx export``, ``dfx evaluate``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .perturb import STANDARD


def register(sub: argparse._SubParsersAction) -> None:
    _add_train(sub)
    _add_export(sub)
    _add_demo(sub)
    _add_evaluate(sub)
    _add_select(sub)


def _add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train the experts of a config (CE + KL + NCE, Accelerate, EMA)",
                       description="Train every expert listed in CONFIG.yaml, one after another, then choose the "
                                   "ensemble's threshold on out-of-fold predictions. Overrides are dotted keys: "
                                   "data.manifest=PATH train.epochs=2 output=DIR experts.0.arch=vit_tiny_patch16_224. "
                                   "Multi-GPU: accelerate launch -m inference.cli train CONFIG.yaml. "
                                   "Shipped configs: training/configs/cpu-small.yaml, training/configs/competition.yaml.")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted-key overrides of the config")
    t.add_argument("--init-from", default=None, metavar="BUNDLE",
                   help="fine-tune: start every expert from the bundle's expert of the same name (family and "
                        "architecture must match; experts.N.init_from: BUNDLE:EXPERT picks another); the parent's "
                        "digest goes into the new bundle's provenance. Add data.replay=OLD_MANIFEST:0.25 against forgetting")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in the config's output folder: finished experts are kept, the unfinished "
                        "one continues from its last checkpoint")
    t.set_defaults(func=_train)


def _add_export(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser("export", help="write a bundle from a finished training run",
                       description="Write weights/NAME from a run of `dfx train`: EMA weights, checksums, the "
                                   "out-of-fold threshold and uncertain band, and provenance (config, manifest hash, "
                                   "metrics).")
    x.add_argument("run_dir", metavar="RUN_DIR", help="the run's output folder")
    x.add_argument("--out", required=True, help="bundle folder to write (e.g. weights/NAME)")
    x.add_argument("--name", default=None, help="bundle name (default: the output folder's name)")
    x.add_argument("--force", action="store_true",
                   help="replace the bundle in --out if there is one (files beside it, such as MODEL_CARD.md, are kept)")
    x.add_argument("--half", action="store_true",
                   help="store weights as float16 (half the size; models still run in float32 after loading, "
                        "scores move by about 1e-3)")
    x.set_defaults(func=_export)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    dm = sub.add_parser("demo", help="the whole pipeline on real photographs, on this CPU, in minutes",
                        description="Build reals from photographs shipped by installed packages, make fakes (edits, a "
                                    "tiny Stable Diffusion built from configs), embed and cluster into folds, train two "
                                    "small experts, evaluate on held-out photographs, export a bundle, write a "
                                    "submission and an HTML report. Nothing is downloaded. The weights prove the "
                                    "plumbing, not detection quality.")
    dm.add_argument("--out", default="demo_out", help="output folder, replaced if it exists (default ./demo_out)")
    dm.add_argument("--quick", action="store_true", help="fewer images, 64 px, one epoch (about a minute or two)")
    dm.set_defaults(func=_demo)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="score a labelled manifest with a bundle; metrics, per-source table, ROC",
                       description="Score every row of MANIFEST with the bundle through the inference core and write "
                                   "predictions.csv, metrics.json (AUC, AP, accuracy, EER, TPR at 5/1/0.1%% FPR, ECE, "
                                   "overall, per source and per expert), per_source.md and roc.png. Under torchrun or accelerate launch "
                                   "the rows are split across the processes and the main one writes.")
    e.add_argument("manifest", metavar="MANIFEST", help="manifest CSV with labels")
    e.add_argument("--weights", default=None, help="bundle folder (default: $DFX_WEIGHTS, else weights/default)")
    e.add_argument("--out", default="eval", help="output folder (default ./eval)")
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--workers", type=int, default=None)
    e.add_argument("--resume", action="store_true",
                   help="continue a killed evaluation: skip the rows OUT/**/*.csv.parts/ already hold (clean and "
                        "perturbed)")
    e.add_argument("--perturb", default=None, metavar="SPEC[,SPEC...]",
                   help="also score every image under each perturbation and write robustness.md/.json/.png: "
                        "jpeg:Q, webp:Q, resize:F, crop:F, blur:SIGMA, noise:SIGMA, screenshot, social, none, or all "
                        "(the standard set: " + ", ".join(STANDARD) + ")")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument("--seed", type=int, default=0, help="seed of the random perturbations (noise) (default 0)")
    e.add_argument("--save-perturbed", action="store_true",
                   help="also write the perturbed images to OUT/perturbed/<spec>/ (default: memory only)")
    e.add_argument("--tta", default=None, metavar="VIEWS",
                   help="test-time views instead of the bundle's own: hflip, vflip, rot90, rot180, rot270 "
                        "(comma-separated), all (the 6-view set) or none; compare with a run without it")
    e.set_defaults(func=_evaluate)


def _add_select(sub: argparse._SubParsersAction) -> None:
    from .select import STRATEGIES

    sl = sub.add_parser("select", help="choose which unlabelled images to label next (active learning)",
                        description="Score an unlabelled POOL (a manifest; labels not needed) with a bundle and write "
                                    "the BUDGET rows most worth labelling, with score, criterion and rank columns. "
                                    "Strategies: entropy (closest to the threshold), margin (closest in log-odds), "
                                    "disagreement (experts disagree most), coreset (k-center greedy on embeddings, "
                                    "FAISS), hybrid (the most uncertain 5x budget, then coreset among them), random. "
                                    "Resumable over large pools (--resume).")
    sl.add_argument("pool", metavar="POOL.csv", help="manifest of unlabelled images (a 'path' column suffices)")
    sl.add_argument("--weights", default=None, help="bundle folder (default: $DFX_WEIGHTS, else weights/default)")
    sl.add_argument("--budget", type=int, required=True, help="how many images to select")
    sl.add_argument("-o", "--output", required=True, help="CSV of the selected rows (written atomically)")
    sl.add_argument("--strategy", choices=STRATEGIES, default="entropy", help="(default entropy)")
    sl.add_argument("--exclude", action="append", default=[], metavar="LABELLED.csv",
                    help="skip the rows of this manifest (already labelled); repeatable. coreset/hybrid also start "
                         "from their embeddings")
    sl.add_argument("--embed", default=None, metavar="BACKBONE",
                    help="embedding for coreset/hybrid, as `dfx prepare embed --backbone` (default bundle:WEIGHTS)")
    sl.add_argument("--seed", type=int, default=0, help="seed of the random strategy (default 0)")
    sl.add_argument("--device", default="auto")
    sl.add_argument("--batch-size", type=int, default=32)
    sl.add_argument("--workers", type=int, default=None)
    sl.add_argument("--resume", action="store_true", help="continue a killed run (scores in OUTPUT.parts/)")
    sl.add_argument("--no-progress", action="store_true", help="no progress bars")
    sl.set_defaults(func=_select)


def _demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from .demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def _train(args: argparse.Namespace) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from .config import load_config
    from .trainer import train

    cfg = load_config(args.config, args.overrides)
    if args.init_from:
        for e in cfg.experts:
            e.init_from = e.init_from or args.init_from
    train(cfg, resume=args.resume)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_run

    spec = export_run(args.run_dir, args.out, name=args.name, overwrite=args.force, half=args.half)
    print(f"wrote bundle '{spec.name}' ({len(spec.experts)} experts, threshold {spec.threshold:.4f}) to {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from inference.weights import resolve_weights

    from .evaluate import evaluate

    from inference.tta import parse_views

    from .perturb import parse_perturbations

    try:
        perturb = parse_perturbations(args.perturb, seed=args.seed,
                                      save_dir=str(os.path.join(args.out, "perturbed")) if args.save_perturbed else None) \
            if args.perturb is not None else []
        tta = parse_views(args.tta) if args.tta is not None else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m = evaluate(resolve_weights(args.weights), args.manifest, args.out, device=args.device,
                 batch_size=args.batch_size, workers=args.workers, resume=args.resume, perturb=perturb, tta=tta,
                 progress=not args.no_progress)
    if m is None:  # one of several processes; the main one reports
        return 0
    o = m["overall"]
    print(json.dumps({"model": m["model"], "n": o["n"], "auc": o["auc"], "ap": o["ap"],
                      "tpr_at_fpr_5pct": o["tpr_at_fpr_5pct"], "accuracy": o["accuracy"], "errors": len(m["errors"]),
                      **({"duplicate_rows": m["duplicate_rows"]} if m.get("duplicate_rows") else {})}))
    if "robustness" in m:
        for spec, r in m["robustness"]["perturbations"].items():
            o = r["overall"]
            print(json.dumps({"perturbation": spec, "auc": o["auc"], "auc_drop": o["auc_drop"],
                              "flip_rate": o["flip_rate"], "errors": r["errors"]}))
        print(f"wrote {args.out}/robustness.md, robustness.json, robustness.png, perturbed/*.csv", file=sys.stderr)
    print(f"wrote {args.out}/metrics.json, per_source.md, roc.png, predictions.csv", file=sys.stderr)
    return 0


def _select(args: argparse.Namespace) -> int:
    from inference.weights import resolve_weights

    from .select import select

    info = select(args.pool, resolve_weights(args.weights), args.output, budget=args.budget, strategy=args.strategy,
                  exclude=args.exclude, embed=args.embed, seed=args.seed, device=args.device,
                  batch_size=args.batch_size, workers=args.workers, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(info))
    return 0
