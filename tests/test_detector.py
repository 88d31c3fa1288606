"""The Detector scores every kind of image, independently of batching and of where it was decoded."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from inference import Detector, ImageError
from inference.bundle import read_spec

ODD = ["rgb.jpg", "gray_L.png", "gray_alpha_LA.png", "palette_P.png", "rgba.png", "cmyk.jpg",
       "gray16_I16.png", "rgb.webp", "rgb.bmp", "rgb.tiff", "animated.gif", "exif_rotated.jpg", "png_named.jpg"]


@pytest.fixture(scope="module")
def detector(tiny_bundle):
    return Detector(tiny_bundle, device="cpu", batch_size=32)


def test_every_odd_kind_is_scored(detector, odd_images):
    preds = detector.predict([odd_images[n] for n in ODD])
    names = {e.name for e in detector.spec.experts}
    for p in preds:
        assert 0.0 <= p.score <= 1.0
        assert set(p.experts) == names
        assert p.label == detector.label_for(p.score)


def test_score_does_not_depend_on_the_batch(tiny_bundle, odd_images):
    paths = [odd_images[n] for n in ODD]
    together = Detector(tiny_bundle, device="cpu", batch_size=32).predict(paths)
    alone = Detector(tiny_bundle, device="cpu", batch_size=1).predict(paths)
    order = list(range(len(paths)))
    random.Random(0).shuffle(order)
    shuffled = Detector(tiny_bundle, device="cpu", batch_size=5).predict([paths[i] for i in order])
    for i, (a, b) in enumerate(zip(together, alone)):
        assert a.score == pytest.approx(b.score, abs=1e-5)
        assert shuffled[order.index(i)].score == pytest.approx(a.score, abs=1e-5)
        for name in a.experts:
            assert a.experts[name] == pytest.approx(b.experts[name], abs=1e-5)


def test_worker_decoding_equals_in_process(detector, odd_images, bad_images):
    paths = [odd_images[n] for n in ODD] + [p for p, _ in bad_images.values()]
    in_proc = list(detector.predict_paths(paths, workers=0))
    workers = list(detector.predict_paths(paths, workers=2))
    assert [r.path for r in in_proc] == [r.path for r in workers] == paths
    for a, b in zip(in_proc, workers):
        assert a.ok == b.ok and a.error == b.error
        if a.ok:
            assert a.prediction.score == pytest.approx(b.prediction.score, abs=1e-5)
    codes = {r.path.name: r.error_code for r in in_proc if not r.ok}
    assert codes == {name: code for name, (_, code) in bad_images.items()}


def test_bad_image_raises_in_predict(detector, bad_images):
    with pytest.raises(ImageError):
        detector.predict([bad_images["truncated.jpg"][0]])


def test_labels_follow_threshold_and_band(detector):
    lo, hi = detector.spec.uncertain_band
    t = detector.spec.threshold
    assert lo < t < hi
    assert detector.label_for((lo + t) / 2) == "uncertain"
    assert detector.label_for(hi) == "fake" and detector.label_for(1.0) == "fake"
    assert detector.label_for(lo) == "real" and detector.label_for(0.0) == "real"


def test_model_id_names_bundle_and_hash(detector, tiny_bundle):
    spec = read_spec(tiny_bundle)
    name, digest = detector.model_id.split("@")
    assert name == spec.name and len(digest) == 12
    desc = detector.describe()
    assert desc["model"] == detector.model_id and len(desc["experts"]) == 2


def test_inference_import_stays_light():
    """A server installs only the core: importing it must not pull training-side libraries."""
    code = ("import sys, inference, inference.detector, inference.cli; "
            "heavy = [m for m in ('training', 'data_prep', 'webui', 'diffusers', 'accelerate', 'faiss', "
            "'albumentations', 'transformers', 'cv2') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().replace("'", '"')) == []
