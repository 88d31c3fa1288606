"""Embedding and FAISS clustering into cluster-disjoint, parent-preserving, balanced folds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from inference.manifest import read_manifest, write_manifest

from .conftest import SHARED_DEV, dfx


def synthetic(tmp: Path, n_clusters: int = 12, per: int = 40, dim: int = 64, seed: int = 0):
    """Well-separated clusters on the sphere; labels mixed; every 4th fake's parent is a real image of the
    paired cluster (c xor 1), so folds must keep each pair together. Images need not exist for clustering."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    truth = np.repeat(np.arange(n_clusters), per)
    feats = (centres[truth] + 0.15 * rng.normal(size=(len(truth), dim))).astype(np.float32)
    feats *= rng.uniform(0.5, 3.0, size=(len(truth), 1)).astype(np.float32)  # scale must not matter (spherical)
    labels = (rng.random(len(truth)) < 0.4).astype(int)
    rows = [{"path": f"img_{i:05d}.png", "label": int(labels[i]), "source": f"s{truth[i] % 3}"} for i in range(len(truth))]
    reals = np.nonzero(labels == 0)[0]
    for i in np.nonzero(labels == 1)[0][::4]:
        other = reals[truth[reals] == (truth[i] ^ 1)]
        rows[i]["parent"] = rows[int(rng.choice(other))]["path"]
    manifest = write_manifest(tmp / "m.csv", rows)
    np.save(tmp / "f.npy", feats)
    return manifest, tmp / "f.npy", truth, rows


@pytest.fixture()
def synth(tmp_path):
    return synthetic(tmp_path)


def _run(manifest, feats, out, *extra):
    return dfx("prepare", "cluster", str(manifest), "--features", str(feats), "-o", str(out), *extra)


