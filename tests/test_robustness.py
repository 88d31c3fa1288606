"""Robustness you can see: perturbations that do what they say, `dfx evaluate --perturb`, and test-time
augmentation as a bundle option."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference import Detector
from inference.bundle import BundleError, bundle_digest, read_spec, set_tta
from training.perturb import STANDARD, Perturbation, parse_perturbations

from .conftest import TINY_SIZE, _rng_image, dfx


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(_rng_image(300, 200, 3))


def _one(spec: str, seed: int = 0) -> Perturbation:
    (p,) = parse_perturbations(spec, seed=seed)
    return p


def _decoded(out: Image.Image | bytes) -> Image.Image:
    return Image.open(io.BytesIO(out)) if isinstance(out, bytes) else out


def test_reencodings_change_the_bytes_not_the_size(photo):
    png = io.BytesIO()
    photo.save(png, "PNG")
    for spec, fmt in (("jpeg:75", "JPEG"), ("webp:80", "WEBP"), ("social", "JPEG"), ("jpeg:95", "JPEG")):
        out = _one(spec).apply(photo, "k")
        assert isinstance(out, bytes) and out != png.getvalue()
        img = Image.open(io.BytesIO(out))
        assert img.format == fmt and img.size == photo.size, spec
        assert not img.info.get("exif"), "re-encoded files carry no metadata"
        assert np.abs(np.asarray(img.convert("RGB"), float) - np.asarray(photo, float)).mean() > 0.1, spec
    q95 = np.asarray(_decoded(_one("jpeg:95").apply(photo, "k")).convert("RGB"), float)
    q20 = np.asarray(_decoded(_one("jpeg:20").apply(photo, "k")).convert("RGB"), float)
    ref = np.asarray(photo, float)
    assert np.abs(q20 - ref).mean() > np.abs(q95 - ref).mean(), "lower quality loses more"


def test_geometry_perturbations(photo):
    assert _one("resize:0.5").apply(photo, "k").size == (150, 100)
    assert _one("resize:2").apply(photo, "k").size == (600, 400)
    crop = _one("crop:0.5").apply(photo, "k")
    assert crop.size == (150, 100)
    assert np.array_equal(np.asarray(crop), np.asarray(photo)[50:150, 75:225]), "the centre is kept"
    shot = Image.open(io.BytesIO(_one("screenshot").apply(photo, "k")))
    assert shot.format == "PNG" and shot.size == (240, 160)
    big = Image.fromarray(_rng_image(2400, 1200, 1))
    social = Image.open(io.BytesIO(_one("social").apply(big, "k")))
    assert social.size == (1080, 540), "long side down to 1080"
    assert Image.open(io.BytesIO(_one("social").apply(photo, "k"))).size == photo.size, "never up-scaled"


def test_blur_and_noise(photo):
    ref = np.asarray(photo, float)
    blurred = np.asarray(_one("blur:2").apply(photo, "k"), float)
    assert np.abs(np.diff(blurred, axis=1)).mean() < np.abs(np.diff(ref, axis=1)).mean(), "blur smooths"
    assert np.array_equal(np.asarray(_one("blur:0").apply(photo, "k")), np.asarray(photo))
    a = np.asarray(_one("noise:5", seed=1).apply(photo, "file-a"), float)
    assert 3.5 < (a - ref).std() < 5.5, "noise has the sigma asked for (in 8-bit levels, before clipping)"
    again = np.asarray(_one("noise:5", seed=1).apply(photo, "file-a"), float)
    assert np.array_equal(a, again), "same seed and file: same noise"
    other_file = np.asarray(_one("noise:5", seed=1).apply(photo, "file-b"), float)
    other_seed = np.asarray(_one("noise:5", seed=2).apply(photo, "file-a"), float)
    assert not np.array_equal(a, other_file) and not np.array_equal(a, other_seed)
    assert _one("none").identity and np.array_equal(np.asarray(_one("none").apply(photo, "k")), np.asarray(photo))


@pytest.mark.parametrize("spec, needle", [
    ("jpg:75", "unknown perturbation 'jpg:75'"), ("jpeg", "needs a value"), ("social:3", "takes no value"),
    ("jpeg:500", "1..100"), ("resize:x", "not a number"), ("jpeg:75.5", "whole number"), ("", "no perturbation"),
])
def test_bad_specs_are_clear_errors(spec, needle):
    with pytest.raises(ValueError) as err:
        parse_perturbations(spec)
    assert needle in str(err.value)
    if "unknown" in needle:
        assert "jpeg:VALUE" in str(err.value) and "social" in str(err.value), "the error names the valid specs"


def test_all_is_the_standard_set():
    got = parse_perturbations("all,jpeg:75,none")
    assert [p.spec for p in got] == [*STANDARD, "none"], "all expands in order and repeats are dropped"


def test_evaluate_perturb_tables_are_deterministic_and_identity_flips_nothing(tiny_bundle, tiny_dataset, tmp_path):
    specs = "none,noise:12,jpeg:30,resize:0.5"
    runs = []
    for name in ("a", "b"):
        r = dfx("evaluate", str(tiny_dataset), "--weights", str(tiny_bundle), "--out", str(tmp_path / name),
                "--perturb", specs, "--seed", "3", "--no-progress")
        assert r.returncode == 0, r.stderr
        runs.append(json.loads((tmp_path / name / "robustness.json").read_text()))
    a, b = runs
    assert a["perturbations"] == b["perturbations"], "the same seed gives the same numbers"
    assert list(a["perturbations"]) == ["none", "noise:12", "jpeg:30", "resize:0.5"]
    none = a["perturbations"]["none"]["overall"]
    assert none["flip_rate"] == 0.0 and none["mean_score_shift"] == 0.0 and none["auc_drop"] == 0.0
    assert a["perturbations"]["none"]["errors"] == 0, "the corrupt file fails clean too, so it is no new error"
    shifts = [a["perturbations"][s]["overall"]["mean_score_shift"] for s in ("noise:12", "jpeg:30", "resize:0.5")]
    assert any(abs(s) > 1e-4 for s in shifts), "perturbations move the scores of a random-weight bundle"
    out = tmp_path / "a"
    for f in ("robustness.md", "robustness.png", "predictions.csv", "perturbed/noise_12.csv"):
        assert (out / f).is_file(), f
    assert Image.open(out / "robustness.png").size[0] > 500
    md = (out / "robustness.md").read_text()
    assert "| noise:12 |" in md and "flip rate" in md and "Per source" in md
    assert not list(out.rglob("*.parts")), "shards are removed once the evaluation is done"
    assert not (out / "perturbed" / "noise_12").exists(), "perturbed images stay in memory by default"
    # a seed changes the noise, so the noise row's scores move
    r = dfx("evaluate", str(tiny_dataset), "--weights", str(tiny_bundle), "--out", str(tmp_path / "c"),
            "--perturb", "noise:12", "--seed", "4", "--no-progress")
    assert r.returncode == 0, r.stderr
    c = json.loads((tmp_path / "c" / "robustness.json").read_text())
    assert c["perturbations"]["noise:12"]["overall"]["mean_score_shift"] != \
        a["perturbations"]["noise:12"]["overall"]["mean_score_shift"]


def test_evaluate_rejects_an_unknown_perturbation(tiny_bundle, tiny_dataset, tmp_path):
    r = dfx("evaluate", str(tiny_dataset), "--weights", str(tiny_bundle), "--out", str(tmp_path / "x"),
            "--perturb", "jpeg:75,sepia")
    assert r.returncode == 2 and "unknown perturbation 'sepia'" in r.stderr and "webp:VALUE" in r.stderr
    assert not (tmp_path / "x").exists(), "nothing is scored before the specs are checked"


def test_save_perturbed_writes_the_images(tiny_bundle, tiny_dataset, tmp_path):
    r = dfx("evaluate", str(tiny_dataset), "--weights", str(tiny_bundle), "--out", str(tmp_path / "s"),
            "--perturb", "jpeg:60,resize:0.5", "--save-perturbed", "--no-progress")
    assert r.returncode == 0, r.stderr
    jpgs = sorted((tmp_path / "s" / "perturbed" / "jpeg_60").glob("*.jpg"))
    pngs = sorted((tmp_path / "s" / "perturbed" / "resize_0.5").glob("*.png"))
    assert len(jpgs) == len(pngs) == 48, "one per readable image"
    assert Image.open(pngs[0]).size == (36, 36), "72 px images halved"


# -- test-time augmentation -----------------------------------------------------------------------

def _copy_bundle(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tta_bundle_round_trips(tiny_bundle, tmp_path):
    b = _copy_bundle(tiny_bundle, tmp_path / "b")
    before = read_spec(b)
    r = dfx("bundle", "set-tta", str(b), "hflip,rot90")
    assert r.returncode == 0, r.stderr
    spec = read_spec(b)
    assert spec.tta == ("hflip", "rot90") and spec.format == "dfx-ensemble/1.3"
    assert bundle_digest(spec) != bundle_digest(before), "TTA changes the scores, so the identity"
    assert dfx("bundle", "verify", str(b)).returncode == 0, "weights and checksums untouched"
    assert "hflip, rot90" in dfx("bundle", "info", str(b)).stdout
    assert json.loads((b / "ensemble.json").read_text())["tta"] == ["hflip", "rot90"]
    set_tta(b, ())
    back = read_spec(b)
    assert back.tta == () and "tta" not in json.loads((b / "ensemble.json").read_text())
    assert bundle_digest(back) == bundle_digest(before) and back.format == before.format, \
        "without TTA the bundle is what it was, in its old format"
    r = dfx("bundle", "set-tta", str(b), "hflip,mirror")
    assert r.returncode != 0 and "unknown TTA view 'mirror'" in r.stderr + r.stdout


def test_a_bundle_with_an_unknown_view_is_refused(tiny_bundle, tmp_path):
    b = _copy_bundle(tiny_bundle, tmp_path / "b")
    raw = json.loads((b / "ensemble.json").read_text())
    raw["tta"] = ["hflip", "shear"]
    (b / "ensemble.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="unknown TTA view 'shear'"):
        read_spec(b)


def test_hflip_tta_is_the_mean_of_the_image_and_its_mirror(tiny_bundle, tmp_path):
    """At the experts' input size no resampling happens, so mirroring the input equals mirroring the image."""
    img = Image.fromarray(_rng_image(TINY_SIZE, TINY_SIZE, 11))
    mirror = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    plain = Detector(tiny_bundle, device="cpu")
    a, m = plain.predict([img, mirror])
    tta = Detector(tiny_bundle, device="cpu", tta=["hflip"])
    (t,) = tta.predict([img])
    for name in a.experts:
        assert t.experts[name] == pytest.approx((a.experts[name] + m.experts[name]) / 2, abs=1e-5)
    assert t.score == pytest.approx((a.score + m.score) / 2, abs=1e-5)
    assert tta.model_id != plain.model_id
    six = Detector(tiny_bundle, device="cpu", tta=["all"])
    views = [img, mirror, img.transpose(Image.Transpose.FLIP_TOP_BOTTOM), img.transpose(Image.Transpose.ROTATE_90),
             img.transpose(Image.Transpose.ROTATE_180), img.transpose(Image.Transpose.ROTATE_270)]
    each = plain.predict(views)
    assert six.predict([img])[0].score == pytest.approx(float(np.mean([p.score for p in each])), abs=1e-5)


def test_evaluate_tta_option_uses_the_views(tiny_bundle, tiny_dataset, tmp_path):
    r = dfx("evaluate", str(tiny_dataset), "--weights", str(tiny_bundle), "--out", str(tmp_path / "t"),
            "--tta", "hflip", "--no-progress")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert m["tta"] == ["hflip"] and m["model"] != Detector(tiny_bundle, device="cpu").model_id
