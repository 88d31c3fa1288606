"""Active-learning simulation on ../shared/data/dev + more: how many labels each `dfx select` strategy needs.

Two protocols (--protocol): "arrival" (default): new generator families (three held-out ones) reach the
unlabelled pool, half of their fakes there and half in the test set, which a strategy should find and label
first; "lofo": their fakes are only in the test set, so labels can help only by generalising.

A two-expert probe ensemble (frozen EfficientNet-Lite0 features, pkg:efficientnet_lite0, 4 tiles of 224 px;
one logistic head on stages 1-2, one on stages 3-4; ensemble = the mean of their probabilities, as a bundle
averages its experts) is retrained from scratch each round on the labelled set; probe heads make a round
cost a second. Test set, fixed and never labelled: fakes of three held-out generator families (see the protocols) plus
the reals of one source-grouped real fold. Pool: everything else. Start: a stratified
10 % of the pool labelled; each round labels `--per-round` more, chosen by the strategy with the very
functions `dfx select` uses (training/select.py: rank, k_center_greedy), embeddings = the image's
standardised features (mean over its crops). Several seeds (the initial set and random picks change).

Reported: AUC on the test set against labels, per strategy (mean over seeds), as a table, JSON and
PNG; and for each strategy the labels it needs to reach random selection's final AUC (the target: the
best strategy needs at most 60 % of random's labels).

Run by hand (not a test; a few minutes once features exist; extracting them takes about 3 minutes):
    .venv/bin/python bench/active_learning.py --out runs/active [--features runs/probe/features_A.npz]
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

HELD_OUT = ("stylegan-progan", "kandinsky", "inpainting")
EXPERTS = {"s1-2": (1, 2), "s3-4": (3, 4)}


def image_means(feats: np.ndarray, owners: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n, feats.shape[1]))
    np.add.at(out, owners, feats)
    counts = np.bincount(owners, minlength=n)[:, None]
    return out / np.maximum(counts, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/active")
    ap.add_argument("--features", default=str(ROOT / "runs" / "probe" / "features_A.npz"),
                    help="protocol-A features of dev+more from bench/probe_eval.py (extracted here when missing)")
    ap.add_argument("--per-round", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--C", type=float, default=0.01)
    ap.add_argument("--protocol", choices=("lofo", "arrival"), default="arrival",
                    help="lofo: the held-out families appear only in the test set; arrival: half of their fakes "
                         "arrive in the unlabelled pool, the other half is the test (default)")
    args = ap.parse_args()
    from probe_eval import DATA, family_of, features, real_folds, rows_of, stage_columns

    from training.metrics import binary_metrics
    from training.probe import ProbeSpec, build_probe, fit_head
    from training.select import STRATEGIES, rank

    if not all((DATA / c / "manifest.csv").is_file() for c in ("dev", "more")):
        print(f"skipped: dev and more not found under {DATA}", file=sys.stderr)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = rows_of(["dev", "more"])
    n = len(rows)
    y = np.asarray([r["label"] for r in rows])
    spec = ProbeSpec(stages=(0, 1, 2, 3, 4))
    feat_path = Path(args.features)
    feats, owners = features(rows, spec, feat_path.parent, "A") if feat_path.name == "features_A.npz" \
        else features(rows, spec, out, "A")
    channels = build_probe(spec).backbone.feature_info.channels()
    cols = {name: stage_columns(channels, spec.stages, keep) for name, keep in EXPERTS.items()}
    fams = [family_of(r) for r in rows]
    folds = real_folds(rows)
    new = np.asarray([f in HELD_OUT for f in fams])
    if args.protocol == "lofo":  # the new families' fakes are only in the test set
        in_test = new
    else:  # "arrival": half of the new families' fakes arrive in the pool, the other half is the test
        in_test = new & (np.random.default_rng(12345).random(n) < 0.5)
    test = in_test | np.asarray([r["label"] == 0 and folds[i] == 0 for i, r in enumerate(rows)])
    pool_all = np.flatnonzero(~test & ~(new & (args.protocol == "lofo")))
    has = np.bincount(owners, minlength=n) > 0
    pool_all = pool_all[has[pool_all]]
    test_idx = np.flatnonzero(test & has)
    emb_all = image_means(feats, owners, n)
    mu, sd = emb_all[pool_all].mean(0), emb_all[pool_all].std(0) + 1e-6
    emb_all = (emb_all - mu) / sd
    print(f"{n} images; pool {len(pool_all)}, test {len(test_idx)} ({int(y[test_idx].sum())} fakes of "
          f"{', '.join(HELD_OUT)}, {int((y[test_idx] == 0).sum())} reals)", file=sys.stderr)

    def fit_and_score(labelled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-image probabilities of every image: (ensemble (n,), experts (n, E))."""
        mask = np.isin(owners, labelled)
        probs = []
        for c in cols.values():
            head = fit_head(feats[mask][:, c], y[owners[mask]], C=args.C)
            probs.append(head.image_probs(feats[:, c], owners, n))
        ex = np.stack(probs, axis=1)
        return ex.mean(axis=1), ex

    curves: dict[str, list[list[float]]] = {s: [] for s in STRATEGIES}
    labels_axis: list[int] = []
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        init = []
        for label in (0, 1):  # stratified 10 %
            group = pool_all[y[pool_all] == label]
            init += rng.choice(group, max(2, round(0.1 * len(group))), replace=False).tolist()
        for strategy in STRATEGIES:
            labelled = np.asarray(sorted(init))
            aucs, axis = [], []
            for rnd in range(args.rounds + 1):
                score, ex = fit_and_score(labelled)
                aucs.append(binary_metrics(y[test_idx].tolist(), score[test_idx].tolist())["auc"])
                axis.append(len(labelled))
                if rnd == args.rounds:
                    break
                unl = np.setdiff1d(pool_all, labelled)
                picks, _ = rank(strategy, min(args.per_round, len(unl)), scores=score[unl], experts=ex[unl],
                                threshold=0.5, emb=emb_all[unl], labelled_emb=emb_all[labelled],
                                seed=seed * 1000 + rnd, n=len(unl))
                labelled = np.union1d(labelled, unl[picks])
            curves[strategy].append(aucs)
            labels_axis = axis
            print(f"seed {seed} {strategy:>12}: " + " ".join(f"{a:.3f}" for a in aucs), file=sys.stderr, flush=True)
    mean = {s: np.mean(v, axis=0) for s, v in curves.items()}
    target = float(mean["random"][-1])
    needed = {}
    for s, m in mean.items():
        hit = np.flatnonzero(m >= target - 1e-9)
        needed[s] = int(labels_axis[hit[0]]) if len(hit) else None
    added = {s: (None if v is None else v - labels_axis[0]) for s, v in needed.items()}
    random_added = labels_axis[-1] - labels_axis[0]
    lines = [f"# Active learning on dev + more, protocol {args.protocol} ({len(pool_all)} pool images, {len(test_idx)} "
             f"test images: fakes of the families {', '.join(HELD_OUT)} and one real fold; {args.seeds} seeds; start {labels_axis[0]} labels, "
             f"+{args.per_round} per round)", "",
             "| strategy | " + " | ".join(str(a) for a in labels_axis) + " | labels to reach random's final AUC "
             "| share of random's added labels |",
             "| --- | " + " | ".join("---" for _ in labels_axis) + " | --- | --- |"]
    for s in STRATEGIES:
        share = "–" if added[s] is None else f"{100 * added[s] / random_added:.0f} %"
        lines.append(f"| {s} | " + " | ".join(f"{a:.3f}" for a in mean[s]) + f" | {needed[s] or 'not reached'} | "
                     f"{share} |")
    lines += ["", f"Random selection's final AUC: {target:.3f} at {labels_axis[-1]} labels. Mean over seeds; "
              "std over seeds at the last round: " + ", ".join(f"{s} {np.std([c[-1] for c in curves[s]]):.3f}"
                                                               for s in STRATEGIES)]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"labels": labels_axis, "curves": curves, "needed": needed,
                                                  "random_final_auc": target, "held_out": HELD_OUT}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for s in STRATEGIES:
        ax.plot(labels_axis, mean[s], marker="o", ms=3, label=s, lw=2.5 if s == "random" else 1.5,
                ls="--" if s == "random" else "-")
    ax.set(xlabel="labelled images", ylabel="AUC on held-out families",
           title="Active learning: AUC against labels (mean over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
