"""Metadata-free copies of images that will be trained on, so a model cannot learn "has a PNG text chunk" or
"names a camera in EXIF" instead of looking at pixels.

A copy keeps the coded pixels byte for byte (a JPEG is not re-encoded; inference/provenance/containers.py) and only
the EXIF orientation, so it decodes to exactly the picture the original decodes to. Formats that cannot be
stripped without re-encoding (anything but JPEG, PNG and WebP) are left out and listed, never silently re-encoded.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from inference.files import write_atomic
from inference.provenance.containers import strip_metadata


def strip_copies(files: list[tuple[Path, Path]], out_dir: str | Path,
                 progress: bool = True) -> tuple[dict[Path, Path], list[tuple[Path, str]]]:
    """Copy each ``(file, folder it was found under)`` to ``out_dir/<folder name>/<path inside the folder>``
    without its metadata (atomically; a copy already there from an interrupted run is kept). Returns
    {file: copy} and the files left out, each with why."""
    out = Path(out_dir)
    copies: dict[Path, Path] = {}
    skipped: list[tuple[Path, str]] = []
    for path, root in tqdm(files, desc="stripping metadata", unit="img", disable=not progress):
        target = out / root.name / path.relative_to(root)
        if not target.exists():
            try:
                stripped = strip_metadata(path.read_bytes())
            except (OSError, ValueError) as exc:
                skipped.append((path, str(exc)))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, stripped)
        copies[path] = target
    return copies, skipped
