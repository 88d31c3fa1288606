"""``dfx evaluate``: score a manifest with a bundle through the inference core; metrics, tables, ROC."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from inference.detector import Detector
from inference.manifest import read_manifest, write_manifest

from .metrics import metrics_by_source, per_source_markdown, save_metrics, save_roc_png


def evaluate(weights: str | os.PathLike[str], manifest: str | os.PathLike[str], out_dir: str | os.PathLike[str],
             *, device: str = "auto", batch_size: int = 32, workers: int | None = None,
             progress: bool = True, resume: bool = False) -> dict[str, Any] | None:
    """Write ``predictions.csv``, ``metrics.json``, ``per_source.md`` and ``roc.png`` to ``out_dir``.

    Scores go through resumable shards (``predictions.csv.parts/``, inference.sharded): ``resume`` skips the
    images a killed run already scored, and under ``torchrun`` / ``accelerate launch`` the images are split
    across the processes. Returns the metrics on the main process, None on the others."""
    from inference.sharded import finish, remove_parts, score_to_parts, start, world_from_env

    man = read_manifest(manifest)
    world = world_from_env()
    det = Detector(weights, device=start(world, device), batch_size=batch_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [man.abspath(r) for r in man.rows]
    if workers is None and world.size > 1:
        workers = max(0, min(4, (os.cpu_count() or 1) // world.size - 1))
    results = score_to_parts(det, paths, out / "predictions.csv", world=world, resume=resume, workers=workers,
                             progress=progress, desc="evaluating")
    if results is None:  # the main process writes
        finish(world)
        return None
    rows, errors = [], []
    for r, res in zip(man.rows, results):
        if res.prediction is None:
            errors.append(res.error)
            continue
        rows.append({"path": str(res.path), "label": int(r["label"]), "source": r.get("source", ""),
                     "kind": r.get("kind", ""), "score": res.prediction.score, "verdict": res.prediction.label,
                     **{f"expert_{k}": v for k, v in res.prediction.experts.items()}})
    write_manifest(out / "predictions.csv", rows)
    y = [r["label"] for r in rows]
    metrics = metrics_by_source(y, [r["score"] for r in rows], [r["source"] for r in rows],
                                threshold=det.spec.threshold)
    metrics["experts"] = {e.name: metrics_by_source(y, [r[f"expert_{e.name}"] for r in rows],
                                                    [r["source"] for r in rows])["overall"]
                          for e in det.spec.experts}
    metrics["model"] = det.model_id
    metrics["errors"] = errors
    save_metrics(out / "metrics.json", metrics)
    (out / "per_source.md").write_text(per_source_markdown(metrics))
    save_roc_png(out / "roc.png", {"ensemble": (y, [r["score"] for r in rows]),
                                   **{e.name: (y, [r[f"expert_{e.name}"] for r in rows]) for e in det.spec.experts}},
                 title=f"ROC: {det.model_id}")
    remove_parts(out / "predictions.csv")
    finish(world)
    return metrics
