"""``dfx train`` end to end on a tiny dataset: learning, export, resume after a kill, bad config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from inference import Detector
from inference.bundle import read_spec
from inference.manifest import read_manifest, write_manifest

from .conftest import dfx

BASE = {
    "seed": 3,
    "data": {"balanced_sampler": True, "workers": 0},
    "experts": [{"arch": "convnext_atto", "input_size": 64, "val_fold": 0}],
    "loss": {"ce": 1.0, "kl": 0.5, "nce": 0.1},
    "optim": {"lr": 0.002, "warmup_steps": 2},
    "train": {"epochs": 3, "batch_size": 8, "ema_decay": 0.9, "checkpoint_every_steps": 1},
}


def write_config(path: Path, manifest: Path, output: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(BASE))
    cfg.update({"output": str(output)})
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    cfg["data"]["manifest"] = str(manifest)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained_run(tiny_dataset, tmp_path_factory):
    """Two experts (one per fold, two architectures) trained for 4 epochs; decoding in a worker."""
    d = tmp_path_factory.mktemp("run")
    cfg = write_config(d / "cfg.yaml", tiny_dataset, d / "out",
                       experts=[{"arch": "convnext_atto", "input_size": 64, "val_fold": 0},
                                {"arch": "vit_tiny_patch16_224", "input_size": 64, "val_fold": 1, "weight": 0.5}],
                       data={"balanced_sampler": True, "workers": 1}, train__epochs=4, train__checkpoint_every_steps=0)
    r = dfx("train", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "out", r


def test_training_lowers_the_loss_and_logs(trained_run):
    out, r = trained_run
    for name in ("convnext_atto-f0", "vit_tiny_patch16_224-f1"):
        info = json.loads((out / "experts" / name / "final" / "expert.json").read_text())
        hist = info["history"]
        assert len(hist) == 4
        assert hist[-1]["train_total"] < hist[0]["train_total"], hist
        assert all(h["val_auc"] is not None for h in hist)
    assert "epoch 4/4" in r.stdout and "val AUC (EMA)" in r.stdout
    log = (out / "logs" / "metrics.csv").read_text().splitlines()
    assert log[0] == "time,step,key,value" and any(",convnext_atto-f0/kl," in line for line in log)
    for f in ("run.json", "oof.csv", "metrics.json", "roc.png", "per_source.md", "train.log", "config.yaml"):
        assert (out / f).is_file(), f
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_corrupt_image_is_skipped_and_reported(trained_run):
    out, r = trained_run
    skipped = {}
    for name in ("convnext_atto-f0", "vit_tiny_patch16_224-f1"):
        skipped.update(json.loads((out / "experts" / name / "final" / "expert.json").read_text())["skipped"])
    assert any("broken.png" in msg for msg in skipped.values())
    assert "broken.png" in r.stderr  # logged as it happened


def test_out_of_fold_ensemble_and_decision(trained_run, tiny_dataset):
    out, _ = trained_run
    run = json.loads((out / "run.json").read_text())
    oof = read_manifest(out / "oof.csv")
    good = len(read_manifest(tiny_dataset).rows) - 1  # every image but the corrupt one, once
    assert run["oof"]["n"] == len(oof.rows) == good
    t, (lo, hi) = run["decision"]["threshold"], run["decision"]["uncertain_band"]
    assert 0 <= lo <= t <= hi <= 1 and run["decision"]["rule"]
    assert run["manifests"][0]["sha256"] and run["config"]["train"]["epochs"] == 4


def test_exported_bundle_reproduces_validation_predictions(trained_run, tmp_path):
    out, _ = trained_run
    bundle = tmp_path / "bundle"
    r = dfx("export", str(out), "--out", str(bundle))
    assert r.returncode == 0, r.stderr
    assert dfx("bundle", "verify", str(bundle)).returncode == 0
    spec = read_spec(bundle)
    run = json.loads((out / "run.json").read_text())
    assert spec.threshold == pytest.approx(run["decision"]["threshold"])
    assert spec.provenance["manifests"] == run["manifests"]
    assert [e.weight for e in spec.experts] == [1.0, 0.5]
    det = Detector(bundle, device="cpu")
    for e in spec.experts:
        vp = read_manifest(out / "experts" / e.name / "final" / "val_predictions.csv")
        preds = det.predict([Path(row["path"]) for row in vp.rows])
        for row, pred in zip(vp.rows, preds):
            assert pred.experts[e.name] == pytest.approx(float(row["prob"]), abs=1e-5)
    # plain timm reads the exported EMA weights strictly
    import timm

    e = spec.experts[1]
    model = timm.create_model(e.arch, num_classes=2, **e.model_kwargs)
    model.load_state_dict(load_file(str(bundle / e.file)), strict=True)


def test_half_precision_export_is_half_the_size_and_scores_alike(trained_run, tmp_path):
    import timm

    out, _ = trained_run
    full, half = tmp_path / "full", tmp_path / "half"
    assert dfx("export", str(out), "--out", str(full)).returncode == 0
    r = dfx("export", str(out), "--out", str(half), "--half")
    assert r.returncode == 0, r.stderr
    spec = read_spec(half)
    assert spec.provenance["weights_dtype"] == "float16"
    for e in spec.experts:
        assert (half / e.file).stat().st_size < 0.55 * (full / e.file).stat().st_size
        model = timm.create_model(e.arch, num_classes=2, **e.model_kwargs)
        model.load_state_dict(load_file(str(half / e.file)), strict=True)   # plain timm, strict, cast to fp32
    images = sorted(Path(read_manifest(out / "oof.csv").rows[0]["path"]).parent.glob("*_00*.png"))
    a, b = Detector(full, device="cpu").predict(images), Detector(half, device="cpu").predict(images)
    assert max(abs(x.score - y.score) for x, y in zip(a, b)) < 5e-3


def test_evaluate_writes_metrics_table_and_roc(trained_run, tiny_dataset, tmp_path):
    out, _ = trained_run
    bundle = tmp_path / "b"
    assert dfx("export", str(out), "--out", str(bundle)).returncode == 0
    r = dfx("evaluate", str(tiny_dataset), "--weights", str(bundle), "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["n"] == 48 and summary["errors"] == 1 and 0 <= summary["auc"] <= 1
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(metrics["per_source"]) == {"skimage", "tinygen"}
    for key in ("auc", "ap", "accuracy", "eer", "tpr_at_fpr_1pct", "tpr_at_fpr_0.1pct", "ece"):
        assert key in metrics["overall"]
    assert set(metrics["experts"]) == {"convnext_atto-f0", "vit_tiny_patch16_224-f1"}
    assert "| tinygen |" in (tmp_path / "ev" / "per_source.md").read_text()
    assert (tmp_path / "ev" / "roc.png").stat().st_size > 1000


def _train_proc(cfg: Path, *extra: str) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("dfx")
    return subprocess.Popen([str(exe), "train", str(cfg), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_killed_run_resumes_to_the_same_weights(tiny_dataset, tmp_path):
    full_cfg = write_config(tmp_path / "full.yaml", tiny_dataset, tmp_path / "full")
    killed_cfg = write_config(tmp_path / "killed.yaml", tiny_dataset, tmp_path / "killed")
    proc = _train_proc(full_cfg)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]

    proc = _train_proc(killed_cfg)
    progress = tmp_path / "killed" / "experts" / "convnext_atto-f0" / "checkpoint" / "progress.json"
    state = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            state = json.loads(progress.read_text())
        except (OSError, ValueError):
            state = None
        if state and state["global_step"] >= 4 and state["batches_done"] > 0:  # mid-epoch, past epoch 1
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {state}"
    assert not (tmp_path / "killed" / "experts" / "convnext_atto-f0" / "final").exists()

    resumed = _train_proc(killed_cfg, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming at epoch" in out
    a = json.loads((tmp_path / "full" / "experts" / "convnext_atto-f0" / "final" / "expert.json").read_text())
    b = json.loads((tmp_path / "killed" / "experts" / "convnext_atto-f0" / "final" / "expert.json").read_text())
    assert a["steps"] == b["steps"] == 9
    wa = load_file(str(tmp_path / "full" / "experts" / "convnext_atto-f0" / "final" / "ema.safetensors"))
    wb = load_file(str(tmp_path / "killed" / "experts" / "convnext_atto-f0" / "final" / "ema.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    # finished runs are not redone: a second --resume only re-finalises
    again = _train_proc(killed_cfg, "--resume")
    out2, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and "already trained; skipping" in out2


@pytest.mark.parametrize("override, message", [
    ("experts.0.arch=resnet_does_not_exist", "unknown timm architecture 'resnet_does_not_exist'"),
    ("data.manifest=/nonexistent/manifest.csv", "/nonexistent/manifest.csv not found"),
    ("loss.kl=-1", "loss.kl: must be a number >= 0"),
    ("train.epochz=3", "unknown key(s) epochz"),
    ("experts.0.val_fold=7", "val_fold=7: no rows in that fold (the manifest's folds: 0, 1)"),
    ("experts.0.family=residual", "experts.0.stem: a residual expert needs stem npr or srm"),
    ("experts.0.stem=npr", "only a residual expert takes one"),
    ("experts.0.preprocess=tiles experts.0.crops=6", "experts.0.crops: a square number"),
    ("experts.0.freeze=6", "experts.0.freeze: convnext_atto has 6 layer groups (stem first); freeze at most 5, got 6"),
    ("experts.0.layer_decay=1.5", "experts.0.layer_decay: a factor in (0, 1], got 1.5"),
    ("experts.0.augment.blur=0.1", "experts.0.augment: unknown key(s) blur"),
    ("experts.0.fit=lbfgs", "experts.0.fit: sgd (CE + KL + NCE) or logistic"),
    ("experts.0.fit=logistic", "experts.0.fit: logistic fits a head on frozen features; family 'timm' trains"),
    ("experts.0.family=probe experts.0.stages=[1] experts.0.fit=logistic experts.0.fit_c=0",
     "experts.0.fit_c: must be a number > 0"),
])
def test_config_errors_fail_before_training(tiny_dataset, tmp_path, override, message):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_dataset, tmp_path / "out")
    r = dfx("train", str(cfg), *override.split())
    assert r.returncode == 1
    assert message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists(), "nothing may be written before the config is known to be good"


def test_an_expert_may_have_its_own_augmentation():
    """``experts.N.augment``: the fields it names, over the run's; the others keep the run's."""
    from training.config import TrainConfig, _build, expert_augment

    cfg = _build(TrainConfig, {"augment": {"blur_p": 0.4, "noise_p": 0.1},
                               "experts": [{"arch": "convnext_atto"},
                                           {"arch": "convnext_atto", "augment": {"blur_p": 0, "jpeg_quality": [70, 100]}}]},
                 "")
    plain, gentle = (expert_augment(cfg, e) for e in cfg.experts)
    assert plain == cfg.augment
    assert (gentle.blur_p, gentle.jpeg_quality, gentle.noise_p) == (0.0, (70, 100), 0.1)


def test_existing_output_needs_resume(trained_run, tiny_dataset, tmp_path):
    out, _ = trained_run
    cfg = write_config(tmp_path / "cfg.yaml", tiny_dataset, out)
    r = dfx("train", str(cfg))
    assert r.returncode == 1 and "--resume" in r.stderr


def _torchrun(cfg: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``dfx train`` in two real processes (gloo on the CPU), as `accelerate launch` runs it on two GPUs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "inference.cli", "train", str(cfg), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"})


@pytest.mark.slow
def test_two_processes_train_once_and_match_one_process(tiny_dataset, tmp_path):
    """Two processes with 4 images each per step against one process with 8: the same global batches (the
    sampler's order is shared, each item's augmentation is seeded by its position), DDP averages two
    equal-size mean gradients (= the mean over 8), the schedule counts optimiser steps, so the validation
    predictions must agree up to float summation order (1e-4). NCE is off here: its contrastive term is
    computed within each process's batch, a real (documented) difference; the default objective runs below."""
    from inference.manifest import read_manifest

    same = dict(train__epochs=3, train__checkpoint_every_steps=0, loss={"ce": 1.0, "kl": 0.5, "nce": 0.0},
                optim={"lr": 0.0005, "warmup_steps": 2})
    one = _train_proc(write_config(tmp_path / "one.yaml", tiny_dataset, tmp_path / "one", train__batch_size=8, **same))
    _, err1 = one.communicate(timeout=600)
    assert one.returncode == 0, err1[-3000:]
    cfg2 = write_config(tmp_path / "two.yaml", tiny_dataset, tmp_path / "two", train__batch_size=4, **same)
    r = _torchrun(cfg2)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    run1 = json.loads((tmp_path / "one" / "run.json").read_text())
    run2 = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run1["processes"] == 1 and run2["processes"] == 2
    assert r.stdout.count("training on 2 process(es)") == 1  # printed by the main process only
    final = Path("experts") / "convnext_atto-f0" / "final"
    assert json.loads((tmp_path / "one" / final / "expert.json").read_text())["steps"] == \
        json.loads((tmp_path / "two" / final / "expert.json").read_text())["steps"]
    p1 = {row["path"]: float(row["prob"]) for row in read_manifest(tmp_path / "one" / final / "val_predictions.csv").rows}
    p2 = {row["path"]: float(row["prob"]) for row in read_manifest(tmp_path / "two" / final / "val_predictions.csv").rows}
    assert p1.keys() == p2.keys() and len(p1) > 10
    assert max(abs(p1[k] - p2[k]) for k in p1) < 1e-4
    assert (tmp_path / "two" / "train.log").is_file()
    assert len((tmp_path / "two" / "logs" / "metrics.csv").read_text().splitlines()) > 1
    # A second launch into the finished run's folder is refused by every rank, with the message, no hang.
    again = _torchrun(cfg2, timeout=300)
    assert again.returncode != 0 and "already holds a run" in again.stderr
    # ... and --resume skips the finished expert in both processes.
    resumed = _torchrun(cfg2, "--resume", timeout=300)
    assert resumed.returncode == 0 and "already trained; skipping" in resumed.stdout
    # The default objective (NCE on, projection head in the graph) trains in two processes too.
    nce = _torchrun(write_config(tmp_path / "nce.yaml", tiny_dataset, tmp_path / "nce", train__epochs=1,
                                 train__checkpoint_every_steps=0))
    assert nce.returncode == 0, (nce.stdout + nce.stderr)[-3000:]
    # A patch expert on EfficientNet (whose features_only model keeps the blocks after the cut: no gradient
    # reaches them, which DDP refused) with frozen early groups trains in two processes too.
    patch = _torchrun(write_config(tmp_path / "patch.yaml", tiny_dataset, tmp_path / "patch", train__epochs=1,
                                   train__checkpoint_every_steps=0, loss={"ce": 1.0, "kl": 0.5, "nce": 0.0},
                                   experts=[{"arch": "tf_efficientnet_lite0", "family": "patch", "stages": [3],
                                             "input_size": 64, "val_fold": 0, "freeze": 2}]))
    assert patch.returncode == 0, (patch.stdout + patch.stderr)[-3000:]
    assert "cannot reach the outputs" in patch.stderr


