"""Keeping a detector current: fine-tuning from a bundle (`--init-from`, `data.replay`) and choosing what
to label next (`dfx select`)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from inference import Detector
from inference.bundle import bundle_digest, read_spec
from inference.manifest import read_manifest, write_manifest
from training.select import SelectError, k_center_greedy, rank

from .conftest import dfx
from .test_train import write_config


def _convnext_only(tiny_bundle: Path, dst: Path) -> Path:
    """The tiny bundle's ConvNeXt expert alone: LayerNorm only, no BatchNorm statistics that even a vanishing
    learning rate would let training move (the ViT beside it would do as well; one expert is faster)."""
    from safetensors.torch import load_file

    from inference.bundle import BundleSpec, write_bundle

    spec = read_spec(tiny_bundle)
    e = spec.experts[0]
    write_bundle(dst, BundleSpec(**{**spec.__dict__, "experts": (e,), "name": "parent"}),
                 {e.name: load_file(str(tiny_bundle / e.file))})
    return dst


@pytest.fixture(scope="module")
def parent(tiny_bundle, tmp_path_factory) -> Path:
    return _convnext_only(tiny_bundle, tmp_path_factory.mktemp("parent") / "parent")


def test_init_from_starts_from_exactly_the_bundle_weights(parent, tiny_dataset, tmp_path):
    """With a vanishing learning rate, training moves nothing: the exported expert scores every image as the
    parent does, so training started from exactly the parent's weights."""
    name = read_spec(parent).experts[0].name
    cfg = write_config(tmp_path / "cfg.yaml", tiny_dataset, tmp_path / "run",
                       experts=[{"arch": "convnext_atto", "input_size": 64, "val_fold": 0, "name": name}],
                       optim={"lr": 1e-12, "warmup_steps": 0}, train__epochs=1, train__max_steps_per_epoch=2,
                       loss={"ce": 1.0, "kl": 0.5, "nce": 0.0})
    r = dfx("train", str(cfg), "--init-from", str(parent))
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tmp_path / "run" / "experts" / name / "final" / "expert.json").read_text())
    spec = read_spec(parent)
    assert info["init_from"]["model"] == f"parent@{bundle_digest(spec)}" and info["init_from"]["expert"] == name
    r = dfx("export", str(tmp_path / "run"), "--out", str(tmp_path / "child"))
    assert r.returncode == 0, r.stderr
    child = read_spec(tmp_path / "child")
    assert child.provenance["init_from"][name]["model"] == f"parent@{bundle_digest(spec)}", "the parent is recorded"
    images = sorted(p for p in tiny_dataset.parent.glob("*.png") if p.name != "broken.png")[:12]
    a = Detector(parent, device="cpu").predict(images)
    b = Detector(tmp_path / "child", device="cpu").predict(images)
    for x, y in zip(a, b):
        assert y.experts[name] == pytest.approx(x.experts[name], abs=1e-5)


