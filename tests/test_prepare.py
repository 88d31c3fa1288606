"""Fakes from a tiny Stable Diffusion pipeline (built from configs, loaded by path, offline) and from edits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.manifest import read_manifest, write_manifest

from .conftest import dfx

SIZE = 64


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    from data_prep.tiny_sd import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def reals(tmp_path_factory, odd_images, bad_images) -> Path:
    """Five readable reals (odd kinds included), one unreadable, one too small."""
    d = tmp_path_factory.mktemp("reals")
    rows = [{"path": str(odd_images[n]), "label": 0, "source": "odd"}
            for n in ("rgb.jpg", "cmyk.jpg", "rgba.png", "exif_rotated.jpg", "rgb.webp")]
    Image.new("RGB", (30, 30), (9, 9, 9)).save(d / "tiny.png")
    rows += [{"path": str(bad_images["truncated.jpg"][0]), "label": 0, "source": "odd"},
             {"path": str(d / "tiny.png"), "label": 0, "source": "odd"}]
    return write_manifest(d / "reals.csv", rows)


def _rows(out: Path):
    return read_manifest(out / "manifest.csv").rows


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_diffuse_each_mode(tiny_sd, reals, tmp_path, mode):
    out = tmp_path / mode
    r = dfx("prepare", "diffuse", "--model", str(tiny_sd), "--mode", mode, "--reals", str(reals), "--out", str(out),
            "--steps", "2", "--size", str(SIZE), "--per-image", "2", "--batch-size", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(out)
    assert len(rows) == 5 * 2, "two fakes per readable real; the unreadable and the too-small reals skipped"
    skipped = json.loads((out / "skipped.json").read_text())
    assert {Path(s["path"]).name for s in skipped} == {"truncated.jpg", "tiny.png"}
    assert "too small" in " ".join(s["reason"] for s in skipped) and "truncated.jpg" in r.stderr
    for row in rows:
        img = Image.open(out / row["path"])
        assert img.size == (SIZE, SIZE)
        assert row["label"] == "1" and row["kind"] == "diffusion" and row["source"] == f"tiny-sd:{mode}"
        assert Path(row["parent"]).is_file() and row["seed"]
        params = json.loads(row["params"])
        assert params["steps"] == 2 and params["prompt"] and params["seed"] == int(row["seed"])
        if mode == "inpaint":
            mask = np.asarray(Image.open(out / row["mask"]))
            assert mask.shape == (SIZE, SIZE) and 0.05 < (mask > 0).mean() < 0.7
    # a second run does nothing
    before = {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    r2 = dfx("prepare", "diffuse", "--model", str(tiny_sd), "--mode", mode, "--reals", str(reals), "--out", str(out),
             "--steps", "2", "--size", str(SIZE), "--per-image", "2")
    assert r2.returncode == 0 and "0 new, 10 already done" in r2.stderr
    assert {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == before


def test_diffuse_is_reproducible_per_item(tiny_sd, reals, tmp_path):
    from data_prep.diffuse import diffuse

    a = diffuse(str(tiny_sd), "img2img", tmp_path / "a", reals_manifest=str(reals), steps=2, size=SIZE, batch_size=5,
                progress=False)
    b = diffuse(str(tiny_sd), "img2img", tmp_path / "b", reals_manifest=str(reals), steps=2, size=SIZE, batch_size=1,
                progress=False)
    assert a["made"] == b["made"] == 5
    for row in _rows(tmp_path / "a"):
        x = np.asarray(Image.open(tmp_path / "a" / row["path"]), dtype=int)
        y = np.asarray(Image.open(tmp_path / "b" / row["path"]), dtype=int)
        assert np.abs(x - y).max() <= 2, "an item's pixels must not depend on its batch"


def test_diffuse_killed_half_way_finishes_the_rest(tiny_sd, reals, tmp_path):
    out = tmp_path / "killed"
    cmd = [str(Path(sys.executable).with_name("dfx")), "prepare", "diffuse", "--model", str(tiny_sd), "--mode",
           "txt2img", "--count", "40", "--out", str(out), "--steps", "2", "--size", str(SIZE), "--batch-size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "items").is_dir() and len(list((out / "items").glob("*.json"))) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    first = {p.name: p.stat().st_mtime_ns for p in (out / "items").glob("*.json")}
    assert 3 <= len(first) < 40
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{40 - len(first)} new, {len(first)} already done" in r.stderr
    rows = _rows(out)
    assert len(rows) == 40 and all((out / row["path"]).is_file() for row in rows)
    for name, mtime in first.items():
        assert (out / "items" / name).stat().st_mtime_ns == mtime, "finished items are not redone"
    assert not list((out / "images").glob(".*")), "no temporary files left"


def test_diffuse_bad_model_and_arguments(reals, tmp_path):
    r = dfx("prepare", "diffuse", "--model", str(tmp_path / "nothing"), "--mode", "img2img", "--reals", str(reals),
            "--out", str(tmp_path / "o"), "--size", "64")
    assert r.returncode == 1 and "hub is offline" in r.stderr
    r = dfx("prepare", "diffuse", "--model", "x", "--mode", "img2img", "--out", str(tmp_path / "o"), "--size", "64")
    assert r.returncode == 1 and "--reals is needed" in r.stderr


@pytest.mark.parametrize("op", ["splice", "copy_move", "inpaint", "resample", "blur_region"])
def test_each_edit_changes_exactly_its_mask(reals, tmp_path, op):
    out = tmp_path / op
    r = dfx("prepare", "edit", "--reals", str(reals), "--out", str(out), "--ops", op, "--per-image", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(out)
    assert len(rows) == 5 * 2
    from inference.images import load_image

    for row in rows:
        assert row["kind"] == "edit" and row["source"] == f"edit:{op}" and row["op"] == op and row["label"] == "1"
        params = json.loads(row["params"])
        assert isinstance(params, dict) and params
        edited = np.asarray(Image.open(out / row["path"]).convert("RGB"), dtype=int)
        original = np.asarray(load_image(row["parent"]), dtype=int)
        mask = np.asarray(Image.open(out / row["mask"])) > 0
        assert edited.shape == original.shape and mask.shape == original.shape[:2]
        assert mask.any() and not mask.all()
        changed = np.any(edited != original, axis=2)
        assert not changed[~mask].any(), "pixels outside the mask changed"
        assert changed[mask].mean() > 0.3, f"{op}: the masked region is mostly unchanged ({changed[mask].mean():.2f})"
    # resumable: a second run makes nothing new
    r2 = dfx("prepare", "edit", "--reals", str(reals), "--out", str(out), "--ops", op, "--per-image", "2")
    assert r2.returncode == 0 and "0 new, 10 already done" in r2.stderr


def test_edit_unknown_op_fails_before_work(reals, tmp_path):
    r = dfx("prepare", "edit", "--reals", str(reals), "--out", str(tmp_path / "o"), "--ops", "splice,teleport")
    assert r.returncode == 1 and "unknown op(s) teleport" in r.stderr
    assert not (tmp_path / "o").exists()


def test_edited_fakes_keep_their_parents_in_one_fold(tiny_dataset, tmp_path):
    """24 reals and an inpainting edit of each, merged, embedded and clustered into another folder: every
    child shares its parent's fold, both folds are used, and every edit's mask is still found (patch
    experts train on them)."""
    src = read_manifest(tiny_dataset)
    reals = write_manifest(tmp_path / "reals.csv", [{**r, "path": str(src.abspath(r))} for r in src.rows
                                                    if r["label"] == "0" and "broken" not in r["path"]])
    edits = tmp_path / "edits"
    assert dfx("prepare", "edit", "--reals", str(reals), "--out", str(edits), "--ops", "inpaint").returncode == 0
    merged = tmp_path / "all.csv"
    assert dfx("prepare", "merge", str(reals), str(edits / "manifest.csv"), "-o", str(merged)).returncode == 0
    feats = tmp_path / "f.npy"
    assert dfx("prepare", "embed", str(merged), "-o", str(feats), "--workers", "0").returncode == 0
    out = tmp_path / "split" / "folds.csv"
    r = dfx("prepare", "cluster", str(merged), "--features", str(feats), "--k", "6", "--folds", "2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    man = read_manifest(out)
    assert len(man) == 48 and {row["fold"] for row in man.rows} == {"0", "1"}
    fold_of = {str(man.abspath(row).resolve()): row["fold"] for row in man.rows}
    children = [row for row in man.rows if row["parent"]]
    assert len(children) == 24
    for row in children:
        parent = Path(row["parent"])
        parent = parent if parent.is_absolute() else man.root / parent
        assert fold_of[str(parent.resolve())] == row["fold"]
        assert row["mask"] and man.abspath({"path": row["mask"]}).is_file(), row["mask"]
    assert json.loads(out.with_suffix(".report.json").read_text())["parent_links"] == 24


def test_edits_of_folded_reals_are_training_material(tiny_dataset, tmp_path):
    """Edits made after the folds exist (a folds manifest passed whole: its fakes are left out): each keeps its real's fold and cluster and is marked ``split=train``
    (``test`` when its real is held out), so `dfx train` trains on it in the other folds and never counts it in the
    out-of-fold scores its threshold comes from."""
    from training.config import ExpertConfig
    from training.rows import manifest_rows, split_rows

    src = read_manifest(tiny_dataset)
    reals = [r for r in src.rows if r["label"] == "0" and "broken" not in r["path"]][:6]
    folded = write_manifest(tmp_path / "folds.csv", [
        {**r, "path": str(src.abspath(r)), "fold": i % 2, "cluster": 10 + i, "split": "test" if i == 5 else ""}
        for i, r in enumerate(reals)] + [
        {**r, "path": str(src.abspath(r)), "fold": 0, "cluster": 1} for r in src.rows if r["label"] == "1"][:2])
    out = tmp_path / "edits"
    r = dfx("prepare", "edit", "--reals", str(folded), "--out", str(out), "--ops", "inpaint")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "6 new, 0 already done, 0 reals skipped, 2 fakes left out" in r.stderr, "fakes are not edited"
    by_parent = {Path(row["parent"]).name: row for row in read_manifest(out / "manifest.csv").rows}
    assert len(by_parent) == 6
    for i, real in enumerate(reals):
        row = by_parent[Path(real["path"]).name]
        assert (row["fold"], row["cluster"]) == (str(i % 2), str(10 + i))
        assert row["split"] == ("test" if i == 5 else "train")
    merged = tmp_path / "all.csv"
    assert dfx("prepare", "merge", str(folded), str(out / "manifest.csv"), "-o", str(merged)).returncode == 0
    train, val = split_rows(manifest_rows([str(merged)]), ExpertConfig(val_fold=0), 0)
    assert not [r for r in val if r["kind"] == "edit"] and len(val) == 3 + 2, "edits are never validated on"
    assert sum(r["kind"] == "edit" for r in train) == 2, "the edits of fold 1's reals train (the test real's do not)"
