"""Pretrained weights offline (issue 12): packages, files, conversion checks, and their use in training."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from inference.pretrained import (SOURCES, PretrainedError, convert_in_order, list_backbones, load_pretrained,
                                  package_file, pretrained_state)

from .conftest import ROOT, dfx


def _need(name: str) -> None:
    if package_file(SOURCES[name]) is None:
        pytest.skip(f"weight package for pkg:{name} is not installed ({SOURCES[name].pip})")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DFX_CACHE", str(tmp_path / "cache"))


def _imagenet_class(model: torch.nn.Module, photo: np.ndarray, mean, std) -> tuple[int, float]:
    img = Image.fromarray(photo).resize((224, 224), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    with torch.no_grad():
        p = model.eval()(x[None]).softmax(1)[0]
    return int(p.argmax()), float(p.max())


@pytest.mark.parametrize("name, mean, std", [("efficientnet_lite0", (0.5,) * 3, (0.5,) * 3),
                                             ("mobilenetv2_100", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_package_weights_recognise_real_photos(name, mean, std, tmp_path):
    """Converted weights are ImageNet weights: scikit-image's cat and coffee photos get their classes."""
    from skimage import data

    _need(name)
    arch = SOURCES[name].arch
    model = timm.create_model(arch, pretrained=False)
    model.load_state_dict(pretrained_state(f"pkg:{name}", arch), strict=True)
    assert _imagenet_class(model, data.chelsea(), mean, std)[0] == 285   # Egyptian cat
    assert _imagenet_class(model, data.coffee(), mean, std)[0] == 967    # espresso
    cached = list((tmp_path / "cache" / "pretrained").glob(f"{name}-*.safetensors"))
    assert len(cached) == 1  # converted once; the second read comes from the cache
    again = pretrained_state(f"pkg:{name}", arch)
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())
    # a reinstall of the same wheel (a new file time) reuses the conversion instead of caching another copy
    path = package_file(SOURCES[name])
    st = path.stat()
    try:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        pretrained_state(f"pkg:{name}", arch)
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert list((tmp_path / "cache" / "pretrained").glob(f"{name}-*.safetensors")) == cached


def test_a_wrong_shape_is_refused_naming_the_tensor(tmp_path):
    _need("efficientnet_lite0")
    foreign = torch.load(package_file(SOURCES["efficientnet_lite0"]), weights_only=True)
    key = list(foreign)[5]
    foreign[key] = torch.zeros(3, 3)
    with pytest.raises(PretrainedError, match=f"tensor '{key.replace('.', '[.]')}' has shape"):
        convert_in_order(foreign, timm.create_model("tf_efficientnet_lite0").state_dict(), "test")
    bad = tmp_path / "bad.pth"
    torch.save(foreign, bad)
    with pytest.raises(PretrainedError, match=key.replace(".", "[.]")):
        pretrained_state(str(bad), "tf_efficientnet_lite0")
    with pytest.raises(PretrainedError, match="holds weights for 'tf_efficientnet_lite0', not 'convnext_atto'"):
        pretrained_state("pkg:efficientnet_lite0", "convnext_atto")


