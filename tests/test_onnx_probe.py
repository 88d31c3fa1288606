"""Frozen backbones served by onnxruntime (issue 34): the ``probe_onnx`` family's graph is exported (timm) or taken
from the INT8 source (CLIP), its stage outputs agree with the torch backbone's, heads are fitted on the features the
graph gives, and the bundle scores exactly what was fitted; a tampered graph or one with an unknown operator is
refused with a message that says why."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import dfx, make_tiny_dataset

pytest.importorskip("onnxruntime", reason="the probe_onnx family runs its graph with onnxruntime")
pytest.importorskip("onnx", reason="the probe_onnx family builds its graph with onnx")


def _photos(size: int) -> torch.Tensor:
    """Four real photographs (scikit-image's), resized, ImageNet-normalised: ``(4, 3, size, size)``."""
    from PIL import Image
    from skimage import data as skdata

    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    out = []
    for a in (skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()):
        img = Image.fromarray(a).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy((np.asarray(img, np.float32) / 255 - mean) / std).permute(2, 0, 1))
    return torch.stack(out)


def _weights(tmp_path: Path, arch: str, **kwargs) -> Path:
    """A timm checkpoint on disk (random weights, seeded) as a user's ``pretrained`` file."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(arch, **kwargs).state_dict().items()}, str(path))
    return path


def _spec(arch: str, pretrained: Path, stages: tuple[int, ...], family: str = "probe_onnx", name: str = "onnx",
          size: int = 64):
    from training.probe import ProbeSpec

    return ProbeSpec(arch=arch, pretrained=str(pretrained), stages=stages, input_size=size, preprocess="crop",
                     crops=1, name=name, family=family)


@pytest.mark.parametrize("arch,stages,size,min_cosine", [
    ("test_efficientnet", (1, 2, 3), 64, 0.9999),  # convolutions stay fp32 (only MatMul/Gemm are quantised)
    ("test_vit", (0, 1), 160, 0.999),              # INT8 weights: measured 0.9999 on these photos
])
def test_exported_graph_agrees_with_the_torch_backbone_on_photos(tmp_path, arch, stages, size, min_cosine):
    """The same pretrained backbone through torch (family probe) and through its exported INT8 graph in onnxruntime
    (family probe_onnx): each photo's pooled feature vector points the same way; the graph holds only the stages."""
    import onnx

    from training.probe import build_probe

    weights = _weights(tmp_path, arch)
    torch_net = build_probe(_spec(arch, weights, stages, family="probe", size=size))
    onnx_net = build_probe(_spec(arch, weights, stages, size=size))
    x = _photos(size)
    with torch.inference_mode():
        ref, ours = torch_net.pooled(x), onnx_net.pooled(x)
    assert ours.shape == ref.shape == (4, onnx_net.num_features)
    cosine = torch.nn.functional.cosine_similarity(ours, ref).numpy()
    assert cosine.min() >= min_cosine, cosine
    # photos differ from each other far more than the two paths differ on one photo
    assert (ours[0] - ours[1]).norm() > 10 * (ours[0] - ref[0]).norm()
    graph = onnx.load_from_string(onnx_net.graph_bytes())
    assert [o.name for o in graph.graph.output] == [f"stage_{s}" for s in stages]


def test_an_image_gets_the_same_features_whatever_it_is_batched_with(tmp_path):
    """A dynamically quantised graph takes each product's INT8 scale from the whole input tensor: run on a batch, an
    image's features (so its score) would depend on its batch-mates (the API's micro-batches, a folder's order). The
    graph runs one image at a time: alone, in a batch, beside a saturated image, the features are bit for bit equal."""
    from training.probe import build_probe

    net = build_probe(_spec("test_vit", _weights(tmp_path, "test_vit"), (0, 1), size=160))
    x = _photos(160)
    loud = torch.full_like(x[:1], 40.0)  # far outside any photo's range: it would set a batch's scales
    with torch.inference_mode():
        batched = net.pooled(x)
        alone = torch.cat([net.pooled(x[i:i + 1]) for i in range(4)])
        beside = net.pooled(torch.cat([loud, x.flip(0)]))[1:].flip(0)
    assert torch.equal(batched, alone) and torch.equal(batched, beside)


