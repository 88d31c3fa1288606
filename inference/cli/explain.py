"""``dfx explain``: where the ensemble looked, as pictures a person reads and maps a program reads.

Per image, in ``-o DIR``: ``<name>.heatmap.png``, the image tinted by the ensemble's map with a colour bar,
the score and the label (long side at most ``--max-side``); ``<name>.map.png``, the raw map at the image's
own size as 16-bit grey (0 = no expert looked there, else ``1 + round(p * 65534)``; inference.explain.read_map16
reads it back); and one row per image in ``DIR/explain.csv`` (score, label, the share of the looked-at area
above the threshold, the files). A file that cannot be decoded gets an error row and the run goes on; every
file is written atomically.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from pathlib import Path
from typing import Any

from ..files import csv_path, display_name, write_atomic, write_csv
from .predict import PROVENANCE_COLUMNS, add_detector_options, add_provenance_options, provenance_cells, \
    provenance_reader
from ..weights import resolve_weights

log = logging.getLogger("dfx.explain")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="heatmaps: where the ensemble found the image fake",
                       description="Score images and draw where the decision came from: per image an overlay "
                                   "PNG (image, colour map, colour bar, score, label) and the raw map as a 16-bit "
                                   "PNG, and DIR/explain.csv. Maps come from patch experts (family patch) and "
                                   "tiled experts (preprocess tiles); a bundle with neither says so and writes "
                                   "the overlay without a map.")
    p.add_argument("paths", nargs="+", metavar="IMAGE", help="image files and/or folders")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="folder for the pictures and explain.csv")
    p.add_argument("--max-side", type=int, default=1600,
                   help="long side of the overlay picture in pixels (default 1600; the 16-bit map is always at "
                        "the image's own size)")
    add_detector_options(p)
    add_provenance_options(p)
    p.set_defaults(func=_explain)


HEADER = ["path", "status", "score", "label", "fake_area", "faces", "heatmap", "map", *PROVENANCE_COLUMNS, "error"]


def _error_row(path: Path, message: str) -> list[str]:
    return [csv_path(path), "error", *[""] * (len(HEADER) - 3), message]


def out_names(paths: list[Path]) -> list[str]:
    """A distinct output stem per input: the file name, with ``-2``, ``-3`` ... where two inputs share one."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        base = p.name
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{p.stem}-{seen[base]}{p.suffix}")
    return names


def _explain(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..detector import Detector
    from ..images import ImageError, collect_images

    paths = collect_images(args.paths)
    if not paths:
        raise ValueError("no image files found in the given paths")
    det = Detector(resolve_weights(args.weights), device=args.device, batch_size=args.batch_size,
                   max_pixels=args.max_pixels, precision=args.precision, provenance_rule=args.provenance_rule)
    reader = provenance_reader(args)
    finder = det.face_finder(args.face_finder) if args.faces else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[list[str]] = []
    unavailable = None
    for path, name in tqdm(list(zip(paths, out_names(paths))), desc="explaining", disable=args.no_progress):
        try:
            row, note = _explain_one(det, finder, path, name, out, args.max_side, reader)
        except ImageError as exc:
            row, note = _error_row(path, exc.message), None
        except Exception as exc:  # one image's failure is its row, never the run's (issue 26, item 2)
            log.exception("explaining %s failed", display_name(str(path)))
            row, note = _error_row(path, f"explaining this image failed ({type(exc).__name__}: {exc})"), None
        rows.append(row)
        unavailable = unavailable or note
    buf = io.StringIO()
    write_csv(buf, [HEADER] + rows)
    write_atomic(out / "explain.csv", buf.getvalue())
    ok = sum(r[1] == "ok" for r in rows)
    print(f"explained {ok} of {len(rows)} images into {out}" + (f" ({len(rows) - ok} failed: see explain.csv)"
                                                                  if ok < len(rows) else ""), file=sys.stderr)
    if unavailable:
        print(f"note: {unavailable}", file=sys.stderr)
    return 0


def _explain_one(det: Any, finder: Any, path: Path, name: str, out: Path,
                 max_side: int, reader: Any = None) -> tuple[list[str], str | None]:
    """One image's pictures and its explain.csv row, and the bundle's no-map note if it has one."""
    import numpy as np

    from ..detector import NON_FINITE
    from ..explain import map16, original_size, png_bytes
    from ..pipeline import analyse, decode

    d = decode(det.preprocessor, path, finder=finder, keep_image=True, provenance=reader)
    [pred] = det.score_decoded([d])
    if not pred.finite:
        return _error_row(path, NON_FINITE[1]), None
    label = pred.label
    analysis = analyse(det, d, pred)
    expl = analysis.explanation
    size = original_size(path) or expl.image_size
    faces = "" if pred.faces is None else str(len(pred.faces))
    picture = analysis.picture(label=label, threshold=det.spec.threshold, max_side=max_side)
    heat, raw = out / f"{name}.heatmap.png", out / f"{name}.map.png"
    write_atomic(heat, png_bytes(picture))
    area = ""
    if expl.ensemble is not None:
        m = expl.ensemble
        known = np.isfinite(m)
        area = f"{float((m[known] >= det.spec.threshold).mean()):.4f}" if known.any() else ""
        buf = io.BytesIO()
        map16(expl.map_at(size)).save(buf, format="PNG", compress_level=1)
        write_atomic(raw, buf.getvalue())
    return [csv_path(path), "ok", f"{pred.score:.6f}", label, area, faces, display_name(heat.name),
            display_name(raw.name) if expl.ensemble is not None else "",
            *(provenance_cells(pred) if pred.provenance is not None else ["", "", ""]), ""], expl.unavailable
