"""Heatmaps: patch experts that say where, Detector.explain, `dfx explain`, the API's `explain`, checked against masks."""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score

from inference import Detector
from inference.bundle import BundleError, parse_spec, read_spec
from inference.explain import UNAVAILABLE, input_boxes, read_map16
from inference.families.patch_net import image_log_probs
from training.losses import patch_ce

from .conftest import dfx
from .test_api import Server
from .test_faces import needs_mtcnn

SIDE = 96


def smooth_photo(rng: np.random.Generator, side: int = SIDE) -> np.ndarray:
    """A smooth, photo-like colour field: gradients and soft blobs, no fine texture."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    img = np.zeros((side, side, 3))
    for c in range(3):
        a, b, base = rng.uniform(-80, 80, 2).tolist() + [rng.uniform(60, 190)]
        img[..., c] = base + a * xx + b * yy
        for _ in range(2):
            cx, cy, r, h = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.15, 0.4), rng.uniform(-50, 50)
            img[..., c] += h * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    return np.clip(img, 0, 255).astype(np.uint8)


def splice(rng: np.random.Generator, side: int = SIDE) -> tuple[np.ndarray, np.ndarray]:
    """A smooth photo with a textured square pasted in, and the square's mask (True = pasted)."""
    img = smooth_photo(rng, side)
    s = int(rng.integers(side // 4, side // 2))
    x, y = (int(v) for v in rng.integers(0, side - s, 2))
    texture = rng.uniform(0, 255, (s, s, 1)) * 0.7 + rng.uniform(0, 255, (1, 1, 3)) * 0.3
    img[y:y + s, x:x + s] = texture.clip(0, 255).astype(np.uint8)
    mask = np.zeros((side, side), dtype=bool)
    mask[y:y + s, x:x + s] = True
    return img, mask


def write_splices(folder: Path, n: int, seed: int) -> Path:
    """n reals and n splices (PNG, masks beside them) and a manifest with a train/val split."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.fromarray(smooth_photo(rng)).save(folder / f"real{i}.png")
        img, mask = splice(rng)
        Image.fromarray(img).save(folder / f"fake{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"fake{i}_mask.png")
        split = "val" if i % 4 == 0 else "train"
        rows += [{"path": f"real{i}.png", "label": 0, "source": "smooth", "split": split, "mask": ""},
                 {"path": f"fake{i}.png", "label": 1, "source": "splice", "split": split, "mask": f"fake{i}_mask.png"}]
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder / "manifest.csv"


@pytest.fixture(scope="module")
def patch_bundle(tmp_path_factory) -> Path:
    """A patch expert (ConvNeXt-atto cut after stage 0, random start) trained by `dfx train` on synthetic
    splices with their masks, exported."""
    d = tmp_path_factory.mktemp("patch")
    manifest = write_splices(d / "data", 48, seed=1)
    cfg = {"output": str(d / "run"), "seed": 0,
           "data": {"manifest": str(manifest), "balanced_sampler": True, "workers": 0},
           "experts": [{"arch": "convnext_atto", "family": "patch", "stages": [0], "input_size": SIDE,
                        "preprocess": "squash"}],
           "loss": {"ce": 1.0, "kl": 0.2, "nce": 0.0},
           "optim": {"lr": 0.003, "warmup_steps": 4},
           "train": {"epochs": 20, "batch_size": 16, "ema_decay": 0.9, "checkpoint_every_steps": 0},
           "augment": {"blur_p": 0.0, "noise_p": 0.0, "color_p": 0.2}}
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    r = dfx("train", str(d / "cfg.yaml"), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    r = dfx("export", str(d / "run"), "--out", str(d / "bundle"))
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "bundle"


def test_patch_expert_localises_spliced_squares(patch_bundle):
    """Trained for a few steps with every patch labelled by the mask, the expert's heatmap finds squares
    pasted into photos it never saw (pixel-level AUC), and its image score tells splices from reals."""
    spec = read_spec(patch_bundle)
    assert spec.experts[0].family == "patch" and spec.format == "dfx-ensemble/1.4"
    det = Detector(patch_bundle, device="cpu")
    rng = np.random.default_rng(99)
    pairs = [splice(rng) for _ in range(8)]
    expl = det.explain([Image.fromarray(img) for img, _ in pairs])
    aucs = [roc_auc_score(mask.ravel(), e.map_at((SIDE, SIDE)).ravel()) for e, (_, mask) in zip(expl, pairs)]
    assert min(aucs) > 0.8 and float(np.mean(aucs)) > 0.9, aucs
    reals = det.predict([Image.fromarray(smooth_photo(rng)) for _ in range(8)])
    y = [1] * 8 + [0] * 8
    assert roc_auc_score(y, [e.prediction.score for e in expl] + [p.score for p in reals]) > 0.9
    # the explanation's score is exactly predict's
    assert expl[0].prediction.score == pytest.approx(det.predict([Image.fromarray(pairs[0][0])])[0].score, abs=1e-6)


def test_patch_expert_loads_with_plain_timm_as_documented(patch_bundle):
    """The file is a features_only timm backbone plus a 1×1 conv; mean patch softmax gives the bundle's score."""
    import timm
    from safetensors.torch import load_file

    e = read_spec(patch_bundle).experts[0]
    state = load_file(str(patch_bundle / e.file))
    backbone = timm.create_model(e.arch, features_only=True, out_indices=tuple(e.stages))
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")},
                             strict=True)
    head = torch.nn.Conv2d(state["head.weight"].shape[1], 2, 1)
    head.load_state_dict({"weight": state["head.weight"], "bias": state["head.bias"]})
    img, _ = splice(np.random.default_rng(5))
    det = Detector(patch_bundle, device="cpu")
    x = det.prepare(Image.fromarray(img))[e.preprocess_key][None]
    with torch.no_grad():
        p = torch.softmax(head(backbone.eval()(x)[-1]), dim=1)[:, 1].mean().item()
    assert p == pytest.approx(det.predict([Image.fromarray(img)])[0].score, abs=1e-5)


def test_patch_family_fields_are_checked(tmp_path):
    """`dfx bundle init --patch` writes a 1.4 bundle that loads; a patch expert needs exactly one cut stage."""
    import json

    r = dfx("bundle", "init", "--arch", "convnext_atto", "--patch", "1", "--input-size", "64", "--out",
            str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "b" / "ensemble.json").read_text())
    assert doc["format"] == "dfx-ensemble/1.4" and doc["experts"][0]["stages"] == [1]
    assert Detector(tmp_path / "b", device="cpu").models["convnext_atto"].stride == 8
    for bad in (None, [], [1, 2], [9], ["2"]):
        doc["experts"][0]["stages"] = bad
        with pytest.raises(BundleError, match="patch expert needs stages"):
            parse_spec(doc, tmp_path / "ensemble.json")


