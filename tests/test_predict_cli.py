"""``dfx predict`` and ``dfx submit`` as a user runs them: a subprocess on real files."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from inference import Detector

from .conftest import SHARED_DEV, dfx
from .test_detector import ODD


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory, odd_images, bad_images):
    d = tmp_path_factory.mktemp("mixed")
    (d / "sub").mkdir()
    for i, name in enumerate(ODD):
        shutil.copy(odd_images[name], (d / "sub" if i % 2 else d) / name)
    for name, (path, _) in bad_images.items():
        shutil.copy(path, d / name)
    (d / "README.txt").write_text("not an image; folders skip it by suffix")
    return d


def test_predict_scores_good_reports_bad_and_matches_detector(mixed_folder, tiny_bundle, bad_images, tmp_path):
    out = tmp_path / "scores.jsonl"
    r = dfx("predict", str(mixed_folder), "--weights", str(tiny_bundle), "-o", str(out), "--workers", "1")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(ODD) + len(bad_images), "one row per image file, README.txt skipped"
    by_name = {row["path"].rsplit("/", 1)[-1]: row for row in rows}
    for name in ODD:
        assert by_name[name]["status"] == "ok", by_name[name]
    for name, (_, code) in bad_images.items():
        assert by_name[name]["status"] == "error" and by_name[name]["error_code"] == code
        assert name in by_name[name]["error"]
    assert "4 failed" in r.stderr
    det = Detector(tiny_bundle, device="cpu")
    for name in ("rgb.jpg", "cmyk.jpg", "animated.gif"):
        path = next(p for p in mixed_folder.rglob(name))
        assert by_name[name]["score"] == pytest.approx(det.predict([path])[0].score, abs=1e-5)
        assert set(by_name[name]["experts"]) == {e.name for e in det.spec.experts}


def test_predict_csv_to_stdout_and_exit_codes(mixed_folder, tiny_bundle, bad_images):
    r = dfx("predict", str(mixed_folder / "rgb.jpg"), str(bad_images["truncated.jpg"][0]),
            "--weights", str(tiny_bundle), "--workers", "0")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(r.stdout.splitlines()))
    assert [row["status"] for row in rows] == ["ok", "error"]
    assert {"path", "score", "label", "status", "error"} <= set(rows[0])
    assert any(k.startswith("expert_") for k in rows[0])
    strict = dfx("predict", str(mixed_folder / "rgb.jpg"), str(bad_images["truncated.jpg"][0]),
                 "--weights", str(tiny_bundle), "--workers", "0", "--strict")
    assert strict.returncode == 1
    nothing = dfx("predict", str(bad_images["empty.png"][0]), "--weights", str(tiny_bundle), "--workers", "0")
    assert nothing.returncode == 1, "nothing could be scored"


def test_submission_format(tmp_path, odd_images, bad_images, tiny_bundle):
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    for name in ("rgb.jpg", "rgb.webp", "palette_P.png", "cmyk.jpg"):
        shutil.copy(odd_images[name], test_dir / f"z_{name}")
    shutil.copy(bad_images["truncated.jpg"][0], test_dir / "a_truncated.jpg")
    sub = tmp_path / "submission.csv"
    r = dfx("submit", str(test_dir), "--weights", str(tiny_bundle), "-o", str(sub))
    assert r.returncode == 0, r.stderr
    lines = sub.read_text().splitlines()
    assert lines[0] == "img_name,y_pred"
    rows = [line.split(",") for line in lines[1:]]
    names = [n for n, _ in rows]
    assert names == sorted(p.name for p in test_dir.iterdir())
    scores = {n: float(s) for n, s in rows}
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    assert scores["a_truncated.jpg"] == 0.5
    assert "a_truncated.jpg" in r.stderr and "warning" in r.stderr
    det = Detector(tiny_bundle, device="cpu")
    assert scores["z_rgb.jpg"] == pytest.approx(det.predict([test_dir / "z_rgb.jpg"])[0].score, abs=1e-6)


def test_weights_default_and_missing(tmp_path, odd_images, tiny_bundle):
    img = str(odd_images["rgb.jpg"])
    missing = dfx("predict", img, cwd=tmp_path, env={"DFX_WEIGHTS": str(tmp_path / "nowhere")})
    assert missing.returncode == 1 and "nowhere" in missing.stderr and "not a bundle folder" in missing.stderr
    via_env = dfx("predict", img, cwd=tmp_path, env={"DFX_WEIGHTS": str(tiny_bundle)})
    assert via_env.returncode == 0, via_env.stderr
    (tmp_path / "weights").mkdir()
    shutil.copytree(tiny_bundle, tmp_path / "weights" / "default")
    via_default = dfx("predict", img, cwd=tmp_path, env={"DFX_WEIGHTS": ""})
    assert via_default.returncode == 0, via_default.stderr
    assert via_default.stdout == via_env.stdout


@pytest.mark.skipif(not (SHARED_DEV / "manifest.csv").is_file(),
                    reason="../shared/data/dev is absent (it ships beside the project, not in it)")
def test_predict_scores_every_dev_image(tiny_bundle, tmp_path):
    """Real photographs and generated images from many sources all decode and score."""
    out = tmp_path / "dev.csv"
    r = dfx("predict", str(SHARED_DEV), "--weights", str(tiny_bundle), "-o", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(out.read_text().splitlines()))
    expected = sum(1 for _ in csv.DictReader((SHARED_DEV / "manifest.csv").read_text().splitlines()))
    assert len(rows) == expected
    assert all(row["status"] == "ok" for row in rows), [row["error"] for row in rows if row["status"] != "ok"]