def test_init_from_with_an_expert_name_and_mismatches_refused(parent, tiny_dataset, tmp_path):
    name = read_spec(parent).experts[0].name
    # --init-from matches by name: a differently named expert is refused, listing the bundle's experts
    cfg = write_config(tmp_path / "a.yaml", tiny_dataset, tmp_path / "a",
                       experts=[{"arch": "convnext_atto", "input_size": 64, "val_fold": 0}])
    r = dfx("train", str(cfg), "--init-from", str(parent))
    assert r.returncode == 1 and "has no expert 'convnext_atto-f0'" in r.stderr and f"it has: {name}" in r.stderr
    # another architecture: refused with both names, before anything trains
    cfg = write_config(tmp_path / "b.yaml", tiny_dataset, tmp_path / "b",
                       experts=[{"arch": "resnet18", "input_size": 64, "val_fold": 0,
                                 "init_from": f"{parent}:{name}"}])
    r = dfx("train", str(cfg))
    assert r.returncode == 1 and "resnet18" in r.stderr and "convnext_atto" in r.stderr and "must match" in r.stderr
    # another family (a residual expert of the same architecture)
    cfg = write_config(tmp_path / "c.yaml", tiny_dataset, tmp_path / "c",
                       experts=[{"arch": "convnext_atto", "input_size": 64, "val_fold": 0, "family": "residual",
                                 "stem": "npr", "init_from": f"{parent}:{name}"}])
    r = dfx("train", str(cfg))
    assert r.returncode == 1 and "residual expert" in r.stderr and "timm expert" in r.stderr
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_replay_trains_on_old_rows_and_never_validates_on_them(tiny_dataset, tmp_path):
    from training.config import ConfigError, load_config
    from training.rows import read_rows as _rows, split_rows

    man = read_manifest(tiny_dataset)
    old = tmp_path / "old"
    old.mkdir()
    rows = []
    for r in man.rows[14:34]:  # reals and fakes
        src = man.abspath(r)
        if src.name == "broken.png":
            continue
        shutil.copy(src, old / f"old_{src.name}")
        rows.append({**r, "path": f"old_{src.name}", "fold": 0})
    old_manifest = write_manifest(old / "manifest.csv", rows)
    cfg_path = write_config(tmp_path / "r.yaml", tiny_dataset, tmp_path / "r",
                            experts=[{"arch": "convnext_atto", "input_size": 64, "val_fold": 0}],
                            data={"balanced_sampler": True, "workers": 0, "replay": f"{old_manifest}:0.5"})
    cfg = load_config(str(cfg_path), [])
    all_rows = _rows(cfg)
    replayed = [r for r in all_rows if r.get("replay")]
    labels = [int(r["label"]) for r in rows]
    assert labels.count(0) == labels.count(1) == 10
    assert len(replayed) == round(0.5 * labels.count(0)) + round(0.5 * labels.count(1)), "a stratified half"
    train, val = split_rows(all_rows, cfg.experts[0], 0)
    assert all(r in train for r in replayed) and not any(r.get("replay") for r in val)
    assert [r["abspath"] for r in _rows(cfg) if r.get("replay")] == [r["abspath"] for r in replayed], "seeded"
    bad = load_config(str(cfg_path), [f"data.replay={old_manifest}:1.5"])
    with pytest.raises(ConfigError, match="fraction must be in"):
        _rows(bad)


# -- dfx select ---------------------------------------------------------------------------------------

def test_entropy_and_margin_orders_by_hand():
    scores = np.array([0.9, 0.31, 0.05, 0.55, 0.7, 0.29])
    picks, crit = rank("entropy", 4, scores=scores, threshold=0.3)
    assert picks == [1, 5, 2, 3], "|p - 0.3|: 0.01, 0.01, 0.25, 0.25 (ties in pool order)"
    assert crit == pytest.approx([0.01, 0.01, 0.25, 0.25])
    picks, _ = rank("margin", 6, scores=scores, threshold=0.3)
    logit = np.log(scores / (1 - scores)) - np.log(0.3 / 0.7)
    assert picks == list(np.argsort(np.abs(logit), kind="stable"))
    experts = np.array([[0.1, 0.9], [0.5, 0.5], [0.2, 0.3], [0.0, 1.0], [0.4, 0.6], [0.5, 0.55]])
    picks, crit = rank("disagreement", 2, scores=scores, experts=experts)
    assert picks == [3, 0] and crit[0] > crit[1]
    with pytest.raises(SelectError, match="two or more experts"):
        rank("disagreement", 2, scores=scores, experts=experts[:, :1])


