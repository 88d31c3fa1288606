"""Issue #9's pieces: simulated fakes, residual stems, native-resolution tiles, residual experts end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference import Detector
from inference.bundle import BundleError, read_spec
from inference.bundle_init import init_bundle
from inference.images import load_image
from inference.manifest import read_manifest, write_manifest
from inference.preprocess import TILE_ALIGN, Preprocessor, tile_boxes
from inference.families.residual_stem import ResidualStem, npr_residual

from .conftest import dfx


# -- the residual stems -------------------------------------------------------------------------------
def test_npr_residual_is_zero_for_a_nearest_upsampled_image_on_its_grid():
    rng = np.random.default_rng(0)
    small = torch.from_numpy(rng.normal(size=(1, 3, 16, 20)).astype(np.float32))
    up = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)          # nearest ×2, on the grid
    assert torch.count_nonzero(npr_residual(up)) == 0
    shifted = up[..., 1:, 1:]                                                    # one pixel off the grid
    assert torch.count_nonzero(npr_residual(shifted)) > shifted.numel() // 2
    camera = torch.from_numpy(rng.normal(size=(1, 3, 32, 40)).astype(np.float32))
    r = npr_residual(camera)
    assert torch.count_nonzero(r[..., ::2, ::2]) == 0, "the anchor pixel of each cell is its own reference"
    assert torch.count_nonzero(r) == r.numel() * 3 // 4
    # hand-computed: a 2x2 image [[1, 2], [3, 5]] → [[0, 1], [2, 4]]
    x = torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]])
    assert npr_residual(x).flatten().tolist() == [0.0, 1.0, 2.0, 4.0]


def test_srm_stem_removes_smooth_content():
    stem = ResidualStem("srm")
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    ramp = (0.02 * xx + 0.01 * yy).expand(1, 3, 32, 32)                           # a linear gradient
    assert stem(ramp)[..., 3:-3, 3:-3].abs().max() < 1e-5
    noisy = ramp + 0.1 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert stem(noisy)[..., 3:-3, 3:-3].abs().mean() > 0.05
    assert stem(noisy).shape == (1, 3, 32, 32) and not list(stem.state_dict())


# -- native-resolution tiles --------------------------------------------------------------------------
def test_tile_boxes_are_aligned_inside_and_cover_the_image():
    boxes = tile_boxes(1000, 700, 128, 9)
    assert len(boxes) == 9 and len(set(boxes)) == 9
    for left, top, right, bottom in boxes:
        assert left % TILE_ALIGN == 0 and top % TILE_ALIGN == 0
        assert right - left == 128 and bottom - top == 128
        assert 0 <= left and right <= 1000 and 0 <= top and bottom <= 700
    assert boxes[0][:2] == (0, 0) and boxes[-1][2] > 1000 - TILE_ALIGN and boxes[-1][3] > 700 - TILE_ALIGN
    assert tile_boxes(1000, 700, 128, 1) == [(432, 280, 560, 408)]              # centred, floored to the grid
    with pytest.raises(ValueError, match="square"):
        tile_boxes(1000, 700, 128, 5)


def test_tiles_read_native_pixels_and_upscale_only_small_images(odd_images):
    key = (32, "tiles:4", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    pre = Preprocessor([key])
    assert pre.min_decode_size is None, "a tiled expert needs the image decoded in full"
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 140, 3), dtype=np.uint8))
    x = pre.transform(img)[key]
    assert x.shape == (4, 3, 32, 32)
    ref = np.asarray(img, dtype=np.float32)[:32, :32] / 255.0                    # first crop: top-left, no resize
    assert np.allclose(x[0].permute(1, 2, 0).numpy(), ref, atol=1e-6)
    small = pre.transform(img.resize((20, 24)))[key]
    assert small.shape == (4, 3, 32, 32)


# -- bundles with residual, tiled experts --------------------------------------------------------------
@pytest.fixture(scope="module")
def residual_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("res") / "residual"
    init_bundle(["convnext_atto"], out, input_size=32, preprocess="tiles", crops=4, stem="npr", seed=5)
    init_bundle(["resnet18"], out.with_name("srm"), input_size=32, preprocess="tiles", crops=1, stem="srm", seed=6)
    return out


def test_residual_tiled_bundle_round_trips_and_plain_timm_loads_it(residual_bundle):
    import timm
    from safetensors.torch import load_file

    spec = read_spec(residual_bundle)
    e = spec.experts[0]
    assert (e.family, e.stem, e.preprocess, e.crops) == ("residual", "npr", "tiles", 4)
    raw = json.loads((residual_bundle / "ensemble.json").read_text())
    assert raw["format"] == "dfx-ensemble/1.1" and raw["experts"][0]["stem"] == "npr"
    model = timm.create_model(e.arch, num_classes=2)
    model.load_state_dict(load_file(str(residual_bundle / e.file)), strict=True)
    r = dfx("bundle", "verify", str(residual_bundle))
    assert r.returncode == 0, r.stdout + r.stderr
    info = dfx("bundle", "info", str(residual_bundle))
    assert "npr+convnext_atto" in info.stdout and "tiles4" in info.stdout


@pytest.mark.parametrize("edit, message", [
    (lambda e: e.update(stem="laplace"), "needs stem npr or srm"),
    (lambda e: e.pop("stem"), "needs stem"),
    (lambda e: e.update(crops=5), "square number"),
    (lambda e: e.update(family="timm"), "only meaningful for family 'residual'"),
    (lambda e: e.update(preprocess="squash"), "only meaningful with preprocess 'tiles'"),
])
def test_bad_residual_fields_are_named(residual_bundle, tmp_path, edit, message):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(residual_bundle, b)
    data = json.loads((b / "ensemble.json").read_text())
    edit(data["experts"][0])
    (b / "ensemble.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=message):
        read_spec(b)


def test_multicrop_scoring_is_deterministic_and_batch_independent(residual_bundle, odd_images):
    names = ["rgb.jpg", "gray_L.png", "rgba.png", "exif_rotated.jpg", "cmyk.jpg"]
    paths = [odd_images[n] for n in names]
    for bundle in (residual_bundle, residual_bundle.with_name("srm")):
        det = Detector(bundle, device="cpu", batch_size=4)
        together = det.predict(paths)
        alone = [det.predict([p])[0] for p in paths]
        again = Detector(bundle, device="cpu", batch_size=2).predict(paths)
        in_workers = [r.prediction for r in det.predict_paths(paths, workers=1)]
        for a, b, c, d in zip(together, alone, again, in_workers):
            assert a.score == pytest.approx(b.score, abs=1e-5) and a.score == pytest.approx(c.score, abs=1e-5)
            assert a.score == pytest.approx(d.score, abs=1e-5), "decoding in a worker changes nothing"
        # the score is the mean of the crops' probabilities, computed here by hand with the same weights
        e = det.spec.experts[0]
        x = det.prepare(paths[0])[e.preprocess_key]
        with torch.inference_mode():
            per_crop = torch.softmax(det.models[e.name](x), dim=1)[:, 1]
        assert together[0].score == pytest.approx(float(per_crop.mean()), abs=1e-5)


# -- simulated fakes ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim_reals(tmp_path_factory, odd_images, bad_images) -> Path:
    d = tmp_path_factory.mktemp("simreals")
    rows = [{"path": str(odd_images[n]), "label": 0, "source": "odd"}
            for n in ("rgb.jpg", "rgba.png", "exif_rotated.jpg", "rgb.webp")]
    Image.new("RGB", (20, 20), (9, 9, 9)).save(d / "tiny.png")
    rows += [{"path": str(bad_images["truncated.jpg"][0]), "label": 0, "source": "odd"},
             {"path": str(d / "tiny.png"), "label": 0, "source": "odd"}]
    return write_manifest(d / "reals.csv", rows)


def test_simulate_writes_fakes_with_parents_and_resumes(sim_reals, tmp_path):
    out = tmp_path / "sim"
    args = ("prepare", "simulate", "--reals", str(sim_reals), "--out", str(out), "--train-steps", "20",
            "--per-image", "2", "--decoders", "transconv,nearest,bilinear,pixelshuffle:random")
    r = dfx(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_manifest(out / "manifest.csv").rows
    assert len(rows) == 4 * 2, "two fakes per readable real; the truncated and the too-small ones skipped"
    skipped = {Path(s["path"]).name for s in json.loads((out / "skipped.json").read_text())}
    assert skipped == {"truncated.jpg", "tiny.png"}
    assert {r["source"] for r in rows} == {"simulated:transconv", "simulated:nearest", "simulated:bilinear",
                                           "simulated:pixelshuffle-random"}
    for row in rows:
        assert row["kind"] == "simulated" and row["label"] == "1" and row["split"] == "train"
        parent = load_image(row["parent"])                                       # EXIF orientation applied
        fake = Image.open(out / row["path"])
        assert fake.size == parent.size, "content and size are the parent's; only the fingerprint differs"
        assert fake.format == ("JPEG" if row["parent"].endswith(".jpg") else "PNG")
        params = json.loads(row["params"])
        assert params["trained_steps"] == (0 if row["source"].endswith("-random") else 20)
    for name in ("transconv", "nearest", "bilinear", "pixelshuffle-random"):
        assert (out / "decoders" / f"{name}.safetensors").is_file()
    first = {row["path"]: (out / row["path"]).read_bytes() for row in rows}

    again = dfx(*args)
    assert again.returncode == 0 and "0 new, 8 already done" in again.stderr
    # an item lost in a kill is remade, identically (same decoder from disk, same seed)
    victim = rows[0]["path"]
    (out / "items" / (Path(victim).stem + ".json")).unlink()
    (out / victim).unlink()
    third = dfx(*args)
    assert third.returncode == 0 and "1 new, 7 already done" in third.stderr
    assert (out / victim).read_bytes() == first[victim]
    assert len(read_manifest(out / "manifest.csv").rows) == 8


def test_simulate_rejects_unknown_decoders(sim_reals, tmp_path):
    r = dfx("prepare", "simulate", "--reals", str(sim_reals), "--out", str(tmp_path / "x"), "--decoders", "wavelet")
    assert r.returncode != 0 and "wavelet" in r.stderr


# -- a residual expert trained on native-resolution crops, end to end -----------------------------------
def test_residual_tiles_expert_trains_exports_and_serves(tiny_dataset, tmp_path):
    import yaml

    cfg = {"seed": 1, "output": str(tmp_path / "run"),
           "data": {"manifest": str(tiny_dataset), "workers": 0},
           "experts": [{"arch": "convnext_atto", "family": "residual", "stem": "npr", "preprocess": "tiles",
                        "input_size": 32, "crops": 4, "val_fold": 0}],
           "optim": {"lr": 0.002, "warmup_steps": 2},
           "train": {"epochs": 8, "batch_size": 8, "ema_decay": 0.9}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    r = dfx("train", str(tmp_path / "cfg.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tmp_path / "run" / "experts" / "convnext_atto-f0" / "final" / "expert.json").read_text())
    # the tiny fakes were nearest-up-sampled ×2: their NPR residual is (nearly) zero, an easy cue to find
    assert info["val_auc"] > 0.8, info["history"]
    bundle = tmp_path / "bundle"
    assert dfx("export", str(tmp_path / "run"), "--out", str(bundle)).returncode == 0
    spec = read_spec(bundle)
    assert (spec.experts[0].family, spec.experts[0].stem, spec.experts[0].crops) == ("residual", "npr", 4)
    det = Detector(bundle, device="cpu")
    vp = read_manifest(tmp_path / "run" / "experts" / "convnext_atto-f0" / "final" / "val_predictions.csv")
    preds = det.predict([Path(row["path"]) for row in vp.rows])
    for row, pred in zip(vp.rows, preds):
        assert pred.score == pytest.approx(float(row["prob"]), abs=1e-5), "training and serving agree"


def test_fold_split_keeps_training_only_rows_out_of_validation_and_skips_kinds():
    from training.config import ExpertConfig
    from training.rows import split_rows

    rows = [{"path": f"r{i}", "label": 0, "kind": "real", "fold": str(i % 2), "split": ""} for i in range(6)]
    rows += [{"path": f"g{i}", "label": 1, "kind": "generated", "fold": str(i % 2), "split": ""} for i in range(6)]
    rows += [{"path": f"s{i}", "label": 1, "kind": "simulated", "fold": str(i % 2), "split": "train"} for i in range(6)]
    train, val = split_rows(rows, ExpertConfig(val_fold=0), 0)
    assert {r["path"] for r in val} == {"r0", "r2", "r4", "g0", "g2", "g4"}, "split=train rows are never validated"
    assert {r["path"] for r in train} == {"r1", "r3", "r5", "g1", "g3", "g5", "s1", "s3", "s5"}
    train, _ = split_rows(rows, ExpertConfig(val_fold=0, skip_kinds=["simulated"]), 0)
    assert not any(r["kind"] == "simulated" for r in train)


def test_a_bundle_that_could_not_be_read_back_is_never_written(tmp_path):
    r = dfx("bundle", "init", "--arch", "convnext_atto", "--preprocess", "tiles", "--crops", "5", "--stem", "npr",
            "--input-size", "32", "--out", str(tmp_path / "b"))
    assert r.returncode == 1 and "crops must be a square number" in r.stderr
    assert not (tmp_path / "b").exists()
