"""The newcomer's main job and the shipped default ensemble."""

from __future__ import annotations

import csv
import re

import pytest

from inference import Detector
from inference.manifest import read_manifest
from inference.pretrained import SOURCES, package_file

from .conftest import ROOT, SHARED_DEV, dfx

DEFAULT = ROOT / "weights" / "default"


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = dfx("demo", "--quick", "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "These demo weights prove the plumbing, not detection quality." in r.stdout
    assert "$ dfx prepare cluster" in r.stdout and "$ dfx train" in r.stdout, "each step shows its command"
    det = Detector(out / "bundle", device="cpu")
    assert len(det.spec.experts) == 2 and det.spec.provenance["trained_with"] == "dfx train"
    test_images = sorted(p.name for p in (out / "test_images").iterdir())
    with open(out / "submission.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["img_name", "y_pred"] and [r[0] for r in rows[1:]] == test_images
    assert all(0.0 <= float(r[1]) <= 1.0 for r in rows[1:])
    html = (out / "report.html").read_text()
    assert "prove the plumbing, not detection quality" in html and "data:image/png;base64," in html
    assert "ROC curve" in html and "Cluster map" in html and html.count("<figure>") >= 4
    folds = read_manifest(out / "data" / "folds.csv")
    assert {r["fold"] for r in folds.rows} == {"0", "1"}
    if package_file(SOURCES["efficientnet_lite0"]) is not None:  # the demo's patch expert says where
        assert [e.family for e in det.spec.experts] == ["probe", "patch"]
        assert "$ dfx explain" in r.stdout and len(list((out / "explain").glob("*.heatmap.png"))) == 4
        assert "Where: heatmaps of held-out edits" in html and html.count("true mask (white = edited)") == 4


def test_default_weights_verify():
    assert (DEFAULT / "ensemble.json").is_file(), "weights/default ships with the project"
    r = dfx("bundle", "verify", str(DEFAULT))
    assert r.returncode == 0, r.stdout + r.stderr
    sizes = [p.stat().st_size for p in DEFAULT.glob("*.safetensors")]
    assert max(sizes) < 95e6, "every file under hosting limits for one file (100 MB)"
    assert sum(sizes) < 115e6, "the CLIP graph (INT8 rows) is stored once, however many experts run it"
    card = (DEFAULT / "MODEL_CARD.md").read_text()
    for must in ("google/dreambooth", "dfx train", "leave-one", "shortcut"):
        assert must in card


@pytest.mark.slow  # a CLIP ViT-B forward per dev image: about 3 minutes on 2 cores
@pytest.mark.skipif(not (SHARED_DEV / "manifest.csv").is_file(), reason="../shared/data/dev is absent")
def test_default_weights_reproduce_the_model_card_auc(tmp_path):
    card = (DEFAULT / "MODEL_CARD.md").read_text()
    m = re.search(r"dev-collection-auc: ([0-9.]+)", card)
    assert m, "the model card records the AUC on the dev collection as 'dev-collection-auc: X'"
    r = dfx("evaluate", str(SHARED_DEV / "manifest.csv"), "--weights", str(DEFAULT), "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    auc = json.loads(r.stdout)["auc"]
    assert auc == pytest.approx(float(m.group(1)), abs=0.01)


def test_predict_uses_default_weights_without_options(tmp_path, odd_images):
    r = dfx("predict", str(odd_images["rgb.jpg"]), cwd=ROOT, env={"DFX_WEIGHTS": ""})
    assert r.returncode == 0, r.stderr
    assert "default@" in r.stderr