def test_patch_loss_follows_the_mask_and_image_probability_is_the_patch_mean():
    logits = torch.tensor([[[[2.0, -1.0], [0.0, 3.0]], [[-2.0, 1.0], [0.5, -3.0]]]])  # (1, 2, 2, 2)
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1.0  # the top-left patch is fake, the rest real
    p_fake = torch.softmax(logits, dim=1)[0, 1]
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    expected = -(target * p_fake.log() + (1 - target) * (1 - p_fake).log()).mean()
    assert patch_ce(logits, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.softmax(image_log_probs(logits), dim=1)[0, 1].item() == pytest.approx(p_fake.mean().item(), rel=1e-6)


def test_tiled_expert_maps_each_crop_probability_over_its_crop(tmp_path):
    """A tiled expert's map holds, inside each crop's box, that crop's own probability (averaged where crops
    overlap), and the ensemble map is NaN where no crop fell."""
    from inference.bundle_init import init_bundle
    from inference.experts import fake_probs

    init_bundle(["convnext_atto"], tmp_path / "b", input_size=64, preprocess="tiles", crops=4)
    det = Detector(tmp_path / "b", device="cpu")
    e = det.spec.experts[0]
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8))
    [expl] = det.explain([img], max_side=4096)
    x = det.prepare(img)[e.preprocess_key]
    with torch.no_grad():
        per_crop = [fake_probs(det.models[e.name], x[k:k + 1]).item() for k in range(4)]
    boxes = input_boxes(200, 150, e)
    m = expl.maps[e.name]
    assert m.shape == (150, 200)
    for (x0, y0, x1, y1), p in zip(boxes, per_crop):
        cx, cy = int(x0) + 2, int(y0) + 2  # a corner pixel only this crop covers
        assert m[cy, cx] == pytest.approx(p, abs=1e-4)
    assert not any(x0 <= 100 < x1 and y0 <= 75 < y1 for x0, y0, x1, y1 in boxes), "the centre lies between crops"
    assert np.isnan(expl.ensemble[75, 100]) and np.isnan(m[75, 100])
    assert expl.prediction.score == pytest.approx(float(np.mean(per_crop)), abs=1e-5)