def test_onnx_probe_fits_exports_verifies_loads_and_scores_what_was_fitted(tmp_path):
    """training/probe.py extracts through the graph → fits → exports (format 1.8, the graph inside the expert's
    safetensors file) → `dfx bundle verify` → Detector and `dfx predict`: each image's score is the fitted head's to
    1e-4, and the loaded graph is byte for byte the one features were extracted with."""
    from inference import Detector
    from inference.bundle import read_spec
    from training.probe import build_probe, export_probe, extract, fit_head

    weights = _weights(tmp_path, "test_efficientnet")
    spec = _spec("test_efficientnet", weights, (1, 2, 3))
    net = build_probe(spec)
    root = make_tiny_dataset(tmp_path / "data", n_per_class=8, size=80, corrupt=False).parent
    paths = sorted(str(p) for p in root.glob("*.png"))
    labels = np.asarray([1 if Path(p).name.startswith("fake") else 0 for p in paths])
    feats, owners, errors = extract(net, spec.expert(), paths, workers=0, progress=False)
    assert not any(errors) and feats.shape == (len(paths), net.num_features)
    head = fit_head(feats, labels[owners], C=1.0)
    probs = head.image_probs(feats, owners, len(paths))
    out = tmp_path / "bundle"
    export_probe(out, spec, net, head, threshold=0.5, band=(0.45, 0.55), rule="test", provenance={})
    bundle = read_spec(out)
    assert bundle.format == "dfx-ensemble/1.8" and bundle.experts[0].family == "probe_onnx"
    assert dfx("bundle", "verify", str(out)).returncode == 0
    det = Detector(out, device="cpu")
    assert det.models["onnx"].graph_bytes() == net.graph_bytes()
    scores = [p.experts["onnx"] for p in det.predict(paths)]
    np.testing.assert_allclose(scores, probs, atol=1e-4)
    assert np.mean((np.asarray(scores) > 0.5) == labels) >= 0.9  # the head learnt the training images
    # every CPU path of this bundle answers the same: --precision int8 changes nothing (the graph is what it is),
    # and a session with another thread count only reorders float sums
    int8 = [p.experts["onnx"] for p in Detector(out, device="cpu", precision="int8").predict(paths)]
    np.testing.assert_allclose(int8, scores, atol=1e-6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [p.experts["onnx"] for p in Detector(out, device="cpu").predict(paths)]
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(one, scores, atol=1e-5)
    r = dfx("predict", *paths[:3], "--weights", str(out), "-o", str(tmp_path / "rows.jsonl"), "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([row["score"] for row in rows], probs[:3], atol=1e-4)


def _write_onnx_bundle(tmp_path: Path, graph: bytes, stages=(1, 2, 3)) -> Path:
    """A probe_onnx bundle of test_efficientnet around ``graph`` (its head untrained)."""
    from inference.bundle import BundleSpec, write_bundle
    from inference.experts import create_expert

    spec = _spec("test_efficientnet", tmp_path / "unused", stages).expert()
    net = create_expert(spec)
    net.set_graph(graph)
    out = tmp_path / "bundle"
    write_bundle(out, BundleSpec(name="b", experts=(spec,)), {spec.name: net.state_dict()}, overwrite=True)
    return out


def test_a_tampered_graph_is_refused(tmp_path):
    """One byte of the graph changed inside the expert's file: its SHA-256 no longer matches and nothing loads."""
    from inference import Detector
    from inference.bundle import BundleError
    from training.probe import build_probe

    net = build_probe(_spec("test_efficientnet", _weights(tmp_path, "test_efficientnet"), (1, 2, 3)))
    out = _write_onnx_bundle(tmp_path, net.graph_bytes())
    Detector(out, device="cpu")  # loads as written
    weights = out / "onnx.safetensors"
    data = bytearray(weights.read_bytes())
    header = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + header])["graph"]["data_offsets"]
    data[8 + header + (start + end) // 2] ^= 0xFF  # a byte in the middle of the graph
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch"):
        Detector(out, device="cpu")
    r = dfx("bundle", "verify", str(out))
    assert r.returncode != 0 and "checksum mismatch" in r.stderr + r.stdout


def test_a_graph_with_an_operator_onnxruntime_lacks_is_refused_naming_it(tmp_path):
    """A graph whose node is ``NoSuchOp`` (a valid protobuf, a correct SHA-256) fails at load, naming the operator,
    before any image is read; so does a graph without the stage outputs the head reads."""
    import onnx
    from onnx import TensorProto, helper

    from inference import Detector
    from inference.bundle import BundleError

    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [None, 3, 64, 64])
    outputs = [helper.make_tensor_value_info(f"stage_{s}", TensorProto.FLOAT, None) for s in (1, 2, 3)]
    nodes = [helper.make_node("NoSuchOp", ["pixels"], [f"stage_{s}"], domain="") for s in (1, 2, 3)]
    graph = helper.make_model(helper.make_graph(nodes, "g", [x], outputs))
    with pytest.raises(BundleError, match="NoSuchOp"):
        Detector(_write_onnx_bundle(tmp_path, graph.SerializeToString()), device="cpu")
    nodes = [helper.make_node("Identity", ["pixels"], ["stage_1"])]
    graph = helper.make_model(helper.make_graph(nodes, "g", [x], outputs[:1]))
    with pytest.raises(BundleError, match="stage_2"):
        Detector(_write_onnx_bundle(tmp_path, graph.SerializeToString()), device="cpu")
    with pytest.raises(BundleError, match="not a readable ONNX graph"):
        Detector(_write_onnx_bundle(tmp_path, b"\x08\x07garbage" * 10), device="cpu")
    assert onnx.__version__  # the checks above ran against a real onnx