def test_patch_training_refuses_a_manifest_whose_masks_are_missing(tiny_dataset, tmp_path):
    """A manifest moved by hand keeps its masks' old relative paths: the run must stop and say so, not skip
    every edit as an unreadable image and train a patch expert on the reals alone."""
    man = read_manifest(tiny_dataset)
    rows = [{**r, "path": str(man.abspath(r)), "mask": "masks/gone.png" if r["label"] == "1" else ""} for r in man.rows]
    moved = write_manifest(tmp_path / "moved.csv", rows)
    cfg = write_config(tmp_path / "cfg.yaml", moved, tmp_path / "out")
    experts = json.dumps([{"arch": "convnext_atto", "family": "patch", "stages": [1], "input_size": 64, "val_fold": 0}])
    r = dfx("train", str(cfg), f"experts={experts}")
    assert r.returncode == 1
    assert "of the masks the manifest names are missing (first: " in r.stderr and "gone.png" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_partial_fine_tuning_freezes_early_groups_and_decays_rates(tiny_dataset, tmp_path):
    """experts.N.freeze / layer_decay (training/finetune.py): the stem and first stage of a "pretrained" ConvNeXt
    (a local safetensors file) come out of training bit-identical, running statistics included; later stages
    move; the optimiser's rates fall by layer_decay per group towards the input."""
    from safetensors.torch import save_file

    from training.finetune import layer_groups, partial_param_groups

    import timm

    torch.manual_seed(0)
    start = timm.create_model("convnext_atto")  # an ImageNet-shaped file, as a user's pretrained weights are
    save_file({k: v.contiguous() for k, v in start.state_dict().items()}, str(tmp_path / "start.safetensors"))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_dataset, tmp_path / "out", train__epochs=2,
                       experts=[{"arch": "convnext_atto", "input_size": 64, "val_fold": 0, "freeze": 2,
                                 "layer_decay": 0.5, "pretrained": str(tmp_path / "start.safetensors")}])
    r = dfx("train", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    trained = load_file(str(tmp_path / "out" / "experts" / "convnext_atto-f0" / "final" / "ema.safetensors"))
    before = start.state_dict()
    frozen = [k for k in before if k.startswith(("stem.", "stages.0."))]
    assert frozen and all(torch.equal(trained[k], before[k]) for k in frozen), "the stem and stage 0 are frozen"
    assert not torch.equal(trained["stages.3.blocks.0.conv_dw.weight"], before["stages.3.blocks.0.conv_dw.weight"])

    model = timm.create_model("convnext_atto", num_classes=2)
    groups = layer_groups(model, "convnext_atto")  # stem, stages 0-3, the final norm; head.fc is the head
    assert [g[0][0].split(".")[0] + (g[0][0].split(".")[1] if g[0][0].startswith("stages") else "") for g in groups] \
        == ["stem", "stages0", "stages1", "stages2", "stages3", "head"]
    net = torch.nn.ModuleDict({"backbone": model})
    param_groups = partial_param_groups(net, model, "convnext_atto", lr=1.0, weight_decay=0.05, freeze=1,
                                        layer_decay=0.5)
    assert sorted({g["lr"] for g in param_groups}) == [0.5 ** 5, 0.5 ** 4, 0.5 ** 3, 0.5 ** 2, 0.5, 1.0]
    assert {id(p) for g in param_groups if g["lr"] == 1.0 for p in g["params"]} == \
        {id(p) for p in model.head.fc.parameters()}, "the classifier trains at the full rate"
    assert not any(p.requires_grad for _, p in groups[0])
    assert {id(p) for g in param_groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(g["weight_decay"] == 0.0 for g in param_groups if all(p.ndim == 1 for p in g["params"]))


def test_a_bundle_records_where_its_data_was_in_the_project_not_on_one_machine(tmp_path, monkeypatch):
    """Export writes a run's paths normalised and relative to the working folder when under it (a committed bundle
    must not name one machine's home folder); paths outside it stay absolute, names and URLs untouched."""
    from training.export import _portable

    monkeypatch.chdir(tmp_path)
    inside = str(tmp_path / "training" / "configs" / ".." / ".." / "runs" / "folds.csv")
    got = _portable({"manifests": [{"path": inside, "sha256": "ab"}], "pretrained": "pkg:clip_vit_b16",
                     "elsewhere": "/opt/data/x.csv", "hub": "https://example.org/a/b"})
    assert got == {"manifests": [{"path": "runs/folds.csv", "sha256": "ab"}], "pretrained": "pkg:clip_vit_b16",
                   "elsewhere": "/opt/data/x.csv", "hub": "https://example.org/a/b"}


def test_experts_that_read_faces_must_have_crops_cut_one_way(tiny_dataset, tmp_path):
    """A bundle finds faces one way (its face finder and search, format 1.11): face experts whose crops were cut by
    different finders (the ``finder.json`` ``dfx prepare faces`` writes beside each manifest) are refused before
    anything is written."""
    import shutil

    manifests = []
    for name, method in (("a", "mtcnn"), ("b", "retinaface")):
        (tmp_path / name).mkdir()
        manifests.append(str(shutil.copy(tiny_dataset, tmp_path / name / "manifest.csv")))
        (tmp_path / name / "finder.json").write_text(json.dumps({"method": method, "max_side": 640, "min_face": 16,
                                                                  "min_confidence": 0.9, "margin": 0.3}))
    face = {"arch": "convnext_atto", "input_size": 32, "reads": "faces"}
    cfg = write_config(tmp_path / "cfg.yaml", tiny_dataset, tmp_path / "out", experts=[
        {"arch": "convnext_atto", "input_size": 32}, {**face, "name": "fa", "manifest": [manifests[0]]},
        {**face, "name": "fb", "manifest": [manifests[1]]}])
    r = dfx("train", str(cfg))
    assert r.returncode == 1 and "cut by different finders or searches" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()
