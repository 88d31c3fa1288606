"""``dfx prepare faces``: a manifest of face crops, so that experts can be trained on faces as the
competition's winners did.

Each face found in each row's image is found and cut by :func:`inference.faces.find_and_cut`, the function a
bundle scores faces with, so a face expert learns from the crops it will be shown; saved as PNG (lossless: the
crop adds no compression of its own). The finder (MTCNN, else Haar; or RetinaFace) and its search are written to
``finder.json``: training records them in the face expert, and ``dfx export`` puts that finder, searching the
same way, into the bundle. A crop row keeps its image's label, source, kind, fold and split, and names the image in ``parent``, so
``dfx prepare cluster`` keeps every face in its photo's fold. Rows whose image has no face are listed in
``no_faces.csv``; unreadable images in ``skipped.json``. Resumable: an image whose crops are on disk is not
searched again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from inference.faces import FINDER_FILE, FaceFinder, find_and_cut, finder_of
from inference.images import ImageError
from inference.manifest import read_manifest, write_manifest


def prepare_faces(manifest: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, max_faces: int = 4,
                  margin: float = 0.3, min_confidence: float = 0.9, method: str = "auto", max_side: int | None = None,
                  min_face: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Write ``out_dir/images/*.png``, ``out_dir/manifest.csv``, ``no_faces.csv``, ``skipped.json`` and
    ``finder.json``. Resuming with another finder or search is refused (ValueError): one manifest, one way of
    cutting."""
    from tqdm import tqdm

    from inference.files import write_atomic

    man = read_manifest(manifest, require_labels=False)
    out = Path(out_dir)
    finder = FaceFinder(method=method, min_confidence=min_confidence, max_side=max_side, min_face=min_face)
    cut_by = {**finder.settings(), "margin": margin}
    done_file = out / "done.json"  # image index → number of faces, for resuming
    recorded = finder_of(out / "manifest.csv")
    if done_file.is_file() and recorded != cut_by:
        raise ValueError(f"{out}: its crops were cut by {recorded or 'a finder it did not record'}, not {cut_by}; "
                         "use another output folder")
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    write_atomic(out / FINDER_FILE, json.dumps(cut_by, indent=2))
    done: dict[str, int] = json.loads(done_file.read_text()) if done_file.is_file() else {}
    skipped = []
    for i, row in enumerate(tqdm(man.rows, desc=f"faces ({finder.method})", unit="img", disable=not progress)):
        if str(i) in done:
            continue
        path = man.abspath(row)
        try:
            cut = find_and_cut(path, finder, max_faces=max_faces, margin=margin)
        except ImageError as exc:
            skipped.append({"path": str(path), "reason": exc.message})
            done[str(i)] = -1
            continue
        for k, (face, crop) in enumerate(zip(cut.faces, cut.crops)):
            target = images / f"{i:06d}_{path.stem[:60]}_f{k}.png"
            tmp = target.with_name("." + target.name + ".tmp")
            crop.save(tmp, format="PNG")
            os.replace(tmp, target)
            (images / (target.name + ".json")).write_text(json.dumps(face.to_json()))
        done[str(i)] = len(cut.faces)
        if i % 50 == 0:
            write_atomic(done_file, json.dumps(done))
    write_atomic(done_file, json.dumps(done))
    rows, none = [], []
    for i, row in enumerate(man.rows):
        n = done.get(str(i), 0)
        path = man.abspath(row)
        if n == 0:
            none.append({**row, "path": str(path)})
        for k in range(max(n, 0)):
            target = images / f"{i:06d}_{path.stem[:60]}_f{k}.png"
            meta = json.loads((images / (target.name + ".json")).read_text())
            rows.append({**row, "path": f"images/{target.name}", "parent": str(path), "face": k,
                         "face_box": " ".join(str(v) for v in meta["box"]), "face_confidence": meta["confidence"]})
    write_manifest(out / "manifest.csv", rows)
    write_manifest(out / "no_faces.csv", none)
    write_atomic(out / "skipped.json", json.dumps(skipped, indent=2))
    with_faces = sum(1 for v in done.values() if v > 0)
    return {"images": len(man.rows), "with_faces": with_faces, "faces": len(rows), "no_faces": len(none),
            "skipped": len([v for v in done.values() if v < 0]), "finder": finder.describe(),
            "manifest": str(out / "manifest.csv")}
