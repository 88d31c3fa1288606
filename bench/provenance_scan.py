"""What the files of a data folder say about themselves, and what reading it costs.

    python bench/provenance_scan.py [FOLDER ...]   (default: ../shared/data/dev ../shared/data/more)

Prints, per folder and label, how many files declare each class (inference/provenance) and the time per file.
A training folder should declare nothing: a file that does carries a shortcut a detector could learn instead of
looking at pixels (strip it: ``dfx prepare index --strip-metadata``).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference.images import collect_images  # noqa: E402
from inference.provenance import ProvenanceReader  # noqa: E402


def main(folders: list[str]) -> None:
    reader = ProvenanceReader()
    for folder in folders or [str(ROOT.parent / "shared/data/dev"), str(ROOT.parent / "shared/data/more")]:
        paths = collect_images([folder])
        counts: dict[str, Counter] = {}
        examples: list[str] = []
        t0 = time.perf_counter()
        for p in paths:
            prov = reader.read(p)
            label = p.parent.name
            counts.setdefault(label, Counter())[prov.declared] += 1
            if (prov.evidence or prov.unreadable) and len(examples) < 10:
                examples.append(f"    {p.relative_to(folder)}: {prov.summary()[:160]}")
        dt = time.perf_counter() - t0
        print(f"{folder}: {len(paths)} files, {dt / max(1, len(paths)) * 1000:.2f} ms per file")
        for label, c in sorted(counts.items()):
            print(f"  {label}: " + ", ".join(f"{k} {v}" for k, v in c.most_common()))
        print("\n".join(examples) if examples else "  no file carries any evidence")


if __name__ == "__main__":
    main(sys.argv[1:])