def test_pickled_code_is_refused_and_local_files_work(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    evil = tmp_path / "evil.pth"
    torch.save({"w": Evil()}, evil)
    with pytest.raises(PretrainedError, match="weights_only"):
        pretrained_state(str(evil), "convnext_atto")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = timm.create_model("convnext_atto")
    folder = tmp_path / "local"
    folder.mkdir()
    save_file(ref.state_dict(), str(folder / "model.safetensors"))
    model = load_pretrained(timm.create_model("convnext_atto", num_classes=2), str(folder), "convnext_atto")
    assert torch.equal(model.stem[0].weight, ref.stem[0].weight) and model.head.fc.out_features == 2


def test_every_torch_load_in_the_project_is_weights_only():
    """No pickle can be loaded by our code: every torch.load call passes weights_only=True."""
    for path in ROOT.glob("*/**/*.py"):
        if ".venv" in path.parts or "tests" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" \
                    and getattr(node.func.value, "id", None) == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kw and getattr(kw["weights_only"], "value", None) is True, \
                    f"{path}:{node.lineno}: torch.load without weights_only=True"


def test_dfx_backbones_lists_the_installed_packages():
    r = dfx("backbones", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {f"pkg:{n}" for n in SOURCES}
    for row in list_backbones():
        assert rows[row["name"]]["installed"] == row["installed"]
        if row["installed"]:
            assert Path(row["file"]).is_file() and row["size_mb"] > 1


def test_bundle_init_with_a_package_backbone(tmp_path):
    _need("efficientnet_lite0")
    out = tmp_path / "b"
    r = dfx("bundle", "init", "--arch", "tf_efficientnet_lite0", "--pretrained", "pkg:efficientnet_lite0",
            "--input-size", "64", "--out", str(out), env={"DFX_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    state = load_file(str(out / "tf_efficientnet_lite0.safetensors"))
    ref = pretrained_state("pkg:efficientnet_lite0", "tf_efficientnet_lite0")
    assert torch.equal(state["conv_stem.weight"], ref["conv_stem.weight"])
    assert state["classifier.weight"].shape[0] == 2
    assert dfx("bundle", "verify", str(out)).returncode == 0
    bad = dfx("bundle", "init", "--arch", "convnext_atto", "--pretrained", "pkg:efficientnet_lite0", "--out",
              str(tmp_path / "c"))
    assert bad.returncode != 0 and "not 'convnext_atto'" in bad.stderr and not (tmp_path / "c").exists()


def test_probe_bundle_round_trip_through_dfx_train(tiny_dataset, tmp_path):
    """init → train a few steps (frozen lite0 stages, trained head) → export → verify → predict: the bundle
    scores each validation image as training's validation did; the backbone never moved."""
    _need("efficientnet_lite0")
    import yaml

    from inference import Detector
    from inference.bundle import read_spec
    from inference.manifest import read_manifest

    cfg = {"seed": 1, "output": str(tmp_path / "run"), "data": {"manifest": [str(tiny_dataset)], "workers": 0},
           "experts": [{"arch": "tf_efficientnet_lite0", "family": "probe", "stages": [1, 2, 3],
                        "pretrained": "pkg:efficientnet_lite0", "input_size": 64, "preprocess": "tiles", "crops": 1,
                        "val_fold": 0}],
           "optim": {"lr": 0.01, "warmup_steps": 1}, "train": {"epochs": 2, "batch_size": 8, "ema_decay": 0.5,
                                                              "checkpoint_every_steps": 0}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {"DFX_CACHE": str(tmp_path / "cache")}
    r = dfx("train", str(tmp_path / "cfg.yaml"), env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    bundle = tmp_path / "bundle"
    assert dfx("export", str(tmp_path / "run"), "--out", str(bundle)).returncode == 0
    assert dfx("bundle", "verify", str(bundle)).returncode == 0
    spec = read_spec(bundle)
    e = spec.experts[0]
    assert e.family == "probe" and e.stages == (1, 2, 3)
    det = Detector(bundle, device="cpu")
    vp = read_manifest(tmp_path / "run" / "experts" / e.name / "final" / "val_predictions.csv")
    preds = det.predict([Path(row["path"]) for row in vp.rows])
    for row, pred in zip(vp.rows, preds):
        assert pred.experts[e.name] == pytest.approx(float(row["prob"]), abs=1e-5)
    from safetensors.torch import load_file

    state = load_file(str(bundle / e.file))
    ref = pretrained_state("pkg:efficientnet_lite0", "tf_efficientnet_lite0")
    assert torch.equal(state["backbone.conv_stem.weight"], ref["conv_stem.weight"])   # frozen
    assert float(state["feat_std"].min()) > 0 and not torch.equal(state["feat_mean"], torch.zeros_like(state["feat_mean"]))
    # plain timm loads the backbone part strictly
    features = timm.create_model(e.arch, features_only=True, out_indices=e.stages)
    features.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")},
                             strict=True)


def test_probe_backbone_batch_norm_never_moves():
    """A frozen backbone stays frozen in training mode: its batch-norm statistics do not follow the batches."""
    from inference.families.probe_net import ProbeNet

    net = ProbeNet("tf_efficientnet_lite0", (1, 2))
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    net.train()
    with torch.no_grad():
        net(torch.randn(4, 3, 64, 64) * 3 + 1)
    assert all(torch.equal(before[k], v) for k, v in net.backbone.state_dict().items())
    assert not any(p.requires_grad for p in net.backbone.parameters())


def test_fine_tuning_a_package_backbone_starts_small_and_keeps_frozen_stages(tiny_dataset, tmp_path):
    """A timm expert fine-tuned from pkg:efficientnet_lite0 with freeze: 3: its fresh 2-class head starts near
    chance (timm's EfficientNet classifier init would start at a cross-entropy near 3, wrecking the pretrained
    weights in the first steps), and the frozen stem and first two blocks come out bit-identical, batch-norm
    running statistics included, while deeper blocks move."""
    _need("efficientnet_lite0")
    import csv

    import yaml
    from safetensors.torch import load_file

    cfg = {"seed": 1, "output": str(tmp_path / "run"), "data": {"manifest": [str(tiny_dataset)], "workers": 0},
           "experts": [{"arch": "tf_efficientnet_lite0", "pretrained": "pkg:efficientnet_lite0", "input_size": 64,
                        "val_fold": 0, "freeze": 3, "layer_decay": 0.8}],
           "loss": {"nce": 0.0}, "optim": {"lr": 0.001, "warmup_steps": 1},
           "train": {"epochs": 1, "batch_size": 8, "ema_decay": 0.5, "checkpoint_every_steps": 0}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    r = dfx("train", str(tmp_path / "cfg.yaml"), env={"DFX_CACHE": str(tmp_path / "cache")}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "run" / "logs" / "metrics.csv", newline="") as f:
        first_ce = next(float(row["value"]) for row in csv.DictReader(f) if row["key"].endswith("/ce"))
    assert first_ce < 1.0, f"first-step cross-entropy {first_ce}: the fresh head starts far from chance"
    trained = load_file(str(tmp_path / "run" / "experts" / "tf_efficientnet_lite0-f0" / "final" / "ema.safetensors"))
    ref = pretrained_state("pkg:efficientnet_lite0", "tf_efficientnet_lite0")
    frozen = [k for k in ref if k.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1."))]
    assert any("running_var" in k for k in frozen)
    assert all(torch.equal(trained[k], ref[k]) for k in frozen if "num_batches_tracked" not in k)
    assert not torch.equal(trained["blocks.5.0.conv_pw.weight"], ref["blocks.5.0.conv_pw.weight"])
