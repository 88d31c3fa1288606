"""Files people and programs read: written atomically, named safely, CSV that spreadsheets cannot subvert.

Every file the project writes goes through :func:`atomic_path` (a temporary sibling renamed over the target),
so a killed job never leaves a half-written CSV, PNG, manifest or weight file behind.
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

#: First characters that make a spreadsheet read a cell as a formula (CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary sibling of ``path`` to write to; renamed over ``path`` when the block ends without error,
    removed when it raises. ``suffix`` lets writers that choose a format from the name (Pillow, matplotlib)
    see the right one. The file is readable by everyone, like a file written in place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8, newlines as given) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(data)


def display_name(path: str | os.PathLike[str]) -> str:
    """A file name as text that always encodes: bytes that are not UTF-8 (``bad\\xffname.jpg`` on Linux)
    are written as ``\\xNN`` escapes, Python's ``backslashreplace``; everything else is kept as it is."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def csv_path(path: str | os.PathLike[str]) -> str:
    """A path for a CSV cell: :func:`display_name`, and ``./`` in front of a relative path that a spreadsheet
    would run as a formula (``=cmd.jpg`` → ``./=cmd.jpg``, the same file)."""
    text = display_name(path)
    return f"./{text}" if text.startswith(FORMULA_START) else text


def write_csv(out: TextIO, rows: Iterable[list[str]]) -> None:
    """CSV rows ending in ``\\n``. A row with a bare CR in a cell is written fully quoted: the csv module
    quotes only the line terminator's own characters, and an unquoted CR splits the row in readers."""
    plain = csv.writer(out, lineterminator="\n")
    quoted = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for row in rows:
        (quoted if any("\r" in cell for cell in row) else plain).writerow(row)


def save_figure(fig: Any, path: str | os.PathLike[str]) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