def test_coreset_picks_points_far_apart():
    """Three tight clusters of ten points: k-center greedy takes one point from each before any second one."""
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = np.concatenate([c + rng.normal(0, 0.1, (10, 2)) for c in centres])
    picks, dists = k_center_greedy(pts, 3)
    assert sorted(p // 10 for p in picks) == [0, 1, 2], "one per cluster"
    assert dists[1] > 5 and dists[2] > 5
    # labelled points in clusters 0 and 1: the first pick comes from cluster 2
    picks, _ = k_center_greedy(pts, 1, labelled=centres[:2])
    assert picks[0] // 10 == 2


def test_random_is_seeded_and_budget_checked():
    a, _ = rank("random", 5, n=20, seed=1)
    b, _ = rank("random", 5, n=20, seed=1)
    c, _ = rank("random", 5, n=20, seed=2)
    assert a == b != c and len(set(a)) == 5
    with pytest.raises(SelectError, match="between 1 and the pool's 20"):
        rank("random", 21, n=20)
    with pytest.raises(SelectError, match="unknown strategy 'smart'"):
        rank("smart", 1, n=20)
    with pytest.raises(SelectError, match="empty"):
        rank("entropy", 1, scores=np.array([]))


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_select_cli_budget_exclude_and_order(tiny_bundle, tiny_dataset, tmp_path):
    man = read_manifest(tiny_dataset)
    labelled = write_manifest(tmp_path / "labelled.csv", [{**r, "path": str(man.abspath(r))} for r in man.rows[:10]])
    out = tmp_path / "to_label.csv"
    r = dfx("select", str(tiny_dataset), "--weights", str(tiny_bundle), "--budget", "8", "-o", str(out),
            "--exclude", str(labelled), "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = _read(out)
    assert len(rows) == 8 and len({x["path"] for x in rows}) == 8
    excluded = {str(man.abspath(x)) for x in man.rows[:10]}
    assert not excluded & {x["path"] for x in rows}
    assert [int(x["rank"]) for x in rows] == list(range(1, 9))
    assert "broken.png" not in "".join(x["path"] for x in rows), "an unreadable image is never selected"
    # the entropy order, by hand: every unexcluded readable image scored, the 8 closest to the threshold
    det = Detector(tiny_bundle, device="cpu")
    cand = [man.abspath(x) for x in man.rows[10:] if man.abspath(x).name != "broken.png"]
    by_hand = sorted(zip((abs(p.score - det.spec.threshold) for p in det.predict(cand)), map(str, cand)))[:8]
    assert [x["path"] for x in rows] == [p for _, p in by_hand]
    assert [float(x["criterion"]) for x in rows] == pytest.approx([d for d, _ in by_hand], abs=1e-6)
    info = json.loads(r.stdout)
    assert info["excluded"] == 10 and info["selected"] == 8
    assert not out.with_name(out.name + ".parts").exists()


def test_select_coreset_and_hybrid_run_end_to_end(tiny_bundle, tiny_dataset, tmp_path):
    for strategy in ("coreset", "hybrid"):
        out = tmp_path / f"{strategy}.csv"
        r = dfx("select", str(tiny_dataset), "--weights", str(tiny_bundle), "--budget", "5", "-o", str(out),
                "--strategy", strategy, "--embed", "handcrafted", "--no-progress")
        assert r.returncode == 0, r.stderr
        rows = _read(out)
        assert len({x["path"] for x in rows}) == 5 and all(x["strategy"] == strategy for x in rows)
        d = [float(x["criterion"]) for x in rows]
        assert d[1:] == sorted(d[1:], reverse=True), "k-center distances shrink as the pool is covered"


@pytest.mark.parametrize("args, needle", [
    (["--budget", "500"], "budget 500 must be between 1 and the pool's"),
    (["--budget", "3", "--strategy", "smart"], "invalid choice: 'smart'"),
    (["--budget", "2", "--strategy", "disagreement", "--weights-one"], "two or more experts"),
])
def test_select_bad_inputs_are_clear(tiny_bundle, tiny_dataset, tmp_path, parent, args, needle):
    if "--weights-one" in args:
        args = [a for a in args if a != "--weights-one"] + ["--weights", str(parent)]
    else:
        args = args + ["--weights", str(tiny_bundle)]
    r = dfx("select", str(tiny_dataset), "-o", str(tmp_path / "o.csv"), "--no-progress", *args)
    assert r.returncode != 0 and needle in r.stderr, r.stderr
    assert not (tmp_path / "o.csv").exists()


def test_select_on_an_empty_pool(tiny_bundle, tiny_dataset, tmp_path):
    r = dfx("select", str(tiny_dataset), "--weights", str(tiny_bundle), "--budget", "1", "-o", str(tmp_path / "o.csv"),
            "--exclude", str(tiny_dataset))
    assert r.returncode == 1 and "no unlabelled rows left" in r.stderr


@pytest.mark.parametrize("strategy", ["entropy", "margin"])
def test_duplicated_rows_are_said_and_select_picks_distinct_images(tiny_bundle, tiny_dataset, tmp_path, strategy):
    """Issue 26, item 7: 8 images listed 3 times. `evaluate` says so (n stays the rows listed, as before);
    `select --budget 5` returns 5 distinct images, not 5 rows naming 2."""
    man = read_manifest(tiny_dataset)
    good = [r for r in man.rows if r["path"] != "broken.png"][:8]
    tripled = write_manifest(tmp_path / "tripled.csv", [{**r, "path": str(man.abspath(r))} for r in good * 3])
    r = dfx("evaluate", str(tripled), "--weights", str(tiny_bundle), "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["n"] == 24 and info["duplicate_rows"] == 16
    assert "16 of 24 rows name an image an earlier row already names (8 distinct images)" in r.stderr
    out = tmp_path / "to_label.csv"
    r = dfx("select", str(tripled), "--weights", str(tiny_bundle), "--budget", "5", "--strategy", strategy,
            "-o", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = _read(out)
    assert len(rows) == 5 and len({x["path"] for x in rows}) == 5
    assert json.loads(r.stdout)["duplicates"] == 16 and "16 rows repeat an image" in r.stderr
