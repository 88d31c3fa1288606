"""The manifest: relative paths resolve against the manifest's folder from any working directory."""

from __future__ import annotations

import os

import pytest

from inference.manifest import ManifestError, read_manifest, write_manifest


def test_relative_manifest_gives_absolute_paths_and_rewrites_on_move(tmp_path, odd_images, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jpg").write_bytes(odd_images["rgb.jpg"].read_bytes())
    write_manifest(data / "m.csv", [{"path": "a.jpg", "label": 0, "source": "x", "extra": "kept"}])
    monkeypatch.chdir(tmp_path)
    man = read_manifest("data/m.csv")
    assert man.abspath(man.rows[0]).is_absolute() and man.abspath(man.rows[0]).is_file()
    moved = write_manifest(tmp_path / "elsewhere" / "m2.csv", man.rows, man.columns, root=man.root)
    again = read_manifest(moved)
    assert again.abspath(again.rows[0]).resolve() == (data / "a.jpg").resolve()
    assert again.rows[0]["extra"] == "kept" and again.columns[:8] == ["path", "label", "source", "kind", "parent",
                                                                     "cluster", "fold", "split"]


@pytest.mark.parametrize("text, message", [
    ("file,label\na.jpg,0\n", "no 'path' column"),
    ("path,label\na.jpg,2\n", "label must be 0 (real) or 1 (fake)"),
    ("path,label\n,1\n", "empty path"),
])
def test_bad_manifests_name_the_problem(tmp_path, text, message):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_manifest(tmp_path / "m.csv")


def test_manifests_as_spreadsheets_write_them(tmp_path, odd_images):
    """Issue 26, item 6: Excel's "CSV UTF-8" (a byte-order mark) reads; a Latin-1 byte and a 10 MB field are
    errors that name the file and the line, through the CLI too (no traceback)."""
    from .conftest import dfx

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(odd_images["rgb.jpg"].read_bytes())
    (tmp_path / "bom.csv").write_bytes("\ufeffpath,label\nphoto.jpg,0\n".encode("utf-8"))
    assert read_manifest(tmp_path / "bom.csv").rows[0]["path"] == "photo.jpg"
    (tmp_path / "latin.csv").write_bytes(b"path,label,note\nphoto.jpg,0,ok\nphoto.jpg,1,caf\xe9\n")
    with pytest.raises(ManifestError, match=r"latin\.csv:3: not UTF-8 text"):
        read_manifest(tmp_path / "latin.csv")
    (tmp_path / "huge.csv").write_text("path,label,note\nphoto.jpg,0,ok\nphoto.jpg,1,\"" + "x" * 10_000_000 + "\"\n")
    with pytest.raises(ManifestError, match=r"huge\.csv:3: not a readable CSV row"):
        read_manifest(tmp_path / "huge.csv")
    for name in ("latin.csv", "huge.csv"):
        r = dfx("prepare", "merge", str(tmp_path / name), str(tmp_path / "bom.csv"), "-o", str(tmp_path / "all.csv"))
        assert r.returncode != 0 and name in r.stderr and "Traceback" not in r.stderr, r.stderr
