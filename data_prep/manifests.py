"""``dfx prepare index`` and ``dfx prepare merge``: manifests from folders, label files and other manifests."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from inference.images import collect_images
from inference.manifest import COLUMNS, Manifest, ManifestError, read_manifest, reroot, write_manifest


def index_folders(folders: list[str], out: str | os.PathLike[str], *, label: int | None, source: str | None = None,
                  kind: str | None = None, from_competition: str | None = None,
                  strip_to: str | os.PathLike[str] | None = None) -> int:
    """Rows for every image file under ``folders``. Labels come from ``label`` or, for the competition's
    ``img_name,target`` files, from ``from_competition`` (matched by file name). ``strip_to``: the rows point at
    metadata-free copies written under this folder (data_prep/strip.py); files that cannot be stripped without
    re-encoding are left out and named on stderr. Returns the row count."""
    labels_by_name: dict[str, int] = {}
    if from_competition:
        with open(from_competition, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"img_name", "target"} <= set(reader.fieldnames):
                raise ManifestError(f"{from_competition}: expected the columns img_name,target")
            for i, r in enumerate(reader, start=2):
                if r["target"] not in ("0", "1"):
                    raise ManifestError(f"{from_competition}:{i}: target must be 0 or 1, got {r['target']!r}")
                labels_by_name[r["img_name"]] = int(r["target"])
    elif label is None:
        raise ManifestError("give --label real|fake, or --from-competition LABEL_FILE")
    rows, found = [], []
    for folder in folders:
        root = Path(folder)
        for p in collect_images([root]):
            if from_competition:
                if p.name not in labels_by_name:
                    continue
                lab = labels_by_name[p.name]
            else:
                lab = int(label)  # type: ignore[arg-type]
            found.append((p, root))
            rows.append({"path": str(p.resolve()), "label": lab, "source": source or root.name,
                         "kind": kind or ("real" if lab == 0 else "fake")})
    if strip_to is not None and rows:
        import sys

        from .strip import strip_copies

        copies, skipped = strip_copies(found, strip_to)
        for path, why in skipped:
            print(f"left out (metadata not stripped): {path}: {why}", file=sys.stderr)
        rows = [{**r, "path": str(copies[p].resolve())} for r, (p, _) in zip(rows, found) if p in copies]
    if not rows:
        raise ManifestError(f"no image files found in {', '.join(folders)}")
    write_manifest(out, rows, root="/")
    return len(rows)


def merge_manifests(inputs: list[str], out: str | os.PathLike[str]) -> int:
    """Concatenate manifests (paths re-rooted to the output's folder); duplicate paths are an error."""
    rows, columns, seen = [], list(COLUMNS), {}
    out_dir = Path(out).resolve().parent
    for m in inputs:
        man = read_manifest(m)
        columns += [c for c in man.columns if c not in columns]
        for r in man.rows:
            absolute = man.abspath(r).resolve()
            if absolute in seen:
                raise ManifestError(f"{absolute} is in both {seen[absolute]} and {m}")
            seen[absolute] = m
            rows.append(reroot({**r, "path": str(absolute)}, str(man.root), str(out_dir)))
    write_manifest(out, rows, columns)
    return len(rows)


def read_reals(path: str | os.PathLike[str]) -> tuple[Manifest, int]:
    """The rows of a manifest that are not labelled fake, and how many were left out: the photos edits and blends are
    made from (a folds manifest can be passed whole)."""
    given = read_manifest(path, require_labels=False)
    reals = Manifest([r for r in given.rows if str(r.get("label", "")).strip() != "1"], given.root)
    return reals, len(given.rows) - len(reals.rows)


def child_split(parent: dict) -> dict[str, str]:
    """The fold, cluster and split columns of a fake made from ``parent`` (an edit, a blend, a simulated fake).

    It stays on its real's side of every fold (a fold holds a real and everything made from it), and it is training
    material: ``split=train`` (trained on in other folds, never validated on, so out-of-fold scores and the
    decision threshold are measured on the collection's own images only), or ``test`` when its real is held out."""
    out = {k: str(parent[k]) for k in ("fold", "cluster") if parent.get(k) not in (None, "")}
    out["split"] = "test" if parent.get("split") == "test" else "train"
    return out
