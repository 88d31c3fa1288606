"""The manifest: a CSV table of images, one row per image (see ../shared/ARCHITECTURE.md).

Columns: ``path`` (relative to the manifest's folder; absolute paths accepted), ``label`` (0 real,
1 fake), ``source``, ``kind``, ``parent``, ``cluster``, ``fold``, ``split``; extra columns are kept, in
order, never dropped. It lives in the core because both training and data_prep read and write it and
neither may import the other; it needs nothing but the standard library.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Iterable

from .files import atomic_path

COLUMNS = ("path", "label", "source", "kind", "parent", "cluster", "fold", "split")
# Columns that name files, relative to the manifest's folder (or absolute): moving rows into another
# manifest must re-root all of them, or a merged manifest silently loses its edits' masks.
PATH_COLUMNS = ("path", "parent", "mask")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, and the row where it applies."""


class Manifest:
    """Rows (dicts of strings) plus the folder their relative paths are resolved against."""

    def __init__(self, rows: list[dict[str, str]], root: Path, columns: list[str] | None = None,
                 source_file: Path | None = None) -> None:
        self.rows = rows
        self.root = Path(root)
        self.source_file = source_file
        extra = [c for r in rows for c in r if c not in COLUMNS]
        self.columns = list(columns) if columns else list(COLUMNS) + list(dict.fromkeys(extra))

    def __len__(self) -> int:
        return len(self.rows)

    def abspath(self, row: dict[str, str]) -> Path:
        p = Path(row["path"])
        return p if p.is_absolute() else self.root / p

    def image_key(self, row: dict[str, str]) -> Path:
        """Which file a row names, links resolved: two rows with equal keys name the same image."""
        try:
            return self.abspath(row).resolve()
        except (OSError, RuntimeError):  # a symlink loop: the path itself
            return self.abspath(row).absolute()

    def duplicates(self) -> int:
        """How many rows name an image an earlier row already names."""
        return len(self.rows) - len({self.image_key(r) for r in self.rows})

    def labels(self) -> list[int]:
        return [int(r["label"]) for r in self.rows]


def _first_undecodable(path: Path) -> tuple[int, bytes]:
    """The line number and byte of the first non-UTF-8 byte (the text decoder reads ahead in blocks, so its own
    error cannot say which line)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return number, line[exc.start:exc.start + 1]
    return 0, b""


def read_manifest(path: str | os.PathLike[str], *, require_labels: bool = True) -> Manifest:
    """Read and check a manifest: ``path`` present in every row, labels 0/1 when required."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    # utf-8-sig: spreadsheets ("CSV UTF-8" in Excel) start the file with a byte-order mark, which would otherwise
    # become part of the first column's name.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise ManifestError(f"{path}: no 'path' column (a manifest's columns: {', '.join(COLUMNS)})")
            columns = list(reader.fieldnames)
            rows = []
            for row in reader:
                i = reader.line_num
                row = {k: (v if v is not None else "") for k, v in row.items() if k is not None}
                if not row.get("path"):
                    raise ManifestError(f"{path}:{i}: empty path")
                if require_labels and row.get("label", "") not in ("0", "1"):
                    raise ManifestError(f"{path}:{i}: label must be 0 (real) or 1 (fake), got {row.get('label')!r}")
                rows.append(row)
        except UnicodeDecodeError:  # e.g. a Latin-1 export: say where, not only which byte
            line, byte = _first_undecodable(path)
            raise ManifestError(f"{path}:{line}: not UTF-8 text (byte {byte!r}); save it as CSV UTF-8") from None
        except csv.Error as exc:  # a field over csv's size limit, a stray NUL, ...
            # the row being read starts on the line after the last one read
            raise ManifestError(f"{path}:{reader.line_num + 1}: not a readable CSV row ({exc})") from None
    missing = [c for c in COLUMNS if c not in columns]
    for r in rows:
        for c in missing:
            r[c] = ""
    # An absolute root: paths from abspath() must stay valid when written into another manifest.
    return Manifest(rows, path.resolve().parent, columns + missing, source_file=path)


def reroot(row: dict[str, object], src: str, dst: str) -> dict[str, object]:
    """Rewrite the row's file columns (:data:`PATH_COLUMNS`) from folder ``src`` to folder ``dst``, in place."""
    for c in PATH_COLUMNS:
        p = str(row.get(c) or "")
        if p:
            row[c] = os.path.relpath(p if os.path.isabs(p) else os.path.join(src, p), dst)
    return row


def write_manifest(path: str | os.PathLike[str], rows: Iterable[dict[str, object]],
                   columns: list[str] | None = None, *, root: str | os.PathLike[str] | None = None) -> Path:
    """Write rows atomically (temporary file + rename). Standard columns first, then extras in order.

    ``root``: the folder the rows' relative paths refer to, when not the output's own folder; paths are
    rewritten relative to the output's folder (absolute when that is impossible).
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [dict(r) for r in rows]
    cols = list(COLUMNS)
    for c in (columns or []) + [k for r in rows for k in r]:
        if c not in cols:
            cols.append(c)
    if root is not None and Path(root).resolve() != out.parent.resolve():
        src, dst = str(Path(root).resolve()), str(out.parent.resolve())
        for r in rows:
            reroot(r, src, dst)
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: "" if r.get(c) is None else r.get(c) for c in cols})
    return out


def manifest_sha256(path: str | os.PathLike[str]) -> str:
    """Checksum of a manifest file, recorded in a bundle's provenance."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