def test_clusters_recovered_folds_disjoint_parents_kept_balance_reported(synth, tmp_path):
    manifest, feats, truth, rows = synth
    out = tmp_path / "out.csv"
    r = _run(manifest, feats, out, "--k", "12", "--folds", "3", "--seed", "1")
    assert r.returncode == 0, r.stderr
    man = read_manifest(out)
    cluster = np.array([int(x["cluster"]) for x in man.rows])
    fold = np.array([int(x["fold"]) for x in man.rows])
    assert adjusted_rand_score(truth, cluster) >= 0.95
    for c in np.unique(cluster):  # a cluster never spans two folds
        assert len(np.unique(fold[cluster == c])) == 1
    by_path = {x["path"]: i for i, x in enumerate(man.rows)}
    linked = [(i, by_path[x["parent"]]) for i, x in enumerate(man.rows) if x["parent"]]
    assert len(linked) > 10
    for child, parent in linked:
        assert fold[child] == fold[parent]
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["parent_links"] == len(linked)
    bal = report["balance"]
    sizes = np.bincount(fold, minlength=3)
    assert bal["sizes"] == sizes.tolist()
    assert bal["max_size_deviation"] == pytest.approx(np.max(np.abs(sizes / (len(fold) / 3) - 1)), abs=1e-3)
    ratios = np.array([np.mean([int(man.rows[i]["label"]) for i in np.nonzero(fold == f)[0]]) for f in range(3)])
    assert bal["max_fake_ratio_deviation"] >= np.max(np.abs(ratios - ratios.mean())) - 0.02
    assert bal["max_size_deviation"] < 0.5, bal  # groups are few and large here; still roughly even
    assert out.with_suffix(".map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [x["source"] for x in man.rows] == [x["source"] for x in rows], "other columns are kept"


def test_parents_win_when_links_would_glue_every_cluster(tmp_path):
    """Fakes of one kind form their own cluster while their parents lie in every other cluster (what
    diffusion outputs do): strict cluster grouping would give one group. Children follow their parents
    instead, folds stay balanced, and the report counts the moves."""
    rng = np.random.default_rng(1)
    dim, per = 32, 30
    centres = rng.normal(size=(5, dim)) * 3
    feats, rows = [], []
    for c in range(4):  # four clusters of reals
        for i in range(per):
            feats.append(centres[c] + 0.1 * rng.normal(size=dim))
            rows.append({"path": f"real_{c}_{i}.jpg", "label": 0})
    for i in range(40):  # one cluster of fakes, each made from a real of any cluster
        feats.append(centres[4] + 0.1 * rng.normal(size=dim))
        rows.append({"path": f"fake_{i}.png", "label": 1, "parent": f"real_{i % 4}_{i % per}.jpg"})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    np.save(tmp_path / "f.npy", np.asarray(feats, dtype=np.float32))
    out = tmp_path / "out.csv"
    r = _run(manifest, tmp_path / "f.npy", out, "--k", "5", "--folds", "2", "--no-map")
    assert r.returncode == 0, r.stderr
    man = read_manifest(out)
    fold = {x["path"]: x["fold"] for x in man.rows}
    for x in man.rows:
        if x["parent"]:
            assert fold[x["path"]] == fold[x["parent"]]
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["children_moved_to_parent_fold"] > 0 and report["clusters_split_across_folds"] >= 1
    assert report["balance"]["max_size_deviation"] < 0.35, report["balance"]


def test_same_seed_same_folds(synth, tmp_path):
    manifest, feats, _, _ = synth
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert _run(manifest, feats, a, "--k", "12", "--folds", "4", "--seed", "7", "--no-map").returncode == 0
    assert _run(manifest, feats, b, "--k", "12", "--folds", "4", "--seed", "7", "--no-map").returncode == 0
    assert a.read_text() == b.read_text()


@pytest.mark.parametrize("case, message", [
    ("mismatch", "has 479 rows but"),
    ("nan", "row(s) have NaN/inf"),
    ("k_too_big", "is larger than the number of usable images"),
    ("k_below_folds", "fewer clusters than --folds"),
    ("one_fold", "need at least 2 folds"),
    ("not_npy", "not a .npy array"),
])
def test_bad_input_fails_clearly_before_work(synth, tmp_path, case, message):
    manifest, feats, _, _ = synth
    arr = np.load(feats)
    args = ["--k", "12", "--folds", "3"]
    if case == "mismatch":
        np.save(tmp_path / "f2.npy", arr[:-1])
        feats = tmp_path / "f2.npy"
    elif case == "nan":
        arr[5, 3] = np.nan
        np.save(tmp_path / "f2.npy", arr)
        feats = tmp_path / "f2.npy"
    elif case == "k_too_big":
        args = ["--k", "5000", "--folds", "3"]
    elif case == "k_below_folds":
        args = ["--k", "2", "--folds", "3"]
    elif case == "one_fold":
        args = ["--k", "4", "--folds", "1"]
    elif case == "not_npy":
        (tmp_path / "f2.npy").write_text("hello")
        feats = tmp_path / "f2.npy"
    out = tmp_path / "out.csv"
    r = _run(manifest, feats, out, *args)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert not out.exists()


def test_drop_invalid_leaves_rows_out_of_folds(synth, tmp_path):
    manifest, feats, _, _ = synth
    arr = np.load(feats)
    arr[[3, 9]] = np.nan
    np.save(tmp_path / "f2.npy", arr)
    out = tmp_path / "out.csv"
    r = _run(manifest, tmp_path / "f2.npy", out, "--k", "12", "--folds", "3", "--drop-invalid", "--no-map")
    assert r.returncode == 0, r.stderr
    man = read_manifest(out)
    assert man.rows[3]["fold"] == "" and man.rows[9]["fold"] == "" and man.rows[4]["fold"] != ""
    assert json.loads(out.with_suffix(".report.json").read_text())["dropped_rows"] == [3, 9]


def test_embed_handcrafted_resumes_and_marks_unreadable(tmp_path, odd_images, bad_images):
    from inference.embed import embed_manifest

    rows = [{"path": str(p), "label": 0} for p in odd_images.values()]
    rows.insert(2, {"path": str(bad_images["truncated.jpg"][0]), "label": 1})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "feats.npy"
    full = embed_manifest(manifest, out, workers=0, chunk=4, progress=False)
    a = np.load(out)
    assert a.shape == (len(rows), full["dim"]) and np.isnan(a[2]).all() and np.isfinite(np.delete(a, 2, 0)).all()
    assert full["failed"][0]["row"] == 2
    # a run "killed" after two chunks: the partial file and the progress record are what it leaves
    out2 = tmp_path / "feats2.npy"
    embed_manifest(manifest, out2, workers=0, chunk=4, progress=False)
    partial = out2.with_name(out2.name + ".partial")
    shutil.copy(out2, partial)
    arr = np.load(partial, mmap_mode="r+")
    arr[8:] = 0  # rows after the second chunk were never written
    arr.flush()
    del arr
    ident = {k: full[k] for k in ("manifest_sha256", "backbone", "n", "dim")}
    out2.with_name(out2.name + ".progress.json").write_text(json.dumps({**ident, "done": 8, "failed": {"2": "x"}}))
    out2.unlink()
    embed_manifest(manifest, out2, workers=0, chunk=4, progress=False)
    b = np.load(out2)
    assert np.array_equal(np.nan_to_num(a), np.nan_to_num(b))
    assert not partial.exists() and not out2.with_name(out2.name + ".progress.json").exists()


def test_embed_with_a_bundle_expert_and_timm(tmp_path, odd_images, tiny_bundle):
    rows = [{"path": str(p), "label": 0} for p in list(odd_images.values())[:5]]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    r = dfx("prepare", "embed", str(manifest), "--backbone", f"bundle:{tiny_bundle}:convnext_atto",
            "-o", str(tmp_path / "b.npy"), "--workers", "0")
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "b.npy").shape == (5, 320)
    r = dfx("prepare", "embed", str(manifest), "--backbone", "timm:no_such_arch", "-o", str(tmp_path / "t.npy"))
    assert r.returncode == 1 and "unknown timm architecture" in r.stderr


@pytest.mark.skipif(not (SHARED_DEV / "manifest.csv").is_file(), reason="../shared/data/dev is absent")
def test_dev_collection_embeds_and_clusters(tmp_path):
    """Real images end to end: handcrafted embedding of the dev collection, then 5 folds."""
    feats = tmp_path / "dev.npy"
    r = dfx("prepare", "embed", str(SHARED_DEV / "manifest.csv"), "-o", str(feats))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "dev_folds.csv"
    r = _run(SHARED_DEV / "manifest.csv", feats, out, "--k", "20", "--folds", "5")
    assert r.returncode == 0, r.stderr
    man = read_manifest(out)
    assert len(man) == 357 and {x["fold"] for x in man.rows} == {"0", "1", "2", "3", "4"}
    assert all(man.abspath(x).is_file() for x in man.rows), "paths are re-rooted to the new manifest's folder"