def test_onnx_probe_trains_with_dfx_train_exports_and_scores(tmp_path):
    """The full objective (CE + KL + NCE through Accelerate) on probe_onnx experts, their features from the graph:
    train → export → verify → predict, each validation image scored as training's validation scored it. Two probes on
    one backbone store its graph once (format 1.9): the second names the first's file, holds only its head, and
    scores as it did in training; save_pretrained writes both back byte for byte. The second's head is fitted in
    closed form (fit: logistic) on the same loader's views: it exports and scores like the SGD-trained one."""
    import yaml

    from inference import Detector
    from inference.bundle import read_spec
    from inference.manifest import read_manifest

    weights = _weights(tmp_path, "test_efficientnet")
    data = make_tiny_dataset(tmp_path / "data", n_per_class=6, size=72, corrupt=False)
    cfg = {"seed": 1, "output": str(tmp_path / "run"), "data": {"manifest": [str(data)], "workers": 0},
           "experts": [{"arch": "test_efficientnet", "family": "probe_onnx", "stages": [1, 2, 3],
                        "pretrained": str(weights), "input_size": 64, "preprocess": "crop", "val_fold": 0},
                       {"name": "second", "arch": "test_efficientnet", "family": "probe_onnx", "stages": [1, 2, 3],
                        "pretrained": str(weights), "input_size": 64, "preprocess": "crop", "val_fold": 1,
                        "fit": "logistic"}],
           "optim": {"lr": 0.01, "warmup_steps": 1}, "train": {"epochs": 2, "batch_size": 4, "ema_decay": 0.5,
                                                              "checkpoint_every_steps": 0}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    r = dfx("train", str(tmp_path / "cfg.yaml"), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    bundle = tmp_path / "bundle"
    r = dfx("export", str(tmp_path / "run"), "--out", str(bundle))
    assert r.returncode == 0, r.stderr
    assert dfx("bundle", "verify", str(bundle)).returncode == 0
    spec = read_spec(bundle)
    first, second = spec.experts
    assert first.family == second.family == "probe_onnx" and first.stages == (1, 2, 3)
    fitted = json.loads((tmp_path / "run" / "experts" / "second" / "final" / "expert.json").read_text())
    assert fitted["fit"] == "logistic" and fitted["history"][-1]["train_ce"] < 0.69, "the fitted head learnt"
    assert "graph_from" not in first.options and second.options == {"graph_from": first.file}
    assert spec.format == "dfx-ensemble/1.9"
    assert (bundle / second.file).stat().st_size < (bundle / first.file).stat().st_size / 4, "the graph is stored once"
    det = Detector(bundle, device="cpu")
    assert det.models[second.name].graph_bytes() == det.models[first.name].graph_bytes()
    for e in spec.experts:
        vp = read_manifest(tmp_path / "run" / "experts" / e.name / "final" / "val_predictions.csv")
        preds = det.predict([Path(row["path"]) for row in vp.rows])
        for row, pred in zip(vp.rows, preds):
            assert pred.experts[e.name] == pytest.approx(float(row["prob"]), abs=1e-4)
    again = det.save_pretrained(tmp_path / "saved")
    assert [x.sha256 for x in again.experts] == [x.sha256 for x in spec.experts]

    import shutil

    from inference.bundle import BundleError

    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    raw = json.loads((broken / "ensemble.json").read_text())
    raw["experts"][1]["graph_from"] = raw["experts"][1]["file"]
    (broken / "ensemble.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="not another expert's file"):
        read_spec(broken)


def test_clip_graph_agrees_with_the_torch_tower_and_scores_what_was_fitted(tmp_path, monkeypatch):
    """``pkg:clip_vit_b16`` through its own INT8 graph (blocks 8-11 exposed, pruned after block 11, the MLP output
    layers on float activations): class tokens agree with the torch fp32 tower's on real photos (cosine >= 0.985;
    measured 0.994-0.999 on 16 dev reals, 0.961 at block 11 when fully INT8), the graph is the source's size, not
    more, and a probe fitted on the graph's features scores the same from its bundle."""
    from PIL import Image

    from inference import Detector
    from inference.pretrained import SOURCES, package_file
    from training.probe import ProbeSpec, build_probe, export_probe, extract, fit_head

    if package_file(SOURCES["clip_vit_b16"]) is None:
        pytest.skip(f"the CLIP weight package is not installed ({SOURCES['clip_vit_b16'].pip})")
    monkeypatch.setenv("DFX_CACHE", str(tmp_path / "cache"))
    arch, stages = SOURCES["clip_vit_b16"].arch, (8, 9, 10, 11)
    specs = {f: ProbeSpec(arch=arch, pretrained="pkg:clip_vit_b16", stages=stages, preprocess="crop", crops=1,
                          name=f, family=f) for f in ("probe", "probe_onnx")}
    nets = {f: build_probe(s) for f, s in specs.items()}
    assert len(nets["probe_onnx"].graph_bytes()) < 95e6  # INT8 weights stay INT8 (fp32 would be 4x)
    from skimage import data as skdata

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, a in enumerate((skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket())):
        Image.fromarray(a).convert("RGB").save(photos / f"real{i}.jpg", quality=92)
    paths = sorted(str(p) for p in photos.glob("*.jpg"))
    feats = {f: extract(n, specs[f].expert(), paths, workers=0, progress=False)[0] for f, n in nets.items()}
    for k, s in enumerate(stages):
        a, b = (torch.from_numpy(feats[f][:, 768 * k:768 * (k + 1)]) for f in ("probe", "probe_onnx"))
        cosine = torch.nn.functional.cosine_similarity(a, b).numpy()
        assert cosine.min() >= 0.985, (s, cosine)
    # a head on the graph's features (the tiny set: photos real, their 2x-upsampled copies fake)
    root = make_tiny_dataset(tmp_path / "data", n_per_class=6, size=96, corrupt=False).parent
    train = sorted(str(p) for p in root.glob("*.png"))
    labels = np.asarray([1 if Path(p).name.startswith("fake") else 0 for p in train])
    f, owners, _ = extract(nets["probe_onnx"], specs["probe_onnx"].expert(), train, workers=0, progress=False)
    head = fit_head(f, labels[owners], C=1.0)
    export_probe(tmp_path / "bundle", specs["probe_onnx"], nets["probe_onnx"], head, threshold=0.5, band=(0.5, 0.5),
                 rule="test", provenance={})
    scores = [p.experts["probe_onnx"] for p in Detector(tmp_path / "bundle", device="cpu").predict(train)]
    np.testing.assert_allclose(scores, head.image_probs(f, owners, len(train)), atol=1e-4)


def _logistic_configs(tmp_path: Path, *, seed: int, family: str, train: dict, **expert):
    """``name -> config file``: runs of one ``fit: logistic`` expert (random test_efficientnet backbone, the tiny
    dataset) that differ only in their output folder."""
    import yaml

    weights = _weights(tmp_path, "test_efficientnet")
    data = make_tiny_dataset(tmp_path / "data", n_per_class=6, size=72, corrupt=False)

    def config(name: str) -> Path:
        cfg = {"seed": seed, "output": str(tmp_path / name), "data": {"manifest": [str(data)], "workers": 0},
               "experts": [{"name": "lr", "arch": "test_efficientnet", "family": family, "stages": [1, 2, 3],
                            "pretrained": str(weights), "input_size": 64, "preprocess": "crop", "val_fold": 0,
                            "fit": "logistic", **expert}],
               "train": train}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        return tmp_path / f"{name}.yaml"

    return config


def test_a_killed_logistic_fit_resumes_to_the_same_head(tmp_path):
    """``fit: logistic`` is resumable by epoch: killed after its first epoch's features were written, ``--resume``
    keeps them, extracts the rest and fits the very head an uninterrupted run fits; the features go when the expert
    is done."""
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    config = _logistic_configs(tmp_path, seed=3, family="probe", fit_c=0.1, train={"epochs": 3, "batch_size": 2})

    def run(cfg: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([str(Path(sys.executable).with_name("dfx")), "train", str(cfg), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})

    full = run(config("full"))
    out, err = full.communicate(timeout=300)
    assert full.returncode == 0, err[-3000:]
    assert "logistic head (C=0.1 per image) fitted on" in out
    features = tmp_path / "killed" / "experts" / "lr" / "features"
    proc = run(config("killed"))
    deadline = time.time() + 240
    while time.time() < deadline and not (features / "epoch0.rank0.npz").is_file():
        assert proc.poll() is None, "the run ended before its first epoch's features could be seen"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and (features / "epoch0.rank0.npz").is_file()
    assert not (tmp_path / "killed" / "experts" / "lr" / "final").exists()
    resumed = run(config("killed"), "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    a = load_file(str(tmp_path / "full" / "experts" / "lr" / "final" / "ema.safetensors"))
    b = load_file(str(tmp_path / "killed" / "experts" / "lr" / "final" / "ema.safetensors"))
    for k in ("head.weight", "head.bias", "feat_mean", "feat_std"):
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert "lr features 1" not in err and "lr features 2" in err, "the first epoch's features were kept"
    assert not features.exists(), "the features were the checkpoint: gone once the expert is done"


@pytest.mark.slow
def test_a_logistic_fit_in_two_processes_fits_the_one_process_head(tmp_path):
    """Two real processes (torchrun, gloo) each extract the features of their share of every epoch's batches; the fit
    reads both shares, so the head is the one a single process fits on the same views."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    # 6 training rows: two batches, one per process
    config = _logistic_configs(tmp_path, seed=5, family="probe_onnx", train={"epochs": 2, "batch_size": 3})

    assert dfx("train", str(config("one"))).returncode == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                        "inference.cli", "train", str(config("two"))], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "fitted on 24 views of" in r.stdout, r.stdout[-2000:]
    a = load_file(str(tmp_path / "one" / "experts" / "lr" / "final" / "ema.safetensors"))
    b = load_file(str(tmp_path / "two" / "experts" / "lr" / "final" / "ema.safetensors"))
    for k in ("head.weight", "head.bias", "feat_mean", "feat_std"):
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