def test_bundle_without_maps_says_so(tiny_bundle, odd_images):
    [expl] = Detector(tiny_bundle, device="cpu").explain([odd_images["rgb.jpg"]])
    assert expl.ensemble is None and expl.maps == {} and expl.unavailable == UNAVAILABLE
    assert 0 <= expl.prediction.score <= 1


def test_dfx_explain_writes_overlays_16bit_maps_and_a_table(patch_bundle, tmp_path):
    rng = np.random.default_rng(7)
    folder = tmp_path / "in"
    folder.mkdir()
    wide = np.concatenate([splice(rng)[0], smooth_photo(rng)], axis=1)  # 192×96: aspect ratio 2
    Image.fromarray(wide).save(folder / "wide.jpg", quality=95)
    Image.fromarray(smooth_photo(rng)).save(folder / "real.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    r = dfx("explain", str(folder), "--weights", str(patch_bundle), "-o", str(tmp_path / "out"), "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = {Path(row["path"]).name: row for row in csv.DictReader(open(tmp_path / "out" / "explain.csv"))}
    assert rows["broken.jpg"]["status"] == "error" and rows["broken.jpg"]["error"]
    det = Detector(patch_bundle, device="cpu")
    for name in ("wide.jpg", "real.png"):
        row = rows[name]
        assert row["status"] == "ok"
        assert float(row["score"]) == pytest.approx(det.predict([folder / name])[0].score, abs=1e-5)
        heat = Image.open(tmp_path / "out" / row["heatmap"])
        heat.load()
        assert heat.format == "PNG" and heat.mode == "RGB"
        raw = Image.open(tmp_path / "out" / row["map"])
        assert raw.size == Image.open(folder / name).size and raw.mode.startswith("I;16")
    wide_map = read_map16(tmp_path / "out" / rows["wide.jpg"]["map"])
    heat = Image.open(tmp_path / "out" / rows["wide.jpg"]["heatmap"])
    assert heat.width > 1.5 * heat.height, "the overlay keeps the landscape image's shape"
    assert np.nanmean(wide_map[:, :96]) > np.nanmean(wide_map[:, 96:]), "the half with the splice is hotter"
    assert float(rows["wide.jpg"]["fake_area"]) > float(rows["real.png"]["fake_area"])


@needs_mtcnn
def test_dfx_explain_faces_scores_each_face_like_predict(tiny_bundle, tmp_path):
    """`dfx explain --faces` gives the same score and face count as `dfx predict --faces`, and says so even for
    a bundle that cannot draw a map."""
    from skimage import data as skdata

    photo = tmp_path / "astronaut.jpg"
    Image.fromarray(skdata.astronaut()).save(photo, quality=92)
    r = dfx("explain", str(photo), "--weights", str(tiny_bundle), "--faces", "-o", str(tmp_path / "out"),
            "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "no expert of this bundle has a map" in r.stderr
    [row] = csv.DictReader(open(tmp_path / "out" / "explain.csv"))
    p = dfx("predict", str(photo), "--weights", str(tiny_bundle), "--faces", "-o", str(tmp_path / "p.csv"),
            "--no-progress")
    assert p.returncode == 0, p.stderr
    [ref] = csv.DictReader(open(tmp_path / "p.csv"))
    assert row["faces"] == "1" and float(row["score"]) == pytest.approx(float(ref["score"]), abs=1e-5)
    assert row["map"] == "" and Image.open(tmp_path / "out" / row["heatmap"]).format == "PNG"


def test_api_explain_answers_a_heatmap_only_when_asked(patch_bundle, tiny_bundle, tmp_path):
    img, _ = splice(np.random.default_rng(11))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    s = Server(patch_bundle, tmp_path / "serve.log", "--threads", "4")
    try:
        plain = requests.post(f"{s.url}/predict", json={"image": b64}, timeout=60).json()
        assert "heatmap" not in plain and "explain_unavailable" not in plain
        for r in (requests.post(f"{s.url}/predict", json={"image": b64, "explain": True}, timeout=60),
                  requests.post(f"{s.url}/predict?explain=1", data=buf.getvalue(),
                                headers={"Content-Type": "image/png"}, timeout=60)):
            body = r.json()
            assert r.status_code == 200 and body["result"] == pytest.approx(plain["result"], abs=1e-6)
            assert body["heatmap"].startswith("data:image/png;base64,") and body["explained_by"]
            pic = Image.open(io.BytesIO(base64.b64decode(body["heatmap"].split(",", 1)[1])))
            pic.load()
            assert pic.format == "PNG" and max(pic.size) <= 512 + 200
        batch = requests.post(f"{s.url}/predict/batch", json={"images": [b64, "bm90IGFuIGltYWdl"], "explain": True},
                              timeout=60).json()["results"]
        assert batch[0]["heatmap"].startswith("data:image/png;base64,") and "error" in batch[1]
        bad = requests.post(f"{s.url}/predict", json={"image": b64, "explain": "yes"}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_field"
    finally:
        s.stop()
    s = Server(tiny_bundle, tmp_path / "serve2.log", "--threads", "2")
    try:
        body = requests.post(f"{s.url}/predict", json={"image": b64, "explain": True}, timeout=60).json()
        assert "heatmap" not in body and body["explain_unavailable"] == UNAVAILABLE and 0 <= body["result"] <= 1
    finally:
        s.stop()


DEFAULT = Path(__file__).resolve().parent.parent / "weights" / "default"


def test_the_default_bundle_draws_a_map_hotter_where_the_photo_was_edited(tmp_path):
    """The shipped bundle says where (its patch expert, trained on the masks of edits of photos): `dfx explain` on a
    photo with an inpainted region writes the overlay and a 16-bit map that covers the image and is hotter over the
    inpainted pixels than elsewhere, and the table's score is the prediction's."""
    from skimage import data as skdata

    from data_prep.edit import inpaint

    photo = skdata.astronaut()
    edited, mask, _ = inpaint(photo, np.random.default_rng(3))
    Image.fromarray(edited).save(tmp_path / "edited.png")
    r = dfx("explain", str(tmp_path / "edited.png"), "-o", str(tmp_path / "out"), "--no-progress",
            env={"DFX_WEIGHTS": str(DEFAULT)})
    assert r.returncode == 0, r.stderr[-2000:]
    [row] = list(csv.DictReader(open(tmp_path / "out" / "explain.csv")))
    assert row["status"] == "ok" and (tmp_path / "out" / row["heatmap"]).is_file()
    m = read_map16(tmp_path / "out" / row["map"])
    assert m.shape == mask.shape and np.isfinite(m).all(), "the map covers the whole image"
    assert m[mask].mean() > m[~mask].mean(), "the inpainted pixels are hotter than the rest"
    [pred] = Detector(DEFAULT, device="cpu").predict([tmp_path / "edited.png"])
    assert float(row["score"]) == pytest.approx(pred.score, abs=1e-5)
